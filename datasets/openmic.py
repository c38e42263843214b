"""OpenMIC-2018: 20,000 ten-second clips, 20 instruments, partially annotated (masked labels).

Files in the dataset folder (`--dataset_dir`, default $EFFICIENTAT_OPENMIC_DIR), made with the
PaSST preparation scripts (openmic/ folder there):

    openmic_train.csv_mp3.hdf, openmic_test.csv_mp3.hdf   (official split01 partitions)
        target = 40 float32 values: 20 soft relevances in [0, 1], then 20 observation-mask
        entries (1 = the instrument was annotated for this clip)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from datasets.files import make_cache
from datasets.hdf5 import Mp3HDF5
from datasets.items import MaskedClip
from datasets.mp3clips import SAMPLE_RATE, Mp3ClipDataset
from common.errors import InputError

ENV_VAR = "EFFICIENTAT_OPENMIC_DIR"
NUM_CLASSES = 20
CLIP_SECONDS = 10
FILES = {"train": "openmic_train.csv_mp3.hdf", "test": "openmic_test.csv_mp3.hdf"}
# OpenMIC-2018's class-map.json order
CLASS_NAMES = ["accordion", "banjo", "bass", "cello", "clarinet", "cymbals", "drums", "flute", "guitar",
               "mallet_percussion", "mandolin", "organ", "piano", "saxophone", "synthesizer", "trombone",
               "trumpet", "ukulele", "violin", "voice"]


def mix_targets(a: MaskedClip, b: MaskedClip, lam: float) -> dict[str, torch.Tensor]:
    """Waveform-mixing rule for OpenMIC items: relevances of unobserved classes are zeroed, the
    relevances mixed with `lam`, the masks combined by element-wise maximum."""
    mixed = lam * a.target * a.mask + (1.0 - lam) * b.target * b.mask
    return {"target": mixed, "mask": torch.maximum(a.mask, b.mask)}


def get_datasets(root: Path, resample_rate: int = SAMPLE_RATE,
                 cache_path: Optional[str | os.PathLike] = None
                 ) -> tuple[Mp3ClipDataset, Mp3ClipDataset, list[str]]:
    """(train, test, class names) of the OpenMIC folder `root`; items are `MaskedClip`s (waveform (1, 10 s),
    name, target (20 relevances), row index, mask (20: 1 where annotated))."""
    files = {split: Mp3HDF5(root / name) for split, name in FILES.items()}
    for f in files.values():
        if f.target_shape != (2 * NUM_CLASSES,) or f.target_dtype.kind != "f":
            raise InputError(f"{f.path}: target rows have shape {f.target_shape} and dtype {f.target_dtype}, "
                             f"expected {2 * NUM_CLASSES} floats (relevances, then mask)")
    cache = make_cache(cache_path, "openmic", SAMPLE_RATE)

    def target(row):  # stored rows: relevances, then mask
        return np.asarray(row[:NUM_CLASSES], dtype=np.float32)

    def mask(row):
        return np.asarray(row[NUM_CLASSES:], dtype=np.float32)

    train = Mp3ClipDataset(files["train"], target, CLIP_SECONDS * SAMPLE_RATE, "start", resample_rate, cache,
                           mask_fn=mask)
    test = Mp3ClipDataset(files["test"], target, CLIP_SECONDS * SAMPLE_RATE, "start", resample_rate, cache,
                          bad_rows="mask", mask_fn=mask)
    return train, test, list(CLASS_NAMES)
