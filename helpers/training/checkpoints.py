"""Training checkpoints: the state that resumes a run exactly (and rebuilds its model), and the
original's per-epoch weight files."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from common.errors import InputError
from common.files import check_output, lock_folder, remove_stale_temporaries
from helpers.training.distributed import unwrap
from helpers.training.precision import Precision
from models.checkpoint import CHECKPOINT_FORMAT, RunRecord, plain, read_run_record, save_checkpoint
from models.factory import get_family

logger = logging.getLogger(__name__)

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")
# settings the optimizer and schedule state of a checkpoint were made with (resuming with other
# values would keep the old ones while recording the new ones), and those that change the data
# or the steps of the epochs still to come
RESUME_FIXED = ("lr", "weight_decay", "adamw", "warm_up_len", "ramp_down_start", "ramp_down_len",
                "last_lr_value", "clip_length", "mixup_alpha", "batch_size")


def prepare_run_folder(out_dir: Path, resume: Optional[str], overwrite: bool, is_main: bool) -> None:
    """Before a run starts in `out_dir`: the main process takes the folder's lock
    (common.files.lock_folder: a second run into it stops, naming the first one's pid). InputError
    if the folder holds an earlier run and neither --resume nor --overwrite was given (nothing is
    touched), or if it cannot be written. With --overwrite the earlier run's files are deleted
    (the run files and the epoch weights its last.pt names; nothing else); temporary files
    that killed saves of this project left behind are removed."""
    check_output(out_dir / RUN_FILES[0], "--out_dir")
    if is_main:
        lock_folder(out_dir, "training run")
    earlier = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if earlier and not resume and not overwrite:
        raise InputError(f"{out_dir} already holds a run ({', '.join(p.name for p in earlier)}): continue it "
                         "with --resume, or start over with --overwrite (deletes it) or another --out_dir")
    if not is_main:
        return
    if overwrite and earlier:
        for path in _epoch_weights_of(out_dir / "last.pt") + earlier:
            path.unlink(missing_ok=True)
        logger.info("--overwrite: deleted the earlier run in %s", out_dir)
    for tmp in remove_stale_temporaries(out_dir):
        logger.info("removed %s, left by an interrupted save", tmp)


def _epoch_weights_of(last: Path) -> list[Path]:
    """The epoch weight files the run of checkpoint `last` wrote and kept (none if unreadable)."""
    try:
        record = read_run_record(last, mmap=True)
    except InputError:
        return []
    return [last.parent / name for name in (record.epoch_weights, record.stale_weights) if name]


def check_resumable(record: RunRecord, path: Path, flags: Mapping[str, Any], model_config: Mapping[str, Any],
                    class_names: Sequence[str]) -> None:
    """InputError naming what differs unless the run of checkpoint `record` (at `path`) had this
    model, these classes and these optimizer / schedule / data settings (RESUME_FIXED, of the parsed
    `flags`); the number
    of epochs may grow."""
    if record.model_config != plain(dict(model_config)):
        theirs = record.model_config or {}
        diff = ", ".join(f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in plain(dict(model_config)).items()
                         if theirs.get(k) != v)
        raise InputError(f"{path}: --resume needs the run's model, which had {diff or 'another configuration'}")
    if list(record.class_names) != list(class_names):
        raise InputError(f"{path}: --resume needs the run's classes; {_class_difference(record.class_names, class_names)}")
    changed = [f"--{k} {record.config[k]!r} (now {flags[k]!r})" for k in RESUME_FIXED
               if k in record.config and k in flags and record.config[k] != plain(flags[k])]
    if changed:
        raise InputError(f"{path}: the run was trained with {', '.join(changed)}; a resumed run keeps its "
                         "optimizer, schedule and data settings: drop those flags, or start over with --overwrite")


def _class_difference(theirs: Sequence[str], ours: Sequence[str], shown: int = 3) -> str:
    """What differs between the run's class names and these, naming a few."""
    gone, new = [c for c in theirs if c not in ours], [c for c in ours if c not in theirs]
    if not gone and not new:
        return f"the {len(ours)} classes are the same but in another order"
    def names(values: list[str]) -> str:
        return ", ".join(values[:shown]) + (f" and {len(values) - shown} more" if len(values) > shown else "")
    parts = ([f"it had {names(gone)}"] if gone else []) + ([f"not {names(new)}"] if new else [])
    return "; ".join(parts)


def training_record(model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, precision: Precision,
                    epoch: int, seed: int, config: Mapping[str, Any], model_config: Mapping[str, Any],
                    frontend_config: Mapping[str, Any], class_names: Sequence[str],
                    metrics: Optional[Mapping[str, float]] = None, **fields: Any) -> RunRecord:
    """The run record written after `epoch` (0-based, completed): everything needed to resume
    exactly (model, optimizer, scheduler, scaler, epoch, seed; samplers and RNGs are functions of
    seed and epoch) and to rebuild the model without the command line (model_config,
    frontend_config, class_names); `fields`: the other RunRecord fields (multilabel, task, best, ...)."""
    return RunRecord(model=unwrap(model).state_dict(), model_config=plain(dict(model_config)),
                     frontend_config=plain(dict(frontend_config)), class_names=list(class_names),
                     metrics=plain(dict(metrics or {})), config=plain(dict(config)), epoch=epoch, seed=seed,
                     format=CHECKPOINT_FORMAT, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=precision.state_dict(), **fields)


def restore_training_state(record: RunRecord, model: nn.Module,
                           optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler,
                           precision: Precision, seed: int) -> int:
    """Load a `training_record` into the objects; returns the epoch to start from. The run must
    continue with the seed it was started with (epoch randomness derives from it)."""
    if not record.resumable:
        raise InputError("checkpoint is not a training checkpoint of this project (no optimizer "
                         "state to resume from)")
    if record.seed != seed:
        raise InputError(f"checkpoint was trained with --seed {record.seed}, not {seed}")
    unwrap(model).load_state_dict(record.model)
    optimizer.load_state_dict(record.optimizer)
    scheduler.load_state_dict(record.scheduler)
    precision.load_state_dict(record.scaler)
    return int(record.epoch) + 1


def epoch_weights_name(model_config: Mapping[str, Any], task: str, epoch: int, metric: str, value: float) -> str:
    """The original's per-epoch file name of the model `model_config` describes, e.g.
    mn10_as_epoch_5_mAP_450.pt (its family's weight-file prefix and width, task, epoch, metric x
    1000; a non-finite value is written as nan)."""
    score = round(value * 1000) if math.isfinite(value) else "nan"
    prefix = get_family(model_config["family"]).weights_prefix
    width = str(model_config.get("width_mult", 1.0)).replace(".", "")
    return f"{prefix}{width}_{task}_epoch_{epoch}_{metric}_{score}.pt"


def save_epoch_weights(out_dir: Path, record: RunRecord, only_if_missing: bool = False) -> None:
    """Write the model's state dict of `record` as its `epoch_weights` file (`only_if_missing`:
    when a resume finishes an epoch's commit) and delete its `stale_weights` file, the previous
    epoch's that this run wrote: only the latest is kept, as the original does, and no file of
    another run is ever deleted."""
    path = out_dir / record.epoch_weights
    if not (only_if_missing and path.is_file()):
        save_checkpoint(path, record.model)
    if record.stale_weights and record.stale_weights != record.epoch_weights:
        (out_dir / record.stale_weights).unlink(missing_ok=True)
