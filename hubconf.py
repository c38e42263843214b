"""torch.hub entry points: the Python API's `Tagger`, and every released model of the registry by its name.

    tagger = torch.hub.load("fschmid56/EfficientAT", "tagger", "mn10_as")          # helpers/inference/api.py
    model = torch.hub.load("fschmid56/EfficientAT", "mn10_as")                     # from GitHub
    model = torch.hub.load("path/to/clone", "dymn04_as", source="local", num_classes=50)
    model = torch.hub.load("path/to/clone", "mn04_as", source="local", pretrained=False)

`tagger` takes the arguments of `helpers.inference.api.Tagger` (model, device, precision; the model
defaults to the shipped `models.pretrained.DEFAULT_MODEL`, mn04_as).

Each entry point returns the model (MN or DyMN) with the released weights (pretrained=True,
downloaded once into the cache) or fresh weights of the same architecture (pretrained=False);
`num_classes` other than the checkpoint's gives a fresh classifier. The model takes log-mel
spectrograms (B, 1, n_mels, T) from `models.factory.create_frontend(name)` and returns
(logits, embedding). Names that are not Python identifiers ("mn40_as(2)") are reached with
torch.hub.load as well.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from torch import nn

from helpers.inference.api import Tagger
from models.factory import create_model
from models.pretrained import DEFAULT_MODEL, REGISTRY, get_entry

dependencies = ["torch", "numpy", "soxr", "soundfile", "av", "tqdm"]


def tagger(model: str = DEFAULT_MODEL, device: str = "cpu", precision: str = "fp32", **kwargs: Any) -> Tagger:
    """The Python API's Tagger: tag, probabilities, embed, detect (see README, "Python API")."""
    return Tagger(model, device=device, precision=precision, **kwargs)


def _check_num_classes(num_classes: Any) -> None:
    """ValueError unless `num_classes` is a whole number of at least 1."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a whole number of at least 1, got {num_classes!r}")


def _entrypoint(name: str) -> Callable[..., nn.Module]:
    def entrypoint(pretrained: bool = True, num_classes: int = 527, **kwargs: Any) -> nn.Module:
        _check_num_classes(num_classes)
        return create_model(name, num_classes=num_classes, pretrained=pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"{name}: {REGISTRY[name].description or 'released EfficientAT model'}."
    return entrypoint


globals().update({name: _entrypoint(name) for name in REGISTRY})


def __dir__() -> list[str]:
    """The module's names. torch.hub.load looks a name up with `name in dir(hubconf)` and answers
    an unknown one with "Cannot find callable"; the name it asks for (its caller's `func_name`) is
    checked here first, so an unknown one gets the registry's close matches, as on the command line."""
    asked = sys._getframe(1).f_locals.get("func_name")
    if isinstance(asked, str) and asked not in globals():
        get_entry(asked)  # ValueError: unknown model name ...; did you mean ...?
    return sorted(globals())
