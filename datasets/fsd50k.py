"""FSD50K: 51k clips of up to 30 s, 200 sound classes (multi-label), official train/val/eval split.

Files in the dataset folder (`--dataset_dir`, default $EFFICIENTAT_FSD50K_DIR), made with the
PaSST preparation scripts (or `python -m datasets.prepare_hdf5 --classes <200 label names>` from
the FSD50K clips and a `filename,labels` CSV):

    FSD50K.train_mp3.hdf, FSD50K.val_mp3.hdf, FSD50K.eval_mp3.hdf
        mp3 HDF5 containers (32 kHz mono); target = 200 bit-packed labels (25 uint8)
    vocabulary.csv (optional)
        the official vocabulary file (index,label,mid rows, no header), for the class names

Clips are cut to 10 s at a random offset when training; validation and evaluation clips longer
than 10 s are cut at an offset fixed per clip (the original draws it anew each time), or kept
whole with `variable_eval_length`.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

from datasets.files import make_cache
from datasets.hdf5 import Mp3HDF5, unpack_targets
from datasets.mp3clips import SAMPLE_RATE, Mp3ClipDataset
from common.errors import InputError

ENV_VAR = "EFFICIENTAT_FSD50K_DIR"
NUM_CLASSES = 200
CLIP_SECONDS = 10
FILES = {"train": "FSD50K.train_mp3.hdf", "val": "FSD50K.val_mp3.hdf", "eval": "FSD50K.eval_mp3.hdf"}
VOCABULARY = "vocabulary.csv"


def class_names(root: Path) -> list[str]:
    """Label names from vocabulary.csv (index,label,mid), or class_0 ... class_199 without it."""
    path = root / VOCABULARY
    if not path.is_file():
        return [f"class_{k}" for k in range(NUM_CLASSES)]
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    if len(rows) != NUM_CLASSES or any(len(r) < 2 or r[0] != str(k) for k, r in enumerate(rows)):
        raise InputError(f"{path}: expected {NUM_CLASSES} rows 'index,label,mid' numbered 0..{NUM_CLASSES - 1}")
    return [r[1] for r in rows]


def get_datasets(root: Path, resample_rate: int = SAMPLE_RATE, variable_eval_length: bool = False,
                 cache_path: Optional[str | os.PathLike] = None
                 ) -> tuple[Mp3ClipDataset, Mp3ClipDataset, Mp3ClipDataset, list[str]]:
    """(train, val, eval, class names) of the FSD50K folder `root`; items are (waveform, name,
    200-class multi-hot target, row index)."""
    files = {split: Mp3HDF5(root / name) for split, name in FILES.items()}
    for f in files.values():
        if f.target_shape != ((NUM_CLASSES + 7) // 8,):
            raise InputError(f"{f.path}: target rows have shape {f.target_shape}, expected "
                             f"{(NUM_CLASSES + 7) // 8} bytes of packed FSD50K labels")
    cache = make_cache(cache_path, "fsd50k", SAMPLE_RATE)
    clip = CLIP_SECONDS * SAMPLE_RATE

    def target(row):
        return unpack_targets(row, NUM_CLASSES)

    train = Mp3ClipDataset(files["train"], target, clip, "random", resample_rate, cache)
    evals = [Mp3ClipDataset(files[s], target, None if variable_eval_length else clip, "fixed",
                            resample_rate, cache, bad_rows="mask") for s in ("val", "eval")]
    return train, evals[0], evals[1], class_names(root)
