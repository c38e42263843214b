"""Ensembles of released models: the members' raw logits are averaged."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from models.factory import create_model, frontend_kwargs


class EnsembleModel(nn.Module):
    """Runs every member on the same spectrogram and averages their logits. Returns the average
    in both output slots (logits, logits), as the original ensemble does."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = nn.ModuleList(models)
        self.num_classes = models[0].num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.stack([m(x)[0] for m in self.models]).mean(dim=0)
        return logits, logits


def ensemble_frontend_kwargs(model_names: Sequence[str]) -> dict[str, Any]:
    """The frontend settings shared by all members; ValueError if two members need different ones."""
    settings = {name: frontend_kwargs(name) for name in model_names}
    first = model_names[0]
    for name, kw in settings.items():
        if kw != settings[first]:
            diff = ", ".join(f"{k}: {settings[first][k]} vs {kw[k]}" for k in kw if kw[k] != settings[first][k])
            raise ValueError(f"ensemble members {first!r} and {name!r} need different frontends ({diff}); "
                             "ensemble only models trained on the same spectrograms")
    return settings[first]


def get_ensemble_model(model_names: Sequence[str]) -> EnsembleModel:
    """An ensemble of the named released models (MN or DyMN, any variant) with their weights.
    All members must use the same frontend settings (see `ensemble_frontend_kwargs`)."""
    model_names = list(model_names)
    if not model_names:
        raise ValueError("an ensemble needs at least one model name")
    ensemble_frontend_kwargs(model_names)
    return EnsembleModel([create_model(name) for name in model_names])
