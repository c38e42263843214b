"""Waveform clip helpers and augmentation dataset wrappers shared by all datasets.

Items are the NamedTuples of `datasets.items` (fields `waveform`, `target`, ...); the wrappers
replace the waveform (and, when mixing, the target and mask) and pass every other field through. Random draws use
the torch and NumPy global RNGs, which `helpers.training.seeding.worker_init_fn` seeds per worker.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset


def fit_length(waveform: np.ndarray, length: int, random_crop: bool = False) -> np.ndarray:
    """Zero-pad at the end or cut to exactly `length` samples (last axis): the first samples, or
    a window at a uniform random offset (torch RNG) with `random_crop`."""
    n = waveform.shape[-1]
    if n < length:
        pad = [(0, 0)] * (waveform.ndim - 1) + [(0, length - n)]
        return np.pad(waveform, pad)
    offset = int(torch.randint(n - length + 1, (1,))) if random_crop and n > length else 0
    return waveform[..., offset:offset + length]


def decimate(waveform: np.ndarray, sample_rate: int, resample_rate: int) -> np.ndarray:
    """The original's "resampling" of 32 kHz clips: identity, or keep every 2nd (16 kHz) / 4th
    (8 kHz) sample without filtering. Other rates raise ValueError."""
    step = {sample_rate: 1, sample_rate // 2: 2, sample_rate // 4: 4}.get(resample_rate)
    if step is None or sample_rate != 32000:
        raise ValueError(f"resample_rate must be 32000, 16000 or 8000 for 32 kHz clips, got {resample_rate}")
    return waveform[..., ::step]


def random_gain(waveform: np.ndarray | torch.Tensor, gain_db: int) -> np.ndarray | torch.Tensor:
    """Multiply by 10^(g / 20) with g a uniform integer in [-gain_db, gain_db - 1] dB (torch RNG);
    gain_db 0 returns the waveform unchanged."""
    if gain_db <= 0:
        return waveform
    g = int(torch.randint(2 * gain_db, (1,))) - gain_db
    return waveform * (10.0 ** (g / 20.0))


def _as_tensor(waveform: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(waveform) if not isinstance(waveform, torch.Tensor) else waveform)


class RollDataset(Dataset):
    """Circular time shift of the waveform by an integer uniform in [-shift, shift] samples
    (NumPy RNG; default 4000 = 125 ms at 32 kHz); the waveform becomes a torch tensor."""

    def __init__(self, dataset: Dataset, shift: int = 4000) -> None:
        self.dataset, self.shift = dataset, shift

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        s = int(np.random.randint(-self.shift, self.shift + 1))
        return item._replace(waveform=torch.roll(_as_tensor(item.waveform), s, dims=-1))


class GainDataset(Dataset):
    """`random_gain` as a wrapper, for datasets that apply gain after other wrappers (DCASE20)."""

    def __init__(self, dataset: Dataset, gain_db: int) -> None:
        self.dataset, self.gain_db = dataset, gain_db

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        return item._replace(waveform=random_gain(_as_tensor(item.waveform), self.gain_db))


def mix_targets(a: Any, b: Any, lam: float) -> dict[str, torch.Tensor]:
    """Default target mixing of `WavMixDataset`: target lam * a.target + (1 - lam) * b.target."""
    return {"target": lam * _as_tensor(a.target) + (1.0 - lam) * _as_tensor(b.target)}


class WavMixDataset(Dataset):
    """Waveform mixing: with probability `rate` (torch RNG) mix the item with a uniformly drawn
    second item (torch RNG) with weight l ~ Beta(alpha, alpha) (NumPy RNG) folded to
    max(l, 1 - l); both waveforms and the mixture have their mean removed. `mix_target(item1,
    item2, l)` returns the mixed fields by name (default: the target, lam * y1 + (1 - lam) * y2);
    `prepare_target` (optional) converts every item's target first, mixed or not (e.g. integer
    labels to one-hot). Other fields are those of the first item."""

    def __init__(self, dataset: Dataset, alpha: float = 2.0, rate: float = 0.5,
                 mix_target: Callable[[Any, Any, float], dict[str, Any]] = mix_targets,
                 prepare_target: Optional[Callable[[Any], Any]] = None) -> None:
        self.dataset, self.alpha, self.rate = dataset, alpha, rate
        self.mix_target, self.prepare_target = mix_target, prepare_target

    def __len__(self) -> int:
        return len(self.dataset)

    def _item(self, index: int) -> Any:
        item = self.dataset[index]
        item = item._replace(waveform=_as_tensor(item.waveform))
        if self.prepare_target is not None:
            item = item._replace(target=self.prepare_target(item.target))
        return item

    def __getitem__(self, index: int) -> Any:
        item = self._item(index)
        if float(torch.rand(1)) < self.rate:
            other = self._item(int(torch.randint(len(self.dataset), (1,))))
            lam = float(np.random.beta(self.alpha, self.alpha))
            lam = max(lam, 1.0 - lam)
            x1 = item.waveform - item.waveform.mean()
            x2 = other.waveform - other.waveform.mean()
            mixed = lam * x1 + (1.0 - lam) * x2
            item = item._replace(waveform=mixed - mixed.mean(), **self.mix_target(item, other, lam))
        return item
