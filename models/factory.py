"""Build any registered model, and the frontend it was trained with, from its name."""
from __future__ import annotations

from typing import Any

from torch import nn

from models.dymn.model import get_model as get_dymn
from models.mn.model import get_model as get_mn
from models.preprocess import AugmentMelSTFT
from models.pretrained import get_entry

FRONTEND_DEFAULTS = {"n_mels": 128, "sr": 32000, "win_length": 800, "hopsize": 320, "n_fft": 1024}


def create_model(name: str, num_classes: int = 527, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """The model `name` (MN or DyMN) with its released weights, in train mode like any new module.

    With pretrained=False the same architecture (the registry's model arguments, where `kwargs`
    that are not None override them) is built with fresh weights and nothing is downloaded, e.g.
    for complexity analysis or training from scratch."""
    entry = get_entry(name)
    build = get_dymn if entry.family == "dymn" else get_mn
    if pretrained:
        return build(num_classes=num_classes, pretrained_name=name, **kwargs)
    arch = {**entry.model_kwargs, **{k: v for k, v in kwargs.items() if v is not None}}
    return build(num_classes=num_classes, **arch)


def frontend_kwargs(name: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Frontend settings for model `name` (registry values over the defaults); overrides that are
    not None win."""
    settings = dict(FRONTEND_DEFAULTS)
    if name is not None:
        settings.update(get_entry(name).frontend_kwargs)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def create_frontend(name: str | None = None, **overrides: Any) -> AugmentMelSTFT:
    """The eval-mode frontend model `name` was trained with; see `frontend_kwargs`."""
    return AugmentMelSTFT(**frontend_kwargs(name, **overrides)).eval()
