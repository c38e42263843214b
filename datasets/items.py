"""The items every dataset yields, as NamedTuples: fields are read by name (`batch.target`),
items still unpack by position, and `default_collate` batches them into the same type (each
field stacked, names as lists).

    Clip          waveform (1, L) float32, name, target (classes,) float32       ESC-50, DCASE20, custom
    IndexedClip   ... and index: the dataset row, -1 for an undecodable clip   AudioSet, FSD50K
    MaskedClip    ... and mask (classes,): 1 where the label was annotated      OpenMIC
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch


class Clip(NamedTuple):
    waveform: torch.Tensor
    name: str
    target: torch.Tensor


class IndexedClip(NamedTuple):
    waveform: torch.Tensor
    name: str
    target: torch.Tensor
    index: int


class MaskedClip(NamedTuple):
    waveform: torch.Tensor
    name: str
    target: torch.Tensor
    index: int
    mask: torch.Tensor


def is_valid(batch: Any) -> torch.Tensor:
    """Rows of an evaluation batch that hold a decoded clip (index >= 0; all rows of a batch
    without an index field)."""
    index = getattr(batch, "index", None)
    if index is None or callable(index):  # tuple.index is a method
        return torch.ones(len(batch.target), dtype=torch.bool)
    return torch.as_tensor(index) >= 0
