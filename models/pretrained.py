"""The one registry of released EfficientAT checkpoints.

Each name maps to its file and URL, the model arguments the checkpoint needs (width, head,
strides, DyMN block layout), the frontend arguments it was trained with (n_mels, hop size), and the
published figures (AudioSet mAP in percent, parameters in millions, MACs in billions). Scripts,
the ensemble, complexity analysis and plots all read this table.
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from common.download import cached_file
from models.weights import load_weights

logger = logging.getLogger(__name__)

RELEASE_URL = "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/"

NAME_TO_WIDTH = {
    "mn01": 0.1, "mn02": 0.2, "mn04": 0.4, "mn05": 0.5, "mn06": 0.6, "mn08": 0.8, "mn10": 1.0,
    "mn12": 1.2, "mn14": 1.4, "mn16": 1.6, "mn20": 2.0, "mn30": 3.0, "mn40": 4.0,
    "dymn04": 0.4, "dymn10": 1.0, "dymn20": 2.0,
}


def name_to_width(name: Optional[str]) -> float:
    """Width multiplier encoded in a model name ("mn04_as" -> 0.4); 1.0 for unknown prefixes."""
    if not name:
        return 1.0
    prefixes = [prefix for prefix in NAME_TO_WIDTH if name.startswith(prefix)]
    return NAME_TO_WIDTH[max(prefixes, key=len)] if prefixes else 1.0


@dataclass(frozen=True)
class PretrainedEntry:
    name: str
    filename: str
    family: str = "mn"  # "mn" or "dymn"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    frontend_kwargs: dict[str, Any] = field(default_factory=dict)
    map: Optional[float] = None  # published AudioSet eval mAP, percent
    params_m: Optional[float] = None  # published parameter count, millions
    macs_g: Optional[float] = None  # published MACs for a 10-s clip, billions
    sha256: Optional[str] = None
    description: str = ""

    @property
    def url(self) -> str:
        return RELEASE_URL + self.filename

    @property
    def audioset(self) -> bool:
        """True for AudioSet-trained taggers (527 meaningful outputs); False for ImageNet inits."""
        return "_as" in self.name


def _mn(name: str, filename: str, map_: Optional[float] = None, params: Optional[float] = None,
        macs: Optional[float] = None, description: str = "", frontend: Optional[dict] = None,
        **model_kwargs: Any) -> PretrainedEntry:
    kwargs = {"width_mult": name_to_width(name), "head_type": "mlp", "strides": (2, 2, 2, 2)}
    kwargs.update(model_kwargs)
    return PretrainedEntry(name, filename, "mn", kwargs, frontend or {}, map_, params, macs,
                           description=description)


def _dymn(name: str, filename: str, map_: Optional[float] = None, params: Optional[float] = None,
          macs: Optional[float] = None, description: str = "", **model_kwargs: Any) -> PretrainedEntry:
    kwargs = {"width_mult": name_to_width(name), "strides": (2, 2, 2, 2), "use_dy_blocks": "all"}
    kwargs.update(model_kwargs)
    return PretrainedEntry(name, filename, "dymn", kwargs, {}, map_, params, macs,
                           description=description)


_FC = {"head_type": "fully_convolutional"}
_ENTRIES = [
    # MN on AudioSet (README figures where the README has them)
    _mn("mn01_as", "mn01_as_mAP_298.pt", 29.8, 0.124, 0.018),
    _mn("mn02_as", "mn02_as_mAP_378.pt", 37.8, 0.325, 0.040),
    _mn("mn04_as", "mn04_as_mAP_432.pt", 43.2, 0.983, 0.11),
    _mn("mn05_as", "mn05_as_mAP_443.pt", 44.3, 1.43, 0.16),
    _mn("mn10_as", "mn10_as_mAP_471.pt", 47.1, 4.88, 0.54),
    _mn("mn20_as", "mn20_as_mAP_478.pt", 47.8, 17.91, 2.06),
    _mn("mn30_as", "mn30_as_mAP_482.pt", 48.2, 39.09, 4.55),
    _mn("mn40_as", "mn40_as_mAP_484.pt", 48.4, 68.43, 8.03),
    _mn("mn40_as(2)", "mn40_as_mAP_483.pt", 48.3, 68.43, 8.03, "second mn40_as run (ensemble member)"),
    _mn("mn40_as(3)", "mn40_as_mAP_483(2).pt", 48.3, 68.43, 8.03, "third mn40_as run (ensemble member)"),
    _mn("mn40_as_ext", "mn40_as_ext_mAP_487.pt", 48.7, 68.43, 8.03, "extended training (300 epochs)"),
    _mn("mn40_as_ext(2)", "mn40_as_ext_mAP_486.pt", 48.6, 68.43, 8.03, "extended training, second run"),
    _mn("mn40_as_ext(3)", "mn40_as_ext_mAP_485.pt", 48.5, 68.43, 8.03, "extended training, third run"),
    _mn("mn40_as_no_im_pre", "mn40_as_no_im_pre_mAP_483.pt", 48.3, 68.43, 8.03, "no ImageNet pre-training"),
    _mn("mn40_as_no_im_pre(2)", "mn40_as_no_im_pre_mAP_483(2).pt", 48.3, 68.43, 8.03,
        "no ImageNet pre-training, second run"),
    _mn("mn40_as_no_im_pre(3)", "mn40_as_no_im_pre_mAP_482.pt", 48.2, 68.43, 8.03,
        "no ImageNet pre-training, third run"),
    _mn("mn10_as_hop_5", "mn10_as_hop_5_mAP_475.pt", 47.5, 4.88, None, "hop 5 ms", {"hopsize": 160}),
    _mn("mn10_as_hop_15", "mn10_as_hop_15_mAP_463.pt", 46.3, 4.88, 0.36, "hop 15 ms", {"hopsize": 480}),
    _mn("mn10_as_hop_20", "mn10_as_hop_20_mAP_456.pt", 45.6, 4.88, 0.27, "hop 20 ms", {"hopsize": 640}),
    _mn("mn10_as_hop_25", "mn10_as_hop_25_mAP_447.pt", 44.7, 4.88, 0.22, "hop 25 ms", {"hopsize": 800}),
    _mn("mn10_as_mels_40", "mn10_as_mels_40_mAP_453.pt", 45.3, 4.88, 0.21, "40 mel bands", {"n_mels": 40}),
    _mn("mn10_as_mels_64", "mn10_as_mels_64_mAP_461.pt", 46.1, 4.88, 0.27, "64 mel bands", {"n_mels": 64}),
    _mn("mn10_as_mels_256", "mn10_as_mels_256_mAP_474.pt", 47.4, 4.88, 1.08, "256 mel bands",
        {"n_mels": 256}),
    _mn("mn10_as_fc", "mn10_as_fc_mAP_465.pt", 46.5, None, None, "fully convolutional head", **_FC),
    _mn("mn10_as_fc_s2221", "mn10_as_fc_s2221_mAP_466.pt", 46.6, None, None,
        "fully convolutional head, strides 2,2,2,1", strides=(2, 2, 2, 1), **_FC),
    _mn("mn10_as_fc_s2211", "mn10_as_fc_s2211_mAP_466.pt", 46.6, None, None,
        "fully convolutional head, strides 2,2,1,1", strides=(2, 2, 1, 1), **_FC),
    # MN ImageNet initializations (classifier not trained on AudioSet)
    _mn("mn10_im_pytorch", "mn10_im_pytorch.pt", description="torchvision ImageNet weights, random classifier"),
    *[_mn(f"mn{w}_im", f"mn{w}_im.pt", description="ImageNet initialization")
      for w in ("01", "02", "04", "05", "10", "20", "30", "40")],
    # DyMN
    *[_dymn(f"dymn{w}_im", f"dymn{w}_im.pt", description="ImageNet initialization") for w in ("04", "10", "20")],
    _dymn("dymn04_as", "dymn04_as.pt", 45.0, 1.97, 0.12),
    _dymn("dymn10_as", "dymn10_as.pt", 47.7, 10.57, 0.58),
    _dymn("dymn20_as", "dymn20_as_mAP_493.pt", 49.3, 40.02, 2.2),
    _dymn("dymn20_as(1)", "dymn20_as.pt", 49.1, 40.02, 2.2, "previous default dymn20_as file"),
    _dymn("dymn20_as(2)", "dymn20_as_mAP_489.pt", 48.9, 40.02, 2.2),
    _dymn("dymn20_as(3)", "dymn20_as_mAP_490.pt", 49.0, 40.02, 2.2),
    _dymn("dymn04_replace_se_as", "dymn04_replace_se_as.pt", description="dynamic blocks only where MN has SE",
          use_dy_blocks="replace_se"),
    # the original's URL for this file carries a stray leading space; this is the file's real name
    _dymn("dymn10_replace_se_as", "dymn10_replace_se_as.pt", description="dynamic blocks only where MN has SE",
          use_dy_blocks="replace_se"),
]
_KNOWN_SHA256 = {"mn04_as": "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"}

# the model every command and the Python API use unless another is named: its checkpoint ships in
# resources/ (common.download.SHIPPED_DIR), so it needs no network; any other model is downloaded
# once, and only when it is named
DEFAULT_MODEL = "mn04_as"

REGISTRY: dict[str, PretrainedEntry] = {
    e.name: PretrainedEntry(**{**e.__dict__, "sha256": _KNOWN_SHA256.get(e.name)}) for e in _ENTRIES}


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
    """Load checkpoint `name` into `model` (an MN or DyMN built with the checkpoint's architecture)
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
