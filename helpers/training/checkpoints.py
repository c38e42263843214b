"""Training checkpoints: the state that resumes a run exactly (and rebuilds its model), and the
original's per-epoch weight files."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from common.errors import InputError
from common.files import check_output, remove_stale_temporaries
from helpers.training.distributed import unwrap
from helpers.training.precision import Precision
from models.checkpoint import CHECKPOINT_FORMAT, plain, save_checkpoint

logger = logging.getLogger(__name__)

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")
# settings the optimizer and schedule state of a checkpoint were made with: resuming with other
# values would keep the old ones while recording the new ones
RESUME_FIXED = ("lr", "weight_decay", "adamw", "warm_up_len", "ramp_down_start", "ramp_down_len",
                "last_lr_value")


def prepare_run_folder(out_dir: Path, resume: Optional[str], overwrite: bool, is_main: bool) -> None:
    """Before a run starts in `out_dir`: InputError if the folder holds an earlier run and neither
    --resume nor --overwrite was given (nothing is touched), or if it cannot be written. With
    --overwrite the earlier run's files are deleted; temporary files that interrupted saves left
    behind are removed (by the main process)."""
    earlier = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if earlier and not resume and not overwrite:
        raise InputError(f"{out_dir} already holds a run ({', '.join(p.name for p in earlier)}): continue it "
                         "with --resume, or start over with --overwrite (deletes it) or another --out_dir")
    check_output(out_dir / RUN_FILES[0], "--out_dir")
    if not is_main:
        return
    if overwrite:
        for path in earlier + sorted(out_dir.glob("mn*_epoch_*.pt")):
            path.unlink()
        if earlier:
            logger.info("--overwrite: deleted the earlier run in %s", out_dir)
    for tmp in remove_stale_temporaries(out_dir):
        logger.info("removed %s, left by an interrupted save", tmp)


def check_resumable(state: Mapping[str, Any], path: Path, args: Mapping[str, Any], model_config: Mapping[str, Any],
                    class_names: Sequence[str]) -> None:
    """InputError naming what differs unless the run of checkpoint `state` (at `path`) had this
    model, these classes and these optimizer / schedule settings (RESUME_FIXED); the number of
    epochs may grow."""
    if state.get("model_config") != plain(dict(model_config)):
        theirs = state.get("model_config") or {}
        diff = ", ".join(f"{k} {theirs.get(k)!r} (now {v!r})" for k, v in plain(dict(model_config)).items()
                         if theirs.get(k) != v)
        raise InputError(f"{path}: --resume needs the run's model, which had {diff or 'another configuration'}")
    if list(state.get("class_names") or []) != list(class_names):
        raise InputError(f"{path}: --resume needs the run's classes ({len(state.get('class_names') or [])}), "
                         f"not these {len(class_names)}")
    config = state.get("config") or {}
    changed = [f"--{k} {config[k]!r} (now {args[k]!r})" for k in RESUME_FIXED
               if k in config and k in args and config[k] != plain(args[k])]
    if changed:
        raise InputError(f"{path}: the run was trained with {', '.join(changed)}; a resumed run keeps its "
                         "optimizer and schedule settings: drop those flags, or start over with --overwrite")


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, precision: Precision,
                   epoch: int, seed: int, config: Mapping[str, Any], model_config: Mapping[str, Any],
                   frontend_config: Mapping[str, Any], class_names: Sequence[str],
                   metrics: Optional[Mapping[str, float]] = None) -> dict[str, Any]:
    """The checkpoint dict written after `epoch` (0-based, completed): everything needed to resume
    exactly (model, optimizer, scheduler, scaler, epoch, seed; samplers and RNGs are functions of
    seed and epoch) and to rebuild the model without the command line (model_config,
    frontend_config, class_names)."""
    return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "seed": seed,
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": precision.state_dict(),
            "config": plain(dict(config)), "model_config": plain(dict(model_config)),
            "frontend_config": plain(dict(frontend_config)), "class_names": list(class_names),
            "metrics": plain(dict(metrics or {}))}


def restore_training_state(state: Mapping[str, Any], model: nn.Module,
                           optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler,
                           precision: Precision, seed: int) -> int:
    """Load a `training_state` checkpoint into the objects; returns the epoch to start from. The
    run must continue with the seed it was started with (epoch randomness derives from it)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError("checkpoint is not a training checkpoint of this project (no optimizer "
                         "state to resume from)")
    if state["seed"] != seed:
        raise InputError(f"checkpoint was trained with --seed {state['seed']}, not {seed}")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    precision.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1


def save_epoch_weights(out_dir: Path, model: nn.Module, width: float, task: str, epoch: int, metric: str,
                       value: float) -> Path:
    """Save the model's state dict under the original's per-epoch name (e.g.
    mn10_as_epoch_5_mAP_450.pt: width, task, epoch, metric x 1000) and delete the file of the
    previous epoch, so only the latest is kept, as the original does."""
    path = out_dir / f"mn{str(width).replace('.', '')}_{task}_epoch_{epoch}_{metric}_{round(value * 1000)}.pt"
    save_checkpoint(path, unwrap(model).state_dict())
    for old in out_dir.glob(f"mn*_{task}_epoch_*_{metric}_*.pt"):
        if old != path:
            old.unlink()
    return path
