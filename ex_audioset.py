"""AudioSet: evaluate a released model, an ensemble or a checkpoint (default), or train an MN /
DyMN by knowledge distillation from PaSST ensemble logits (--train).

    python ex_audioset.py --model_name=mn10_as --dataset_dir=/data/audioset
    python ex_audioset.py --train --pretrained --model_name=mn10_im --batch_size=60 --max_lr=0.0004
    torchrun --nproc_per_node=4 ex_audioset.py --cuda --train --pretrained --model_name=dymn10_im \
        --batch_size=30 --max_lr=0.001 --pretrain_final_temp=30

The dataset folder comes from --dataset_dir or $AUDIOSET_DIR. Under torchrun every process trains
on its share of each epoch (DistributedDataParallel), --batch_size is per process, and only rank 0
prints, logs and writes checkpoints.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasets.audioset import (BALANCED_FILE, DATASET_ENV, EVAL_FILE, UNBALANCED_FILE,
                               AudioSetDataset, TeacherPredictions, sample_weights, teacher_paths)
from datasets.augment import RollDataset, WavMixDataset
from datasets.items import IndexedClip
from common.errors import InputError, run_cli
from common.files import atomic_write, check_output
from common.labels import class_names
from helpers.inference.resolve import ModelRef, RuntimeConfig, resolve_model
from helpers.inference.tagging import LoadedModel
from helpers.training.metrics import format_tagging_results, multilabel_metrics
from helpers.training.args import (add_model_args, add_optimizer_args, add_preprocessing_args, add_run_args,
                                   resolve_dataset_dir, TrainingParser)
from helpers.training.config import TrainingConfig
from helpers.training.data import DistributedWeightedSampler
from helpers.training.distributed import DistInfo, all_reduce_sum, gather_cat, setup_distributed
from helpers.training.evaluation import predict
from helpers.training.loop import fine_tune
from helpers.training.mixup import mix, mixup
from helpers.training.tasks import LossFn, Task, tagging_metrics

WANDB_PROJECT = "EfficientAudioTagging"
WANDB_TAGS = ("AudioSet", "Audio Tagging", "Knowledge Disitillation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = TrainingParser(description=__doc__.split("\n\n")[0])
    add_run_args(parser, experiment_name="AudioSet", batch_size=120, dataset_env=DATASET_ENV)
    parser.add_argument("--train", action="store_true", help="train; without it, evaluate")
    parser.add_argument("--ensemble", nargs="+", default=[], help="evaluate this ensemble")
    parser.add_argument("--checkpoint", type=str, default=None,
                        help="evaluate this checkpoint (a training checkpoint or a state dict)")
    parser.add_argument("--save_predictions", type=str, default=None,
                        help="evaluation only: write names, logits and targets to this .npz")
    add_model_args(parser, pretrain_final_temp=30.0)
    add_optimizer_args(parser, lr=0.0008, lr_flag="max_lr", n_epochs=200, warm_up_len=8,
                       ramp_down_start=80, ramp_down_len=95)
    data = parser.add_argument_group("data")
    data.add_argument("--epoch_len", type=int, default=100000, help="clips per epoch (weighted sampler)")
    data.add_argument("--balanced_only", action="store_true", help="train on the balanced set only")
    data.add_argument("--clip_length", type=float, default=10.0, help="seconds per clip")
    data.add_argument("--roll", action="store_true", help="random circular time shift")
    data.add_argument("--wavmix", action="store_true", help="waveform mixing")
    data.add_argument("--gain_augment", type=int, default=0, help="random gain range in dB")
    data.add_argument("--in_mem", action="store_true", help="load the HDF5 files into memory")
    kd = parser.add_argument_group("knowledge distillation")
    kd.add_argument("--teacher_preds", type=str, default=None,
                    help="teacher logits .npy (default: the released file, downloaded into the cache)")
    kd.add_argument("--fname_to_index", type=str, default=None,
                    help="YouTube ID -> teacher row mapping: .json, .csv (name,row) or the released .pkl (default: the released file)")
    kd.add_argument("--missing_teacher", choices=("error", "mask"), default="error",
                    help="training clips without a teacher row: stop, or train them on labels only")
    kd.add_argument("--temperature", type=float, default=1.0, help="KD temperature")
    kd.add_argument("--kd_lambda", type=float, default=0.1, help="weight of the label loss")
    add_preprocessing_args(parser)
    args = parser.parse_args(argv)
    if args.train and (args.ensemble or args.checkpoint or args.save_predictions):
        parser.error("--ensemble, --checkpoint and --save_predictions are for evaluation (without --train)")
    if not 0.0 <= args.kd_lambda <= 1.0:
        parser.error(f"--kd_lambda must be in [0, 1], got {args.kd_lambda}")
    if args.save_predictions:
        check_output(args.save_predictions, "--save_predictions")
    return args


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, known: torch.Tensor,
                      perm: torch.Tensor | None = None, lam: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of the student logits against the teacher probabilities, mean over classes per clip,
    mixed like the inputs: lam * BCE(own row) + (1 - lam) * BCE(partner's row), which equals the
    BCE against the mixed rows since BCE is linear in its target. Clips whose own name has no
    teacher row contribute 0 but count in the batch mean."""
    target = teacher if perm is None else mix(teacher, perm, lam)
    per_clip = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(dim=1)
    return (per_clip * known).mean()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = TrainingConfig.from_flags(vars(args))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    dist = setup_distributed(config.run.cuda)
    (train if args.train else evaluate_only)(args, config, dist)


def audioset_task(dist: DistInfo, loss_fn: LossFn, sampler: Optional[DistributedWeightedSampler] = None,
                  datasets: Sequence[AudioSetDataset] = (), names: Optional[list[str]] = None) -> Task:
    """AudioSet as a task of the training loop: the 527 classes (`names`, default: the label
    table), the loss `loss_fn` (`distillation_loss_fn`), mAP selection, class-balanced sampling; after each epoch the
    undecodable rows of `datasets` are counted (logged as bad_rows) and the main process prints
    the mAP / ROC / d' lines."""
    def epoch_end(epoch: int, metrics: dict[str, float]) -> dict[str, int]:
        bad_rows = sum(all_reduce_sum(d.take_bad_count(), dist) for d in datasets)
        if metrics:
            print(format_tagging_results(metrics) + (f"\n  ({bad_rows} undecodable clips)" if bad_rows else ""))
        return {"bad_rows": bad_rows}

    return Task("as", class_names() if names is None else names, multilabel=True,
                loss_fn=loss_fn,
                metrics_fn=tagging_metrics, selection="mAP", metric_tag="mAP", project=WANDB_PROJECT,
                tags=WANDB_TAGS, notes="AudioSet training by knowledge distillation", sampler=sampler,
                epoch_end=epoch_end, report=print)


def distillation_loss_fn(mixup_alpha: float, kd_lambda: float, teacher: Optional[TeacherPredictions]) -> LossFn:
    """The loss callback: label BCE (mixup as the inputs, --mixup_alpha) weighted --kd_lambda, plus
    the distillation loss against the teacher (when there is one) weighted 1 - kd_lambda."""
    def loss_fn(model: torch.nn.Module, x: torch.Tensor, batch: IndexedClip) -> dict[str, torch.Tensor]:
        y, perm, lam = batch.target, None, None
        if mixup_alpha > 0:
            perm, lam = mixup(len(x), mixup_alpha)
            perm, lam = perm.to(x.device, non_blocking=True), lam.to(x.device, non_blocking=True)
            x, y = mix(x, perm, lam), mix(y, perm, lam)
        logits = model(x)[0]
        label_loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        if teacher is None:
            return {"loss": label_loss, "label_loss": label_loss.detach()}
        probs, known = (t.to(x.device, non_blocking=True) for t in teacher.lookup(batch.name))
        kd_loss = distillation_loss(logits, probs, known.float(), perm, lam)
        loss = kd_lambda * label_loss + (1.0 - kd_lambda) * kd_loss
        return {"loss": loss, "label_loss": label_loss.detach(), "distillation_loss": kd_loss.detach()}
    return loss_fn


def load_teacher(args: argparse.Namespace, train_set: AudioSetDataset, dist: DistInfo) -> Optional[TeacherPredictions]:
    """The PaSST ensemble's logits, aligned to clips by YouTube ID (None with --kd_lambda 1)."""
    if args.kd_lambda <= 0:
        return None
    logits_path, index_path = teacher_paths(args.teacher_preds, args.fname_to_index)
    teacher = TeacherPredictions(logits_path, index_path, temperature=args.temperature)
    missing = teacher.missing(train_set.names())
    if missing and args.missing_teacher == "error":
        raise InputError(f"{len(missing)} of {len(train_set)} training clips (e.g. {missing[0]!r}) "
                         f"are not in {index_path}; "
                         "pass --missing_teacher mask to train them on their labels only")
    if missing and dist.is_main:
        print(f"{len(missing)} training clips have no teacher row; their distillation loss is 0")
    return teacher


def balanced_sampler(args: argparse.Namespace, seed: int, train_set: AudioSetDataset,
                     dist: DistInfo) -> DistributedWeightedSampler:
    """Class-balanced sampling without replacement of --epoch_len clips per epoch."""
    weights = sample_weights(train_set.packed_targets())
    epoch_len = min(args.epoch_len, int((weights > 0).sum()))
    if epoch_len < args.epoch_len and dist.is_main:
        print(f"--epoch_len {args.epoch_len} exceeds the {epoch_len} labelled training clips; "
              f"epochs have {epoch_len} clips")
    return DistributedWeightedSampler(weights, epoch_len, dist.rank, dist.world_size, seed)


def train(args: argparse.Namespace, config: TrainingConfig, dist: DistInfo) -> None:
    """Knowledge distillation on the balanced (+ unbalanced) set, evaluated on the eval set."""
    files = [BALANCED_FILE] + ([] if args.balanced_only else [UNBALANCED_FILE])
    data = config.data
    dataset_dir = resolve_dataset_dir(data.dataset_dir, DATASET_ENV, files + [EVAL_FILE])
    sr = config.frontend_settings()["sr"]
    train_set = AudioSetDataset([dataset_dir / f for f in files], resample_rate=sr, clip_length=data.clip_length,
                                gain_augment=data.gain_augment, in_mem=args.in_mem)
    eval_set = AudioSetDataset([dataset_dir / EVAL_FILE], resample_rate=sr, clip_length=data.clip_length,
                               bad_rows="mask", in_mem=args.in_mem)
    sampler = balanced_sampler(args, config.run.seed, train_set, dist)
    loss_fn = distillation_loss_fn(config.optim.mixup_alpha, args.kd_lambda, load_teacher(args, train_set, dist))
    task = audioset_task(dist, loss_fn, sampler, (train_set, eval_set))
    augmented = RollDataset(train_set) if data.roll else train_set
    augmented = WavMixDataset(augmented) if data.wavmix else augmented
    fine_tune(config, task, augmented, eval_set, dist, config.run.out_dir)


def model_to_evaluate(args: argparse.Namespace, config: TrainingConfig, dist: DistInfo) -> LoadedModel:
    """--checkpoint (a training checkpoint, or a bare state dict in the model the model flags
    describe), or a released model or ensemble with the preprocessing flags' frontend, resolved
    as every command resolves a model (helpers/inference/resolve.py), on the run's device."""
    if args.checkpoint:
        ref = ModelRef("checkpoint", path=Path(args.checkpoint))
    else:
        ref = ModelRef.parse(args.ensemble or config.model.name)
    try:
        return resolve_model(ref, RuntimeConfig(str(dist.device)), config.frontend.for_eval(), config.model)
    except ValueError as e:  # unknown name, members with different frontends, weights that do not fit, ...
        raise InputError(str(e)) from None


def evaluate_only(args: argparse.Namespace, config: TrainingConfig, dist: DistInfo) -> None:
    """Evaluate a model on the AudioSet eval set; print mAP / ROC / d' (optionally save predictions)."""
    dataset_dir = resolve_dataset_dir(config.data.dataset_dir, DATASET_ENV, [EVAL_FILE])
    # evaluation needs no class names and no teacher
    task = audioset_task(dist, distillation_loss_fn(config.optim.mixup_alpha, args.kd_lambda, None), names=[])
    loaded = model_to_evaluate(args, config, dist)
    model, frontend, title = loaded.model, loaded.frontend, loaded.name
    # the original evaluates under fp16 autocast on CUDA
    precision = config.run.precision or ("fp16" if dist.device.type == "cuda" else "fp32")
    eval_set = AudioSetDataset([dataset_dir / EVAL_FILE], resample_rate=frontend.sr,
                               clip_length=config.data.clip_length, bad_rows="mask", in_mem=args.in_mem)
    evaluation = replace(config, run=replace(config.run, precision=precision))
    logits, targets, _ = predict(model, frontend, eval_set, task, evaluation, dist)
    bad_rows = set(gather_cat(torch.from_numpy(eval_set.bad_indices()), dist).tolist())
    if not dist.is_main:
        return
    metrics = multilabel_metrics(targets.numpy(), logits.numpy())
    print(f"Results on AudioSet test split for loaded model: {title}")
    print(format_tagging_results(metrics))
    if bad_rows:
        print(f"  ({len(bad_rows)} unusable clips left out)")
    if metrics["ap_classes"] < targets.shape[1]:
        print(f"  ({metrics['ap_classes']} of {targets.shape[1]} classes have positive clips and "
              f"count in mAP, {metrics['roc_classes']} in ROC)")
    if args.save_predictions:  # after printing: a failing write loses no results
        names = [n for i, n in enumerate(eval_set.names()) if i not in bad_rows]
        with atomic_write(args.save_predictions, "wb") as f:
            np.savez(f, names=np.array(names), logits=logits.numpy(), targets=targets.numpy())


if __name__ == "__main__":
    sys.exit(run_cli(main))
