"""The typed configuration of a training script's run, built once from its parsed flags
(`TrainingConfig.from_flags`); the training loop, the recipes and evaluation take these and never
the command line.

    model     ModelConfig      --model_name, --pretrained, --model_width, --strides, --head_type, family options
    frontend  FrontendConfig   --resample_rate, --window_size, --hop_size, --n_fft, --n_mels, --fmin, ...
    optim     OptimConfig      --lr / --max_lr, --n_epochs, --weight_decay, --adamw, --mixup_alpha, schedule
    loader    LoaderConfig     --batch_size, --num_workers, --persistent_workers, --prefetch_factor
    speed     SpeedConfig      --compile, --channels_last, --cudnn_benchmark
    run       RunConfig        --experiment_name, --out_dir, --seed, --logger, --precision, --resume, ...
    data      DataConfig       --dataset_dir, --cache_path, --clip_length, roll / wavmix / gain augmentation
    recipe    RecipeConfig     --recipe and the probe recipes' settings, --embedding_cache

    config = TrainingConfig.from_flags(vars(parser.parse_args(argv)))   # in a script
    fine_tune(config, task, train_set, val_set, dist, config.run.out_dir)

`flags` keeps the parsed values as given: the record of the run a checkpoint stores (`config`),
that --resume compares and the logger shows. The configurations are frozen: a script that needs
another value derives a new one (`dataclasses.replace`), nothing changes one after parsing.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Optional

import torch
from torch import nn

from models.checkpoint import read_run_record
from models.config import FrontendConfig, ModelConfig
from models.factory import frontend_kwargs
from models.pretrained import REGISTRY


def _pick(cls: type, values: Mapping[str, Any], **renamed: str) -> Any:
    """`cls` from the flag `values` named as its fields (or as `renamed` says: field -> flag);
    a flag the script lacks leaves its field's default."""
    given = {f.name: values[renamed.get(f.name, f.name)] for f in fields(cls) if renamed.get(f.name, f.name) in values}
    return cls(**given)


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and the original's schedule (helpers/training/schedule.py)."""
    lr: float = 1e-4
    n_epochs: int = 80
    weight_decay: float = 0.0
    adamw: bool = False
    mixup_alpha: float = 0.3
    warm_up_len: int = 10
    ramp_down_start: int = 10
    ramp_down_len: int = 65
    last_lr_value: float = 0.01


@dataclass(frozen=True)
class LoaderConfig:
    """DataLoaders: clips per batch and process, workers, and how they run."""
    batch_size: int = 32
    num_workers: int = 0
    persistent_workers: bool = False
    prefetch_factor: Optional[int] = None


@dataclass(frozen=True)
class SpeedConfig:
    """Options that make the model faster and nothing else."""
    compile: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False

    def memory_format(self) -> torch.memory_format:
        """The model's memory format (--channels_last)."""
        return torch.channels_last if self.channels_last else torch.preserve_format

    def apply(self, model: nn.Module) -> nn.Module:
        """`model` (changed in place) with --channels_last and --compile, and cuDNN set per
        --cudnn_benchmark. Compiling in place keeps the module and its state_dict keys, so DDP,
        evaluation and checkpoints see the same model."""
        model.to(memory_format=self.memory_format())
        if self.compile:
            model.compile()
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        return model


@dataclass(frozen=True)
class RunConfig:
    """The run: its name and folder (`out_dir`: --out_dir, else runs/<experiment_name>), seed,
    device (`cuda`), logger, autocast precision (None: fp32), --resume (a checkpoint, or "auto"),
    --overwrite, and the fine-tuned `checkpoint` to evaluate instead of training."""
    experiment_name: str = "run"
    out_dir: Path = Path("runs/run")
    seed: int = 42
    cuda: bool = False
    logger: str = "wandb"
    precision: Optional[str] = None
    resume: Optional[str] = None
    overwrite: bool = False
    checkpoint: Optional[str] = None


@dataclass(frozen=True)
class DataConfig:
    """The data: folder, waveform cache (--cache_path), seconds per clip and the training-set
    augmentation (waveform roll, waveform mixing, random gain range in dB)."""
    dataset_dir: Optional[str] = None
    cache_path: Optional[str] = None
    clip_length: Optional[float] = None
    roll: bool = False
    wavmix: bool = False
    gain_augment: int = 0

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "DataConfig":
        """AudioSet switches augmentation on (--roll, --wavmix), fine-tuning off (--no_roll, --no_wavmix)."""
        on = {name: values[name] if name in values else not values.get(f"no_{name}", True) for name in ("roll", "wavmix")}
        return replace(_pick(cls, values), **on)


@dataclass(frozen=True)
class RecipeConfig:
    """The training recipe (helpers/training/recipes.py) and the probe recipes' settings;
    `embedding_cache`: the folder of cached clip embeddings (None: no cache)."""
    recipe: str = "finetune"
    probe_features: str = "concat"
    probe_window: str = "auto"
    probe_crops: int = 3
    probe_folds: int = 5
    embedding_cache: Optional[Path] = None
    clear_cache: bool = False
    probe_epochs: int = 10
    probe_lr: float = 3e-4
    layer_decay: float = 0.8
    patience: int = 3

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "RecipeConfig":
        cache = values.get("embedding_cache")
        return replace(_pick(cls, values), embedding_cache=Path(cache).expanduser() if cache else None)


@dataclass(frozen=True)
class TrainingConfig:
    """Everything a training script's run is configured by (module doc)."""
    model: ModelConfig
    frontend: FrontendConfig = FrontendConfig()
    optim: OptimConfig = OptimConfig()
    loader: LoaderConfig = LoaderConfig()
    speed: SpeedConfig = SpeedConfig()
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    recipe: RecipeConfig = RecipeConfig()
    flags: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "TrainingConfig":
        """The configuration the parsed flag `values` give (the flags a script lacks: defaults)."""
        out_dir = Path(values["out_dir"]) if values.get("out_dir") else Path("runs") / values.get("experiment_name", "run")
        run = replace(_pick(RunConfig, values), out_dir=out_dir)
        return cls(ModelConfig.from_flags(values), FrontendConfig.from_flags(values), _pick(OptimConfig, values),
                   _pick(LoaderConfig, values), _pick(SpeedConfig, values), run, DataConfig.from_flags(values),
                   RecipeConfig.from_flags(values), MappingProxyType(dict(values)))

    def frontend_settings(self) -> dict[str, Any]:
        """AugmentMelSTFT arguments of the training frontend: the frontend flags given, then the
        registry settings of the model's name (hop and mel variants), then the standard ones; a
        training frontend without --fmin starts its bands at 0 Hz."""
        name = self.model.name if self.model.name in REGISTRY else None
        return frontend_kwargs(name, **{"fmin": 0.0, **self.frontend.given()})

    def sample_rate(self) -> int:
        """The rate to load clips at: that of the evaluated checkpoint's frontend, else the training frontend's."""
        if self.run.checkpoint:
            return int(read_run_record(self.run.checkpoint, mmap=True).frontend_config.get("sr", 32000))
        return int(self.frontend_settings()["sr"])
