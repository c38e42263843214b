"""Checkpoint files of the training scripts: atomic saving, checked loading, and rebuilding the
model a checkpoint describes without the command line (`load_finetuned`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Mapping, Optional

import torch
from torch import nn

from common.errors import InputError
from common.files import atomic_write
from models.factory import FAMILIES, model_from_config
from models.weights import load_weights

CHECKPOINT_FORMAT = "efficientat-training-checkpoint"


class _WriteErrors:
    """A binary file for torch.save that keeps the OSError a write raised: torch's writer turns it
    into "unexpected pos" (a full disk would read as a torch bug)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """torch.save `state` atomically (common.files.atomic_write): a crash never leaves a
    half-written checkpoint, and a failed write (a full disk) is raised as its OSError."""
    with atomic_write(path, "wb") as f:
        writer = _WriteErrors(f)
        try:
            torch.save(dict(state), writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


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


@dataclass
class RunRecord:
    """The one checkpoint record of a training run (last.pt, best.pt, a probe's best.pt): written
    by `save_run_record`, read by `read_run_record` / `RunRecord.from_state`. `model` is the
    state dict; model_config, frontend_config and class_names rebuild the model without the
    command line; `config` holds the run's arguments. A resumable record also has `format`,
    `epoch` (0-based, completed), `seed`, the optimizer / scheduler / scaler states, `best` (epoch
    and metrics of the best epoch so far), `log` (the epoch's metrics.jsonl values),
    `epoch_weights` (the file name of the epoch's weights) and `stale_weights` (the previous
    epoch's, which this run wrote and deletes). A probe recipe's adds
    `recipe` and `probe` (its settings)."""
    model: dict[str, Any]
    model_config: dict[str, Any]
    frontend_config: dict[str, Any]
    class_names: list[str]
    multilabel: bool = True
    task: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    epoch: Optional[int] = None
    seed: Optional[int] = None
    format: Optional[str] = None
    optimizer: Optional[dict[str, Any]] = None
    scheduler: Optional[dict[str, Any]] = None
    scaler: Optional[dict[str, Any]] = None
    best: Optional[dict[str, Any]] = None
    log: Optional[dict[str, Any]] = None
    epoch_weights: Optional[str] = None
    stale_weights: Optional[str] = None
    recipe: Optional[str] = None
    probe: Optional[dict[str, Any]] = None

    REQUIRED = ("model", "model_config", "frontend_config", "class_names")

    @classmethod
    def from_state(cls, state: Mapping[str, Any], path: str | os.PathLike) -> "RunRecord":
        """The record of a loaded checkpoint dict; InputError naming `path` when it is not one of
        a training script (a released model's bare state dict)."""
        missing = [k for k in cls.REQUIRED if k not in state]
        if missing:
            raise InputError(f"{path}: not a checkpoint of a training script (no "
                             f"{', '.join(missing)}); released models are loaded by name")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})

    @property
    def resumable(self) -> bool:
        """Whether the record holds the optimizer state a run resumes from."""
        return self.format == CHECKPOINT_FORMAT and self.optimizer is not None

    def to_state(self) -> dict[str, Any]:
        """The checkpoint dict (plain values, so it loads with weights_only=True)."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}  # tensors as they are
        for key in ("model_config", "frontend_config", "metrics", "config", "best", "log", "probe"):
            state[key] = plain(state[key])
        return {k: v for k, v in state.items() if v is not None}


def is_run_record(state: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint dict is a `RunRecord` (not a bare state dict)."""
    return all(k in state for k in RunRecord.REQUIRED)


def save_run_record(path: str | os.PathLike, record: RunRecord) -> None:
    """Write `record` atomically (`save_checkpoint`)."""
    save_checkpoint(path, record.to_state())


def read_run_record(path: str | os.PathLike, mmap: bool = False) -> RunRecord:
    """The `RunRecord` at `path`; InputError naming the file if it is missing, unreadable or not one."""
    return RunRecord.from_state(load_checkpoint(path, mmap=mmap), path)


def load_finetuned(checkpoint_path: str | os.PathLike, state: Optional[dict[str, Any]] = None,
                   probe_beside: bool = False) -> tuple[nn.Module, dict[str, Any], list[str], bool]:
    """(model in eval mode, frontend keyword arguments, class names, multilabel) of a checkpoint
    written by a training script (a `RunRecord`), rebuilt from the configuration stored in it:
    no command line and no download needed. Apply sigmoid to the logits of multi-label models and
    softmax to those of single-label ones (checkpoints without the flag count as multi-label, like
    AudioSet's). `state`: the checkpoint's contents when the caller has already loaded them.
    A probe checkpoint whose probe lives beside the model (`layer:N` features) is an InputError
    unless `probe_beside` (the training scripts evaluate it themselves)."""
    record = RunRecord.from_state(load_checkpoint(checkpoint_path) if state is None else state, checkpoint_path)
    if (record.probe or {}).get("in_model") is False and not probe_beside:
        raise InputError(f"{checkpoint_path}: its linear probe reads features of an inner layer, which the "
                         "model's head does not compute; evaluate it with the training script's --checkpoint")
    model = model_from_config(record.model_config, load_pretrained=False, epoch=record.epoch)
    try:
        load_weights(model, record.model, str(checkpoint_path), "the model configuration stored in it")
    except ValueError as e:
        raise InputError(str(e)) from None
    return model.eval(), dict(record.frontend_config), list(record.class_names), bool(record.multilabel)


def model_from_weights(state: Mapping[str, Any], config: Mapping[str, Any], source: str | os.PathLike,
                       what: str) -> nn.Module:
    """The model a `models.factory.model_config` dict describes, with the weights of a bare state
    dict `state` read from `source` (`models.weights.load_weights`: their class count wins), in eval
    mode and run as trained weights run: the family's `pretrained_defaults` (DyMN's final softmax
    temperature) over the configuration. InputError naming `source` and `what` when they do not fit."""
    model = model_from_config({**config, **FAMILIES[config["family"]].pretrained_defaults}, load_pretrained=False)
    try:
        load_weights(model, state, str(source), what)
    except ValueError as e:
        raise InputError(str(e)) from None
    return model.eval()
