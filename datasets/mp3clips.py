"""Clips stored as mp3 rows of HDF5 files (FSD50K, OpenMIC), read for fine-tuning.

Items are `datasets.items.IndexedClip` (waveform (1, L) float32 tensor, clip name, float32
target tensor, row index), or `MaskedClip` (the same and a label mask) when the rows also hold a
mask. A row whose mp3 cannot be decoded is logged once (file, row, name); for training it is
replaced by the next decodable row, and for evaluation it is returned as silence with row index -1
so that the evaluation can drop it (`datasets.items.is_valid`).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.augment import decimate, fit_length
from datasets.cache import WaveformCache, file_signature
from datasets.hdf5 import Mp3DecodeError, Mp3HDF5, decode_mp3
from datasets.items import IndexedClip, MaskedClip
from helpers.common.errors import InputError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 32000  # the rate of the mp3s in the HDF5 files
CROPS = ("start", "random", "fixed")
MAX_CONSECUTIVE_BAD_ROWS = 100


class Mp3ClipDataset(Dataset):
    """One mp3 HDF5 file. Per item: decode (or read from `cache`), zero-pad or cut to
    `clip_samples` at 32 kHz (None: keep the full clip), decimate to `resample_rate`, convert the
    stored target row with `target_fn` (and, when given, read the label mask from it with
    `mask_fn`: the items are then `MaskedClip`s).

    crop: "start" keeps the first samples, "random" a window at a uniform random offset (torch
    RNG, for training), "fixed" a window at an offset drawn once per row from a generator seeded by
    the row index (the original's random evaluation crop, made repeatable). `bad_rows` "replace"
    (training) or "mask" (evaluation) decides what an undecodable row yields."""

    def __init__(self, hdf5: Mp3HDF5, target_fn: Callable[[np.ndarray], np.ndarray],
                 clip_samples: Optional[int] = 10 * SAMPLE_RATE, crop: str = "start",
                 resample_rate: int = SAMPLE_RATE, cache: Optional[WaveformCache] = None,
                 bad_rows: str = "replace",
                 mask_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> None:
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if bad_rows not in ("replace", "mask"):
            raise ValueError(f"bad_rows must be 'replace' or 'mask', got {bad_rows!r}")
        decimate(np.zeros(1), SAMPLE_RATE, resample_rate)  # reject other rates now
        self.hdf5, self.target_fn = hdf5, target_fn
        self.clip_samples, self.crop, self.resample_rate = clip_samples, crop, resample_rate
        self.cache, self.bad_rows, self.mask_fn = cache, bad_rows, mask_fn
        self._key = file_signature(hdf5.path) if cache is not None else ""
        self._reported: set[int] = set()  # per process: each worker logs a bad row at most once

    def __len__(self) -> int:
        return len(self.hdf5)

    def _decode(self, row: int) -> np.ndarray:
        if self.cache is None:
            return decode_mp3(self.hdf5.mp3(row))
        return self.cache.get(f"{self._key}|{row}", lambda: decode_mp3(self.hdf5.mp3(row)))

    def _fit(self, waveform: np.ndarray, row: int) -> np.ndarray:
        if self.clip_samples is None:
            return waveform
        extra = len(waveform) - self.clip_samples
        if self.crop == "fixed" and extra > 0:
            offset = int(np.random.default_rng(row).integers(extra + 1))
            return waveform[offset:offset + self.clip_samples]
        return fit_length(waveform, self.clip_samples, random_crop=self.crop == "random")

    def _item(self, waveform: np.ndarray, row: int, index: int) -> IndexedClip | MaskedClip:
        stored = self.hdf5.target(row)
        item = IndexedClip(torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).unsqueeze(0),
                           self.hdf5.name(row), _float_tensor(self.target_fn(stored)), index)
        return item if self.mask_fn is None else MaskedClip(*item, _float_tensor(self.mask_fn(stored)))

    def __getitem__(self, index: int) -> IndexedClip | MaskedClip:
        for attempt in range(MAX_CONSECUTIVE_BAD_ROWS):
            row = (index + attempt) % len(self)
            try:
                waveform = self._fit(self._decode(row), row)
            except Mp3DecodeError as e:
                if row not in self._reported:
                    self._reported.add(row)
                    logger.warning("%s: row %d (%s) is not a decodable mp3 (%s); %s", self.hdf5.path, row,
                                   self.hdf5.name(row), e, "skipped" if self.bad_rows == "replace"
                                   else "left out of the evaluation")
                if self.bad_rows == "replace":
                    continue
                silence = decimate(np.zeros(self.clip_samples or SAMPLE_RATE, dtype=np.float32),
                                   SAMPLE_RATE, self.resample_rate)
                return self._item(silence, row, -1)
            return self._item(decimate(waveform, SAMPLE_RATE, self.resample_rate), row, row)
        raise InputError(f"{self.hdf5.path}: {MAX_CONSECUTIVE_BAD_ROWS} consecutive rows from {index} are "
                         "not decodable mp3s: is the file corrupt?")


def _float_tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(values, dtype=np.float32))
