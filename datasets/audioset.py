"""AudioSet from the mp3 HDF5 files, its class-balanced sampling weights, and the teacher logits
used for knowledge distillation.

Files in the dataset folder (built by the PaSST preparation scripts or `python -m
datasets.prepare_hdf5`): balanced_train_segments_mp3.hdf, unbalanced_train_segments_mp3.hdf,
eval_segments_mp3.hdf. Items are `datasets.items.IndexedClip`s (waveform (1, L) float32 tensor,
YouTube ID, target (527) float32 tensor, row index). The training set is the balanced file
followed by the unbalanced one.

A row that cannot be used (undecodable mp3, unreadable HDF5 data, NaN or infinite samples) is
logged once (file, row, name) and counted; for training it is replaced by the next usable row, so
it never enters a batch, and for evaluation it is returned as silence with row index -1 so that the
evaluation can drop it (`datasets.items.is_valid`; see `datasets.badclips`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.audio import check_finite
from datasets.augment import decimate, random_gain
from datasets.name_index import read_name_index
from datasets.badclips import BadClips, CountsBadClips, row_error
from datasets.hdf5 import CorruptRowError, Mp3DecodeError, Mp3HDF5, decode_mp3, unpack_targets
from datasets.items import IndexedClip
from common.errors import InputError

NUM_CLASSES = 527
SAMPLE_RATE = 32000
DATASET_ENV = "AUDIOSET_DIR"
BALANCED_FILE = "balanced_train_segments_mp3.hdf"
UNBALANCED_FILE = "unbalanced_train_segments_mp3.hdf"
EVAL_FILE = "eval_segments_mp3.hdf"
TEACHER_URL = "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/"
TEACHER_PREDS_FILE = "passt_enemble_logits_mAP_495.npy"
FNAME_TO_INDEX_FILE = "fname_to_index.pkl"


def normalize_name(audio_name: str) -> str:
    """HDF5 clip name -> YouTube ID: drop ".mp3" and everything up to the first 'Y'
    ("00/Y--4gqARaEJE.mp3" -> "--4gqARaEJE"); a name without 'Y' keeps its stem."""
    stem = audio_name[:-4] if audio_name.endswith(".mp3") else audio_name
    head, sep, tail = stem.partition("Y")
    return tail if sep else stem


class AudioSetDataset(CountsBadClips, Dataset):
    """One or more AudioSet mp3 HDF5 files read as one dataset (rows in file order).

    Per item: decode the mp3, random gain (`gain_augment` dB, 0 = off), zero-pad or cut to
    `clip_length` seconds at 32 kHz, decimate to `resample_rate` (32000, 16000 or 8000), unpack the
    target. `bad_rows` "replace" (training) or "mask" (evaluation) decides what an unusable
    row yields (module docstring)."""

    def __init__(self, paths: Sequence[str | os.PathLike], resample_rate: int = SAMPLE_RATE,
                 clip_length: float = 10.0, gain_augment: int = 0, bad_rows: str = "replace",
                 in_mem: bool = False) -> None:
        self.files = [Mp3HDF5(p, in_mem=in_mem) for p in paths]
        for f in self.files:
            if f.target_shape != ((NUM_CLASSES + 7) // 8,) or f.target_dtype != np.uint8:
                raise InputError(f"{f.path}: target has shape {f.target_shape} and dtype "
                                 f"{f.target_dtype}, expected packed AudioSet labels (66 uint8)")
        self.offsets = np.cumsum([0] + [len(f) for f in self.files])
        self.resample_rate = resample_rate
        self.clip_samples = int(round(clip_length * SAMPLE_RATE))
        decimate(np.zeros(1), SAMPLE_RATE, resample_rate)  # reject other rates now
        self.gain_augment = gain_augment
        self.bad = BadClips(len(self), bad_rows)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _locate(self, index: int) -> tuple[Mp3HDF5, int]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.files[k], index - int(self.offsets[k])

    def name(self, index: int) -> str:
        """YouTube ID of row `index`."""
        f, row = self._locate(index)
        return normalize_name(f.name(row))

    def names(self) -> list[str]:
        """YouTube IDs of all rows, in dataset order."""
        return [normalize_name(n) for f in self.files for n in f.names()]

    def packed_targets(self) -> np.ndarray:
        """All targets as stored (N, 66) uint8 packed bits."""
        return np.concatenate([f.targets() for f in self.files])

    def _waveform(self, f: Mp3HDF5, row: int) -> torch.Tensor:
        waveform = check_finite(f"{f.path}: row {row}", decode_mp3(f.mp3(row), self.clip_samples), SAMPLE_RATE)
        waveform = random_gain(waveform, self.gain_augment)
        waveform = decimate(waveform, SAMPLE_RATE, self.resample_rate)
        return torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).unsqueeze(0)

    def _read(self, index: int) -> IndexedClip:
        f, row = self._locate(index)
        try:
            target = torch.from_numpy(unpack_targets(f.target(row), NUM_CLASSES))
            return IndexedClip(self._waveform(f, row), normalize_name(f.name(row)), target, index)
        except (Mp3DecodeError, CorruptRowError) as e:
            raise row_error(f, row, e) from None

    def _placeholder(self, index: int) -> IndexedClip:
        f, row = self._locate(index)
        try:
            name, target = normalize_name(f.name(row)), unpack_targets(f.target(row), NUM_CLASSES)
        except CorruptRowError:
            name, target = "", np.zeros(NUM_CLASSES, dtype=np.float32)
        length = len(decimate(np.zeros(self.clip_samples), SAMPLE_RATE, self.resample_rate))
        return IndexedClip(torch.zeros(1, length), name, torch.from_numpy(target), -1)

    def __getitem__(self, index: int) -> IndexedClip:
        return self.bad.get(index, self._read, self._placeholder)


def sample_weights(packed_targets: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Class-balanced sampling weight of every clip: class weights w_c = 1000 / (n_c + 100) from
    the label counts n_c, clip weight = sum of w_c over its labels (0 for clips without labels).
    Works in chunks, so the 2-million-row training set never needs a dense label matrix."""
    counts = np.zeros(NUM_CLASSES, dtype=np.float64)
    for start in range(0, len(packed_targets), chunk):
        counts += unpack_targets(packed_targets[start:start + chunk], NUM_CLASSES).sum(axis=0)
    class_weights = 1000.0 / (counts + 100.0)
    weights = np.empty(len(packed_targets), dtype=np.float64)
    for start in range(0, len(packed_targets), chunk):
        weights[start:start + chunk] = unpack_targets(packed_targets[start:start + chunk],
                                                      NUM_CLASSES) @ class_weights
    return weights


class TeacherPredictions:
    """Teacher logits (one row per training clip, 527 columns) and the YouTube-ID -> row index
    dictionary. `lookup(names)` returns sigmoid(logits / temperature) for a batch and a mask of
    the names that have a row. The logit array is memory-mapped, so each process holds only the
    rows it reads."""

    def __init__(self, preds_path: str | os.PathLike, index_path: str | os.PathLike,
                 temperature: float = 1.0) -> None:
        preds_path, index_path = Path(preds_path), Path(index_path)
        for p in (preds_path, index_path):
            if not p.is_file():
                raise InputError(f"{p}: teacher file not found")
        try:
            self.logits = np.load(preds_path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise InputError(f"{preds_path}: not a NumPy array file ({e})") from None
        if self.logits.ndim != 2 or self.logits.shape[1] != NUM_CLASSES:
            raise InputError(f"{preds_path}: teacher logits have shape {self.logits.shape}, "
                             f"expected (clips, {NUM_CLASSES})")
        self.index = read_name_index(index_path)
        rows = np.fromiter(self.index.values(), dtype=np.int64, count=len(self.index))
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.logits)):
            raise InputError(f"{index_path}: row indices {rows.min()}..{rows.max()} do not fit the "
                             f"{len(self.logits)} rows of {preds_path.name}")
        self.temperature = temperature

    def missing(self, names: Sequence[str]) -> list[str]:
        """The names that have no teacher row."""
        return [n for n in names if n not in self.index]

    def lookup(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher probabilities (B, 527) float32, known (B,) bool); unknown names get zeros."""
        rows = np.array([self.index.get(n, -1) for n in names], dtype=np.int64)
        known = rows >= 0
        logits = np.zeros((len(rows), NUM_CLASSES), dtype=np.float32)
        if known.any():
            order = np.argsort(rows[known])  # sorted reads are faster on a memory map
            picked = np.asarray(self.logits[rows[known][order]], dtype=np.float32)
            logits[np.flatnonzero(known)[order]] = picked
        probs = torch.sigmoid(torch.from_numpy(logits) / self.temperature)
        known_t = torch.from_numpy(known)
        return probs * known_t.unsqueeze(1), known_t


def teacher_paths(preds: Optional[str], index: Optional[str]) -> tuple[Path, Path]:
    """The teacher files: the given paths, or the released files in the model cache (downloaded on
    first use, ~4 GB for the logits)."""
    from common.download import cached_file  # network access only on this path

    preds_path = Path(preds) if preds else cached_file(TEACHER_PREDS_FILE, TEACHER_URL + TEACHER_PREDS_FILE)
    index_path = Path(index) if index else cached_file(FNAME_TO_INDEX_FILE, TEACHER_URL + FNAME_TO_INDEX_FILE)
    return preds_path, index_path
