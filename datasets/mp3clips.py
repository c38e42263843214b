"""Clips stored as mp3 rows of HDF5 files (FSD50K, OpenMIC), read for fine-tuning.

Items are `datasets.items.IndexedClip` (waveform (1, L) float32 tensor, clip name, float32
target tensor, row index), or `MaskedClip` (the same and a label mask) when the rows also hold a
mask. A row that cannot be used (undecodable mp3, unreadable HDF5 data, NaN or infinite samples)
is logged once (file, row, name) and counted; for training it is replaced by the next usable row,
and for evaluation it is returned as silence with row index -1 so that the evaluation can drop it
(`datasets.items.is_valid`; see `datasets.badclips`).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.audio import check_finite
from datasets.augment import decimate, fit_length
from datasets.badclips import BadClips, CountsBadClips, row_error
from datasets.cache import WaveformCache, file_signature
from datasets.hdf5 import CorruptRowError, Mp3DecodeError, Mp3HDF5, decode_mp3
from datasets.items import IndexedClip, MaskedClip

SAMPLE_RATE = 32000  # the rate of the mp3s in the HDF5 files
CROPS = ("start", "random", "fixed")


class Mp3ClipDataset(CountsBadClips, Dataset):
    """One mp3 HDF5 file. Per item: decode (or read from `cache`), zero-pad or cut to
    `clip_samples` at 32 kHz (None: keep the full clip), decimate to `resample_rate`, convert the
    stored target row with `target_fn` (and, when given, read the label mask from it with
    `mask_fn`: the items are then `MaskedClip`s).

    crop: "start" keeps the first samples, "random" a window at a uniform random offset (torch
    RNG, for training), "fixed" a window at an offset drawn once per row from a generator seeded by
    the row index (the original's random evaluation crop, made repeatable). `bad_rows` "replace"
    (training) or "mask" (evaluation) decides what an unusable row yields."""

    def __init__(self, hdf5: Mp3HDF5, target_fn: Callable[[np.ndarray], np.ndarray],
                 clip_samples: Optional[int] = 10 * SAMPLE_RATE, crop: str = "start",
                 resample_rate: int = SAMPLE_RATE, cache: Optional[WaveformCache] = None,
                 bad_rows: str = "replace",
                 mask_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> None:
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        decimate(np.zeros(1), SAMPLE_RATE, resample_rate)  # reject other rates now
        self.hdf5, self.target_fn = hdf5, target_fn
        self.clip_samples, self.crop, self.resample_rate = clip_samples, crop, resample_rate
        self.cache, self.mask_fn = cache, mask_fn
        self._key = file_signature(hdf5.path) if cache is not None else ""
        self.bad = BadClips(len(hdf5), bad_rows)

    def __len__(self) -> int:
        return len(self.hdf5)

    def _decode(self, row: int) -> np.ndarray:
        def decode() -> np.ndarray:
            return check_finite(f"{self.hdf5.path}: row {row}", decode_mp3(self.hdf5.mp3(row)), SAMPLE_RATE)

        return decode() if self.cache is None else self.cache.get(f"{self._key}|{row}", decode)

    def _fit(self, waveform: np.ndarray, row: int) -> np.ndarray:
        if self.clip_samples is None:
            return waveform
        extra = len(waveform) - self.clip_samples
        if self.crop == "fixed" and extra > 0:
            offset = int(np.random.default_rng(row).integers(extra + 1))
            return waveform[offset:offset + self.clip_samples]
        return fit_length(waveform, self.clip_samples, random_crop=self.crop == "random")

    def _item(self, waveform: np.ndarray, stored: np.ndarray, name: str, index: int) -> IndexedClip | MaskedClip:
        item = IndexedClip(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).unsqueeze(0),
                           name, _float_tensor(self.target_fn(stored)), index)
        return item if self.mask_fn is None else MaskedClip(*item, _float_tensor(self.mask_fn(stored)))

    def _read(self, row: int) -> IndexedClip | MaskedClip:
        try:
            stored = self.hdf5.target(row)
            waveform = decimate(self._fit(self._decode(row), row), SAMPLE_RATE, self.resample_rate)
            return self._item(waveform, stored, self.hdf5.name(row), row)
        except (Mp3DecodeError, CorruptRowError) as e:
            raise row_error(self.hdf5, row, e) from None

    def _placeholder(self, row: int) -> IndexedClip | MaskedClip:
        silence = decimate(np.zeros(self.clip_samples or SAMPLE_RATE, dtype=np.float32),
                           SAMPLE_RATE, self.resample_rate)
        try:
            stored, name = self.hdf5.target(row), self.hdf5.name(row)
        except CorruptRowError:  # dropped by is_valid: only the shapes matter
            stored, name = np.zeros(self.hdf5.target_shape, self.hdf5.target_dtype), ""
        return self._item(silence, stored, name, -1)

    def __getitem__(self, index: int) -> IndexedClip | MaskedClip:
        return self.bad.get(index, self._read, self._placeholder)


def _float_tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.float32))
