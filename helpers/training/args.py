"""The command-line argument groups every training script shares, the parser that checks them,
and the dataset folder they name. What the parsed flags configure is typed in
`helpers.training.config` (`TrainingConfig.from_flags`), which is all the training code below the
scripts takes."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Mapping, NoReturn, Optional, Sequence

from common.errors import InputError, fail
from common.flags import add_frontend_flags
from helpers.training.precision import PRECISIONS
from helpers.training.recipes import add_recipe_args
from models.factory import FAMILIES, OPTIONS
from models.pretrained import DEFAULT_MODEL


def add_run_args(parser: argparse.ArgumentParser, experiment_name: str, batch_size: int,
                 dataset_env: Optional[str] = None, num_workers: Optional[int] = None) -> None:
    """Run arguments: --experiment_name, --cuda, --batch_size, --num_workers (default: the cores
    available), --dataset_dir (default
    from the environment variable `dataset_env`), --seed, --out_dir, --logger, --precision,
    --resume; speed options: --compile, --channels_last, --cudnn_benchmark, --persistent_workers,
    --prefetch_factor."""
    g = parser.add_argument_group("run")
    g.add_argument("--experiment_name", type=str, default=experiment_name, help="run name")
    g.add_argument("--cuda", action="store_true", help="use the GPU if available")
    g.add_argument("--batch_size", type=int, default=batch_size, help="clips per batch and process")
    cores = available_cores()
    g.add_argument("--num_workers", type=int, default=cores if num_workers is None else num_workers,
                   help=f"DataLoader workers (default: the cores this process may use, here {cores})")
    env_note = f" (default: ${dataset_env})" if dataset_env else ""
    g.add_argument("--dataset_dir", type=str,
                   default=os.environ.get(dataset_env) if dataset_env else None,
                   help=f"folder holding the dataset files{env_note}")
    g.add_argument("--seed", type=int, default=42, help="seed of all random draws")
    g.add_argument("--out_dir", type=str, default=None,
                   help="folder for checkpoints and logs (default: runs/<experiment_name>)")
    g.add_argument("--logger", choices=("wandb", "none"), default="wandb",
                   help="wandb logs offline unless WANDB_MODE is set")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast precision (default fp32)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: <out_dir>/last.pt)")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in an --out_dir that holds an earlier run (its files are deleted)")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model (training and evaluation)")
    speed.add_argument("--channels_last", action="store_true",
                   help="channels-last memory format for the model (faster convolutions on GPUs)")
    speed.add_argument("--cudnn_benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms for every new input shape")
    speed.add_argument("--persistent_workers", action="store_true",
                   help="keep DataLoader workers across epochs (a resumed run then draws other augmentations)")
    speed.add_argument("--prefetch_factor", type=int, default=None, help="batches each worker loads ahead (default 2)")


def add_model_args(parser: argparse.ArgumentParser, model_name: str = DEFAULT_MODEL, **option_defaults: Any) -> None:
    """Model arguments: --model_name (default: the shipped DEFAULT_MODEL), --pretrained,
    --model_width, --strides, --head_type, and every family's own flags (`models.factory.OPTIONS`;
    `option_defaults` changes their defaults)."""
    unknown = sorted(set(option_defaults) - set(OPTIONS))
    if unknown:
        raise ValueError(f"no model family has the options {', '.join(unknown)}")
    g = parser.add_argument_group("model")
    prefixes = ", ".join(f"{family.prefix}*: {family.label}" for family in FAMILIES.values())
    g.add_argument("--model_name", type=str, default=model_name,
                   help=f"registry name (default {DEFAULT_MODEL}, shipped; with --pretrained another name downloads "
                        f"its weights once); its prefix picks the model family ({prefixes})")
    g.add_argument("--pretrained", action="store_true", help="start from --model_name's weights")
    g.add_argument("--model_width", type=float, default=1.0, help="width when not pretrained")
    g.add_argument("--strides", type=int, nargs=4, default=None,
                   help="four strides (default: the checkpoint's, else 2 2 2 2)")
    g.add_argument("--head_type", type=str, default=None,
                   choices=("mlp", "fully_convolutional", "multihead_attention_pooling"),
                   help="classifier head (default: the checkpoint's, else mlp)")
    for name, option in OPTIONS.items():  # each family's own flags
        g.add_argument(f"--{name}", type=option.type, default=option_defaults.get(name, option.default),
                       help=option.help)


def add_optimizer_args(parser: argparse.ArgumentParser, lr: float, n_epochs: int,
                       warm_up_len: int, ramp_down_start: int, ramp_down_len: int,
                       last_lr_value: float = 0.01, lr_flag: str = "lr",
                       weight_decay: float = 0.0, mixup_alpha: float = 0.3) -> None:
    """Optimization arguments: --n_epochs, --mixup_alpha, --adamw, --weight_decay (a float),
    --<lr_flag> (--lr, or --max_lr for AudioSet), and the schedule (--warm_up_len,
    --ramp_down_start, --ramp_down_len, --last_lr_value)."""
    g = parser.add_argument_group("optimization")
    g.add_argument("--n_epochs", type=int, default=n_epochs)
    g.add_argument("--mixup_alpha", type=float, default=mixup_alpha, help="0 disables mixup")
    g.add_argument("--adamw", action="store_true", help="AdamW instead of Adam")
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument(f"--{lr_flag}", dest="lr", type=float, default=lr, help="base learning rate (args.lr)")
    g.add_argument("--warm_up_len", type=int, default=warm_up_len)
    g.add_argument("--ramp_down_start", type=int, default=ramp_down_start)
    g.add_argument("--ramp_down_len", type=int, default=ramp_down_len)
    g.add_argument("--last_lr_value", type=float, default=last_lr_value)


def add_preprocessing_args(parser: argparse.ArgumentParser) -> None:
    """Frontend arguments with the original's names (`common.flags.add_frontend_flags`, training
    settings included). Sample rate, window, hop, n_fft and n_mels default to the --model_name
    checkpoint's settings (32000, 800, 320, 1024, 128 for most); masking is off
    (freqm = timem = 0) and eval-time fmax is sr/2 - fmax_aug_range/2."""
    add_frontend_flags(parser, training=True)


# flags whose values must be at least 1 / at least 0 / positive, where a script has them
_AT_LEAST_ONE = ("batch_size", "n_epochs", "epoch_len", "probe_crops", "probe_epochs")
_NOT_NEGATIVE = ("num_workers", "weight_decay", "mixup_alpha", "warm_up_len", "ramp_down_start",
                 "ramp_down_len", "last_lr_value", "gain_augment", "freqm", "timem", "patience")
_POSITIVE = ("lr", "clip_length")


def check_args(values: Mapping[str, Any], flags: Optional[Mapping[str, str]] = None) -> None:
    """InputError (one line naming the flag) for parsed flag `values` no run can use: a batch
    size, epoch count below 1, a negative worker count, a learning rate or clip length that is not
    a positive number, ... `flags` maps an argument to the flag the script spells it with (default
    --<name>); `TrainingParser` calls this with its own flags right after parsing."""
    flags = flags or {}
    for names, ok, need in ((_AT_LEAST_ONE, lambda v: v >= 1, "at least 1"),
                            (_NOT_NEGATIVE, lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
                            (_POSITIVE, lambda v: math.isfinite(v) and v > 0, "a positive number")):
        for name in names:
            value = values.get(name)
            if value is not None and not ok(value):
                raise InputError(f"{flags.get(name, f'--{name}')} must be {need}, got {value}")
    if values.get("probe_folds") is not None and values["probe_folds"] < 2:
        raise InputError(f"--probe_folds must be at least 2 (cross-validation), got {values['probe_folds']}")
    if values.get("resume") and values.get("overwrite"):
        raise InputError("--resume continues a run and --overwrite starts it over: give one of them")


class TrainingParser(argparse.ArgumentParser):
    """The training scripts' parser: a bad flag is one line `error: ...` (not the usage block
    first), and the parsed values are checked (`check_args`) under the flags the script spells;
    each (flag, other flag, message) of `conflicts` set together is an InputError with that message."""

    def __init__(self, *args: Any, conflicts: Sequence[tuple[str, str, str]] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conflicts = list(conflicts)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")

    # argparse's hook: the parsing itself, the one place a Namespace is handled below the scripts
    def parse_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                   namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        values = vars(parsed)
        # argparse keeps its actions in _actions (no public accessor): dest -> the long flag
        check_args(values, {a.dest: a.option_strings[-1] for a in self._actions if a.option_strings})
        for first, second, message in self.conflicts:
            if values.get(first) and values.get(second):
                raise InputError(message)
        return parsed


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def resolve_dataset_dir(dataset_dir: Optional[str], env_var: Optional[str],
                        required_files: Sequence[str] = ()) -> Path:
    """The dataset folder, checked: InputError when it was not given (neither --dataset_dir nor
    the environment variable), does not exist, or lacks one of `required_files`."""
    if not dataset_dir:
        hint = f" or set ${env_var}" if env_var else ""
        raise InputError(f"no dataset folder given: pass --dataset_dir{hint}")
    path = Path(dataset_dir)
    if not path.is_dir():
        raise InputError(f"{path}: dataset folder does not exist")
    for name in required_files:
        if not (path / name).is_file():
            raise InputError(f"{path / name}: dataset file not found")
    return path


class _PretrainedName(argparse.Action):
    """--pretrained_name NAME: the same as --pretrained --model_name NAME."""

    # argparse's hook, called while parsing
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        namespace.model_name, namespace.pretrained = values, True


def finetune_parser(description: str, experiment_name: str, batch_size: int, lr: float,
                    dataset_env: str, recipe: str = "finetune",
                    conflicts: Sequence[tuple[str, str, str]] = ()) -> TrainingParser:
    """The arguments every fine-tuning script has, with the original's defaults where the scripts
    differ (run name, batch size, learning rate) and where they agree (80 epochs, warm-up 10,
    ramp-down from epoch 10 over 65 epochs, gain 12 dB, roll and waveform mixing on): the
    argument groups above (run, model, optimization, preprocessing), --pretrained_name, and
    the fine-tuning data group: --cache_path, --no_roll, --no_wavmix, --gain_augment and
    --checkpoint (evaluate a fine-tuned checkpoint instead of training), and the recipe options
    (`recipes.add_recipe_args`, default `recipe`); `conflicts` as `TrainingParser` takes them."""
    parser = TrainingParser(description=description, conflicts=conflicts)
    add_run_args(parser, experiment_name=experiment_name, batch_size=batch_size, dataset_env=dataset_env)
    add_model_args(parser)
    parser.add_argument("--pretrained_name", action=_PretrainedName, metavar="NAME",
                        help="start from the released weights NAME (= --pretrained --model_name NAME)")
    add_optimizer_args(parser, lr=lr, n_epochs=80, warm_up_len=10, ramp_down_start=10, ramp_down_len=65)
    add_preprocessing_args(parser)
    g = parser.add_argument_group("fine-tuning data")
    g.add_argument("--cache_path", type=str, default=None,
                   help="folder for decoded, resampled waveforms (later epochs skip decoding)")
    g.add_argument("--no_roll", action="store_true", help="no random time shift of the waveforms")
    g.add_argument("--no_wavmix", action="store_true", help="no waveform mixing of training clips")
    g.add_argument("--gain_augment", type=int, default=12, help="random gain range in dB (0 disables)")
    g.add_argument("--checkpoint", type=str, default=None,
                   help="evaluate this fine-tuned checkpoint (best.pt / last.pt) instead of training")
    add_recipe_args(parser, default=recipe)
    return parser
