"""Training checkpoints: the state that resumes a run exactly (and rebuilds its model), and the
original's per-epoch weight files."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from helpers.common.errors import InputError
from helpers.training.distributed import unwrap
from helpers.training.precision import Precision
from models.checkpoint import CHECKPOINT_FORMAT, plain, save_checkpoint


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
