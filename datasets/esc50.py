"""ESC-50: 2,000 five-second environmental recordings, 50 classes, five folds.

Layout of the dataset folder (`--dataset_dir`, default $EFFICIENTAT_ESC50_DIR):

    meta/esc50.csv    comma-separated; columns filename, fold (1..5), target (0..49)
                      [, category, ...]; category gives the class names where present
    audio_32k/        the clips (any rate or format the audio loader reads; resampled to 32 kHz)

The test set of fold f holds the rows with fold == f, the training set all others.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from datasets.files import AudioFileDataset, check_files_exist, make_cache, one_hot, read_table
from common.errors import InputError

ENV_VAR = "EFFICIENTAT_ESC50_DIR"
NUM_CLASSES = 50
NUM_FOLDS = 5
CLIP_SECONDS = 5
META = Path("meta", "esc50.csv")
AUDIO = "audio_32k"


def _int(value: str, low: int, high: int, column: str, line: int, path: Path) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise InputError(f"{path}: line {line}: {column} must be an integer in {low}..{high}, got {value!r}")
    return number


def read_meta(dataset_dir: Path) -> tuple[list[dict], list[str]]:
    """Checked rows (filename, path, fold, target) of esc50.csv and the 50 class names."""
    meta = dataset_dir / META
    rows = read_table(meta, ("filename", "fold", "target"))
    names = [f"class_{k}" for k in range(NUM_CLASSES)]
    clips = []
    for line, row in enumerate(rows, start=2):
        target = _int(row["target"], 0, NUM_CLASSES - 1, "target", line, meta)
        clips.append({"filename": row["filename"], "path": dataset_dir / AUDIO / row["filename"],
                      "fold": _int(row["fold"], 1, NUM_FOLDS, "fold", line, meta), "target": target})
        if row.get("category"):
            names[target] = row["category"]
    check_files_exist([c["path"] for c in clips], meta)
    return clips, names


def get_datasets(root: Path, fold: int = 1, sample_rate: int = 32000,
                 cache_path: Optional[str | os.PathLike] = None
                 ) -> tuple[AudioFileDataset, AudioFileDataset, list[str]]:
    """(training set, test set, class names) of the ESC-50 folder `root` for test fold `fold`;
    items are (waveform (1, 5 s), file name, one-hot target (50), index)."""
    if not 1 <= fold <= NUM_FOLDS:
        raise InputError(f"fold must be in 1..{NUM_FOLDS}, got {fold}")
    clips, class_names = read_meta(root)
    cache = make_cache(cache_path, "esc50", sample_rate)

    def subset(rows: list[dict], bad_clips: str) -> AudioFileDataset:
        return AudioFileDataset([r["path"] for r in rows], one_hot([r["target"] for r in rows], NUM_CLASSES),
                                [r["filename"] for r in rows], sample_rate, CLIP_SECONDS * sample_rate,
                                cache=cache, bad_clips=bad_clips)

    train = subset([c for c in clips if c["fold"] != fold], "replace")
    test = subset([c for c in clips if c["fold"] == fold], "mask")
    if not len(train) or not len(test):
        raise InputError(f"{root / META}: fold {fold} leaves an empty training or test set")
    return train, test, class_names
