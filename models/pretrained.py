"""The one registry of released checkpoints, and weight loading.

Each name maps to its file and URL, the model arguments the checkpoint needs (width, head,
strides, a family's own arguments), the frontend arguments it was trained with (n_mels, hop
size), and the published figures (AudioSet mAP in percent, parameters in millions, MACs in
billions). The rows live beside their family (`models/<family>/family.py`, `ENTRIES`);
models/families.py assembles REGISTRY from them. Scripts, the ensemble, complexity analysis and
plots all read this table.
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from common.download import cached_file
from models.families import FAMILIES, REGISTRY
from models.family import RELEASE_URL, PretrainedEntry
from models.weights import load_weights

__all__ = ["DEFAULT_MODEL", "NAME_TO_WIDTH", "REGISTRY", "RELEASE_URL", "PretrainedEntry", "checkpoint_path",
           "get_entry", "load_pretrained_weights", "load_state_dict", "name_to_width", "resolve_model_kwargs"]

logger = logging.getLogger(__name__)

# name prefix -> width multiplier, of every family ("mn04" -> 0.4)
NAME_TO_WIDTH = {prefix: width for family in FAMILIES.values() for prefix, width in family.widths.items()}


def name_to_width(name: Optional[str]) -> float:
    """Width multiplier encoded in a model name ("mn04_as" -> 0.4); 1.0 for unknown prefixes."""
    if not name:
        return 1.0
    prefixes = [prefix for prefix in NAME_TO_WIDTH if name.startswith(prefix)]
    return NAME_TO_WIDTH[max(prefixes, key=len)] if prefixes else 1.0


# the model every command and the Python API use unless another is named: its checkpoint ships in
# resources/ (common.download.SHIPPED_DIR), so it needs no network; any other model is downloaded
# once, and only when it is named
DEFAULT_MODEL = "mn04_as"


def get_entry(name: str) -> PretrainedEntry:
    """Registry entry for `name`; unknown names raise ValueError listing the closest names."""
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, REGISTRY, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known names: {', '.join(REGISTRY)}"
        raise ValueError(f"unknown model name {name!r}{hint}") from None


def resolve_model_kwargs(entry: PretrainedEntry, given: dict[str, Any]) -> dict[str, Any]:
    """Fill arguments left at None from the entry; reject explicit values the checkpoint can't take."""
    resolved = dict(given)
    for key, value in given.items():
        required = entry.model_kwargs.get(key)
        if value is None:
            resolved[key] = required
        elif required is not None and (tuple(value) if isinstance(value, (list, tuple)) else value) != required:
            raise ValueError(f"checkpoint {entry.name!r} needs {key}={required!r}, got {value!r}")
    return resolved


def checkpoint_path(name: str, progress: bool = True) -> Path:
    """Local path of a checkpoint, downloaded into the cache on first use."""
    entry = get_entry(name)
    return cached_file(entry.filename, entry.url, sha256=entry.sha256,
                       validate=None if entry.sha256 else _read_state_dict, progress=progress)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        first_line = str(e).splitlines()[0] if str(e) else "unknown error"
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {first_line})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict")
    return dict(state)


def load_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The released state dict of `name` (downloaded on first use), on CPU. A cached file that
    does not load says to delete it."""
    path = checkpoint_path(name)
    try:
        return _read_state_dict(path)
    except ValueError as e:
        raise ValueError(f"{e}; delete it and run again to download {name} anew") from None


def load_pretrained_weights(model: nn.Module, name: str) -> None:
    """Load checkpoint `name` into `model` (an AudioTagger built with the checkpoint's architecture)
    through `models.weights.load_weights` (the classifier sized to the checkpoint's classes, every
    tensor loaded strictly); a model built for another number of classes then gets a fresh
    classifier for it (logged). A cached file that does not fit is not the released one."""
    num_classes = model.num_classes
    ckpt_classes = load_weights(model, load_state_dict(name), str(checkpoint_path(name)), name,
                                hint=": it is not the released file; delete it and run again to download it")
    if ckpt_classes != num_classes:
        replaced = model.reset_classifier(num_classes)
        logger.info("%s: classifier for %d classes replaced by a new one with %d classes (%s re-initialized)",
                    name, ckpt_classes, num_classes, ", ".join(replaced))
