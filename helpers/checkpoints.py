"""Models for fine-tuning, described by a small configuration dict that travels inside every
checkpoint, so a fine-tuned model can be rebuilt (and used for tagging) without the command line
that trained it.

A fine-tuned checkpoint is one dict: "model" (state dict), "model_config" (see `build_model`),
"frontend" (AugmentMelSTFT keyword arguments), "class_names", "multilabel", plus whatever the
training script adds (task, epoch, metrics, args, optimizer state).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from models import pretrained as registry
from models.dymn.dy_block import DynamicConv
from models.dymn.model import get_model as get_dymn
from models.mn.model import get_model as get_mn

REQUIRED_KEYS = ("model", "model_config", "frontend", "class_names", "multilabel")


class CheckpointError(ValueError):
    """A file is not a usable fine-tuned checkpoint; the message names the file."""


def build_model(num_classes: int, model_name: Optional[str] = None, pretrained: bool = False,
                width_mult: Optional[float] = None, head_type: Optional[str] = None,
                se_dims: str = "c", strides: Optional[Sequence[int]] = None,
                pretrain_final_temp: float = 1.0) -> tuple[nn.Module, dict[str, Any]]:
    """An MN or DyMN with `num_classes` outputs and its configuration dict.

    The family is DyMN for names starting with "dymn", MN otherwise. With `pretrained` the released
    weights of `model_name` are loaded (a different class count replaces the final classifier
    layer) and width, head and strides come from the registry; arguments left at None take the
    registry's or the architecture's defaults. Without it the model starts from scratch with
    `width_mult` (default 1.0)."""
    if pretrained and not model_name:
        raise ValueError("--pretrained needs a --model_name from the registry")
    family = registry.get_entry(model_name).family if pretrained else (
        "dymn" if model_name and model_name.startswith("dymn") else "mn")
    arch: dict[str, Any] = {"width_mult": None if pretrained else (width_mult or 1.0),
                            "strides": None if strides is None else tuple(strides), "head_type": head_type}
    if family == "dymn":
        arch["use_dy_blocks"] = None
    if pretrained:
        arch = registry.resolve_model_kwargs(registry.get_entry(model_name), arch)
    arch = {"width_mult": 1.0, "strides": (2, 2, 2, 2), "head_type": "mlp", "use_dy_blocks": "all",
            **{k: v for k, v in arch.items() if v is not None}}
    if family == "mn":
        arch.pop("use_dy_blocks")
        arch["se_dims"] = se_dims
        model = get_mn(num_classes=num_classes, pretrained_name=model_name if pretrained else None, **arch)
    else:
        model = get_dymn(num_classes=num_classes, pretrained_name=model_name if pretrained else None,
                         pretrain_final_temp=pretrain_final_temp, **arch)
    arch["strides"] = list(arch["strides"])
    config = {"family": family, "name": model_name, "pretrained": pretrained, "num_classes": num_classes,
              "kwargs": arch}
    return model, config


def model_config_for_saving(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """`config` plus the state a state dict does not hold: the DyMN softmax temperature."""
    temps = [m.temperature for m in model.modules() if isinstance(m, DynamicConv)]
    return {**config, "dymn_temperature": float(temps[0])} if temps else dict(config)


def rebuild_model(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """The model described by a saved configuration, with `state_dict` loaded strictly, in eval mode.
    Needs no download: the architecture comes from the configuration alone."""
    kwargs = dict(config["kwargs"])
    build = get_dymn if config["family"] == "dymn" else get_mn
    model = build(num_classes=config["num_classes"], **kwargs)
    model.load_state_dict(state_dict)
    for m in model.modules():
        if isinstance(m, DynamicConv):
            m.temperature = config.get("dymn_temperature", 1.0)
    return model.eval()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The dict stored in a fine-tuned checkpoint, checked for the keys that rebuild the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, Mapping) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a fine-tuned EfficientAT checkpoint (missing "
                              f"{', '.join(missing)}); released AudioSet weights are used by name")
    return dict(ckpt)


def load_finetuned(checkpoint_path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any], list[str], bool]:
    """(model in eval mode, frontend keyword arguments, class names, multilabel) of a checkpoint
    written by one of the fine-tuning scripts. Apply sigmoid to the logits of multi-label models
    and softmax to those of single-label ones."""
    ckpt = read_checkpoint(checkpoint_path)
    try:
        model = rebuild_model(ckpt["model_config"], ckpt["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{checkpoint_path}: weights do not fit the saved model configuration "
                              f"({str(e).splitlines()[0]})") from None
    return model, dict(ckpt["frontend"]), list(ckpt["class_names"]), bool(ckpt["multilabel"])
