"""Datasets kept as audio files plus a metadata table (ESC-50, DCASE2020, the user's own data):
reading and checking the table, and the clip dataset itself.

Every problem with the files on disk is raised as `InputError` with a one-line message that
names the file, while the datasets are being built, i.e. before training starts.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.audio import load_audio
from datasets.augment import fit_length
from datasets.badclips import BadClips, CountsBadClips
from datasets.cache import WaveformCache, file_signature
from datasets.items import IndexedClip
from common.errors import InputError
from common.files import read_text


def read_table(path: Path, required: Sequence[str], delimiter: str = ",") -> list[dict[str, str]]:
    """Rows of a CSV/TSV file with a header line, as dicts; checks that `required` columns exist."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the table file in it (a CSV file)")
    if not path.is_file():
        raise InputError(f"{path}: metadata file not found")
    with io.StringIO(read_text(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            sep = "tab" if delimiter == "\t" else repr(delimiter)
            raise InputError(f"{path}: missing column(s) {', '.join(missing)} (found: "
                               f"{', '.join(columns) or 'nothing'}; expected {sep}-separated "
                               f"columns {', '.join(required)})")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    if not rows:
        raise InputError(f"{path}: no rows after the header")
    return rows


def check_files_exist(files: Sequence[Path], table: Path) -> None:
    """Raise naming `table` and the first missing file (and how many are missing)."""
    missing = [f for f in files if not f.is_file()]
    if missing:
        if "\\" in str(missing[0]):
            raise InputError(f"{table}: lists {missing[0]}, which does not exist: its path has Windows "
                             "backslashes; write paths with / (as in sub/clip.wav)")
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"{table}: lists {missing[0]}, which does not exist{more}")


class AudioFileDataset(CountsBadClips, Dataset):
    """Clips read with the project's audio loader, mono at `sample_rate`.

    Items are `datasets.items.IndexedClip` (waveform (1, L) float32 tensor, name, target float32
    tensor, index). With
    `clip_samples` every waveform is padded or cut to that length: from the start, or from a
    random offset when `random_crop` (training on clips longer than the model's input). `cache`
    keeps the decoded, resampled waveforms on disk. A file that cannot be read (or holds NaN or
    infinity) is logged and counted; `bad_clips` "replace" (training) returns the next readable
    clip instead, "mask" (evaluation) silence with index -1 (`datasets.badclips`).
    """

    def __init__(self, files: Sequence[Path], targets: np.ndarray, names: Sequence[str],
                 sample_rate: int = 32000, clip_samples: Optional[int] = None,
                 random_crop: bool = False, cache: Optional[WaveformCache] = None,
                 bad_clips: str = "replace") -> None:
        if not len(files) == len(targets) == len(names):
            raise ValueError("files, targets and names must have the same length")
        self.files = list(files)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.names = list(names)
        self.sample_rate = sample_rate
        self.clip_samples = clip_samples
        self.random_crop = random_crop
        self.cache = cache
        self.bad = BadClips(len(self.files), bad_clips)

    def __len__(self) -> int:
        return len(self.files)

    def waveform(self, index: int) -> np.ndarray:
        """Full-length waveform of clip `index` (from the cache where possible)."""
        path = self.files[index]
        if self.cache is None:
            return load_audio(path, self.sample_rate)
        return self.cache.get(file_signature(path), lambda: load_audio(path, self.sample_rate))

    def _fit(self, wave: np.ndarray) -> torch.Tensor:
        if self.clip_samples is not None:
            wave = fit_length(wave, self.clip_samples, self.random_crop)
        return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)).unsqueeze(0)

    def _read(self, index: int) -> IndexedClip:
        return IndexedClip(self._fit(self.waveform(index)), self.names[index], self.targets[index], index)

    def _placeholder(self, index: int) -> IndexedClip:
        silence = self._fit(np.zeros(self.clip_samples or self.sample_rate))
        return IndexedClip(silence, self.names[index], self.targets[index], -1)

    def __getitem__(self, index: int) -> IndexedClip:
        return self.bad.get(index, self._read, self._placeholder)


def one_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
    """float32 one-hot matrix (N, num_classes) of integer labels."""
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)] = 1.0
    return out


def make_cache(cache_path: Optional[str | os.PathLike], namespace: str,
               sample_rate: int) -> Optional[WaveformCache]:
    """A WaveformCache under `cache_path`, or None when no cache was asked for."""
    return WaveformCache(cache_path, namespace, sample_rate) if cache_path else None
