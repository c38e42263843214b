"""The one state-dict loader: weights into a model, whatever file they come from (a released
checkpoint, a training script's checkpoint, a bare state dict such as the original's epoch files).

The classifier is first sized to the classes the weights have, then every tensor is loaded
strictly; weights that do not fit are one line naming the file and what is missing, unexpected
or differently shaped. How a trained model runs (DyMN's final softmax temperature) is not in a
state dict: `models.factory` builds the model with its family's `pretrained_defaults` for that.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def _mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """'' when `state` has exactly the model's keys and shapes, else the counts and a first example."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    missing = sorted(expected.keys() - given.keys())
    unexpected = sorted(given.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & given.keys() if tuple(expected[k]) != given[k])
    if not (missing or unexpected or reshaped):
        return ""
    first = (f"e.g. missing {missing[0]}" if missing else f"e.g. unexpected {unexpected[0]}" if unexpected
             else f"e.g. {reshaped[0]} is {given[reshaped[0]]}, not {tuple(expected[reshaped[0]])}")
    return (f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} differently shaped tensors; "
            f"{first}")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str,
                 hint: str = "") -> int:
    """Load `state` (a state dict read from `source`) into `model` (an `models.layers.AudioTagger`),
    its classifier first replaced by one for the classes `state` has; returns that class count.
    ValueError `<source> does not fit <what> (<counts>; e.g. ...)<hint>` when the tensors do not
    match the model's exactly (nothing is loaded then)."""
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} does not hold a state dict")
    try:
        num_classes = model.classes_in(dict(state))
    except KeyError:  # no classifier of this architecture: the check below names the missing keys
        num_classes = model.num_classes
    if num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    problem = _mismatch(model, state)
    if problem:
        raise ValueError(f"{source} does not fit {what} ({problem}){hint}")
    model.load_state_dict(dict(state))
    return num_classes
