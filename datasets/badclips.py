"""What training and evaluation datasets do with a clip they cannot use: an undecodable file or
mp3 row, a row of a corrupt HDF5 file, audio with NaN or infinite samples.

Each such clip is logged once (per process) and counted (across DataLoader workers). A training
set ("replace") returns the next usable clip instead, so a bad clip never enters a batch; an
evaluation set ("mask") returns a silent placeholder whose index is -1, which
`datasets.items.is_valid` drops from the results.
"""
from __future__ import annotations

import logging
import multiprocessing
from typing import Callable

import numpy as np

from datasets.audio import AudioLoadError
from datasets.hdf5 import Mp3DecodeError, Mp3HDF5
from common.errors import InputError

logger = logging.getLogger(__name__)

POLICIES = ("replace", "mask")
MAX_CONSECUTIVE_BAD = 100


class BadClip(ValueError):
    """A clip that cannot be used; the message names it (file, or file and row) and the problem."""


def row_error(hdf5: Mp3HDF5, row: int, error: Exception) -> BadClip:
    """BadClip for a row of `hdf5` that failed to read (CorruptRowError) or decode (Mp3DecodeError)."""
    problem = "is not a decodable mp3" if isinstance(error, Mp3DecodeError) else "cannot be read"
    return BadClip(f"{hdf5.describe(row)} {problem} ({error})")


class BadClips:
    """The bad-clip bookkeeping of one dataset of `size` clips, shared with its DataLoader
    workers: which clips were reported, and how many bad reads happened since `take_count`."""

    def __init__(self, size: int, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"bad_rows must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self._reported = multiprocessing.RawArray("b", size)
        self._count = multiprocessing.Value("q", 0)

    def get(self, index: int, read: Callable[[int], tuple], placeholder: Callable[[int], tuple]) -> tuple:
        """`read(index)`; if it raises BadClip or AudioLoadError, report it and return
        `placeholder(index)` ("mask") or the first usable of the following clips ("replace")."""
        size = len(self._reported)
        for attempt in range(MAX_CONSECUTIVE_BAD):
            i = (index + attempt) % size
            try:
                return read(i)
            except (BadClip, AudioLoadError) as e:
                self._report(i, e)
                if self.policy == "mask":
                    return placeholder(i)
        raise InputError(f"{MAX_CONSECUTIVE_BAD} consecutive clips from index {index} cannot be used "
                         "(see the warnings above): is the data corrupt?")

    def _report(self, index: int, error: Exception) -> None:
        with self._count.get_lock():
            self._count.value += 1
        if not self._reported[index]:
            self._reported[index] = 1
            action = "skipped" if self.policy == "replace" else "left out of the evaluation"
            logger.warning("%s; %s", error, action)

    def indices(self) -> np.ndarray:
        """Indices of the bad clips met so far (int64)."""
        return np.flatnonzero(np.frombuffer(self._reported, dtype=np.int8)).astype(np.int64)

    def take_count(self) -> int:
        """Number of bad reads since the last call (in this process and its workers)."""
        with self._count.get_lock():
            count, self._count.value = self._count.value, 0
        return int(count)


class CountsBadClips:
    """Mixin of the datasets that keep their bad-clip bookkeeping in `self.bad`."""
    bad: BadClips

    def bad_indices(self) -> np.ndarray:
        """Indices of the unusable clips met so far (int64)."""
        return self.bad.indices()

    def take_bad_count(self) -> int:
        """Number of unusable clips met since the last call (in this process and its workers)."""
        return self.bad.take_count()
