"""Checkpoint files of the training scripts: atomic saving, checked loading, and rebuilding the
model a checkpoint describes without the command line (`load_finetuned`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from common.errors import InputError
from common.files import atomic_write
from models.factory import model_from_config

CHECKPOINT_FORMAT = "efficientat-training-checkpoint"


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """torch.save `state` atomically (common.files.atomic_write): a crash never leaves a
    half-written checkpoint."""
    with atomic_write(path, "wb") as f:
        torch.save(dict(state), f)


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU; InputError naming the file if it is missing or not a
    torch checkpoint. With mmap=True tensors are only read when used (cheap for reading settings)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for foreign or truncated files
        raise InputError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unknown error'})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: checkpoint holds a {type(state).__name__}, expected a dict")
    return state


def plain(value: Any) -> Any:
    """Config values reduced to types that load with weights_only=True (paths -> str)."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def load_finetuned(checkpoint_path: str | os.PathLike, state: Optional[dict[str, Any]] = None,
                   probe_beside: bool = False) -> tuple[nn.Module, dict[str, Any], list[str], bool]:
    """(model in eval mode, frontend keyword arguments, class names, multilabel) of a checkpoint
    written by a training script (`training_state`), rebuilt from the configuration stored in it:
    no command line and no download needed. Apply sigmoid to the logits of multi-label models and
    softmax to those of single-label ones (checkpoints without the flag count as multi-label, like
    AudioSet's). `state`: the checkpoint's contents when the caller has already loaded them.
    A probe checkpoint whose probe lives beside the model (`layer:N` features) is an InputError
    unless `probe_beside` (the training scripts evaluate it themselves)."""
    if state is None:
        state = load_checkpoint(checkpoint_path)
    missing = [k for k in ("model", "model_config", "frontend_config", "class_names") if k not in state]
    if missing:
        raise InputError(f"{checkpoint_path}: not a checkpoint of a training script (no "
                         f"{', '.join(missing)}); released models are loaded by name")
    if state.get("probe", {}).get("in_model") is False and not probe_beside:
        raise InputError(f"{checkpoint_path}: its linear probe reads features of an inner layer, which the "
                         "model's head does not compute; evaluate it with the training script's --checkpoint")
    model = model_from_config(state["model_config"], load_pretrained=False, epoch=state.get("epoch"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise InputError(f"{checkpoint_path}: weights do not fit the stored model configuration "
                         f"({str(e).splitlines()[0]})") from None
    return (model.eval(), dict(state["frontend_config"]), list(state["class_names"]),
            bool(state.get("multilabel", True)))
