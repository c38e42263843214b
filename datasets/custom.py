"""The user's own labelled audio: a folder of clips plus a CSV that names them.

The CSV (default `<dataset_dir>/labels.csv`) has a header line and

- a `filename` column: path of the clip relative to the dataset folder (sub-folders allowed);
- one or more label columns: `label`, `labels` or any column whose name starts with `label`
  (`label1`, `label_2`, ...). A cell may hold several labels separated by ';'. Empty cells are
  ignored;
- optionally a `split` column (train / val / test; also valid, validation, eval, evaluation) or a
  `fold` column (integers; `fold` selects the test fold, the others train).

Class names are the sorted distinct labels. The task is multi-label when any clip has more than one
label (or when forced); otherwise it is single-label, and every clip needs exactly one label.
Without split or fold column a stratified `val_fraction` of the clips is held out (seeded).
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from datasets.files import AudioFileDataset, check_files_exist, make_cache, read_table
from common.errors import InputError

logger = logging.getLogger(__name__)

ENV_VAR = "EFFICIENTAT_CUSTOM_DIR"
DEFAULT_CSV = "labels.csv"
LABEL_SEPARATOR = ";"
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test", "eval": "test", "evaluation": "test"}


@dataclass
class Clip:
    path: Path
    filename: str
    labels: list[str]
    split: Optional[str] = None
    fold: Optional[int] = None


@dataclass
class CustomData:
    """Datasets of one configuration. `val` is evaluated after every epoch (and selects the best
    model); `test`, when the CSV has one, is evaluated once with the selected model."""
    train: AudioFileDataset
    val: AudioFileDataset
    test: Optional[AudioFileDataset]
    class_names: list[str]
    multilabel: bool
    folds: list[int]


def _label_columns(columns: list[str]) -> list[str]:
    return [c for c in columns if c.lower().startswith("label")]


def read_clips(csv_path: Path, audio_dir: Path) -> list[Clip]:
    """Parse and check the CSV: columns, labels, split/fold values, existence of every file."""
    rows = read_table(csv_path, ("filename",))
    columns = list(rows[0])
    label_cols = _label_columns(columns)
    if not label_cols:
        raise InputError(f"{csv_path}: no label column (expected 'label', 'labels' or "
                           f"'label1', 'label2', ...; found: {', '.join(columns)})")
    clips = []
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if not row["filename"]:
            raise InputError(f"{csv_path}: line {line}: empty filename")
        key = os.path.realpath(audio_dir / row["filename"])  # one clip by any spelling: ./a.wav, /abs/a.wav
        if key in first_line:
            raise InputError(f"{csv_path}: lines {first_line[key]} and {line} both list {row['filename']} "
                             "(a clip must appear once, or it could be trained and validated on)")
        first_line[key] = line
        labels = [lab.strip() for col in label_cols for lab in row[col].split(LABEL_SEPARATOR) if lab.strip()]
        clip = Clip(audio_dir / row["filename"], row["filename"], list(dict.fromkeys(labels)))
        if "split" in row:
            clip.split = SPLIT_NAMES.get(row["split"].lower())
            if clip.split is None:
                raise InputError(f"{csv_path}: line {line}: split must be one of "
                                   f"{', '.join(sorted(SPLIT_NAMES))}, got {row['split']!r}")
        elif "fold" in row:
            try:
                clip.fold = int(row["fold"])
            except ValueError:
                raise InputError(f"{csv_path}: line {line}: fold must be an integer, "
                                   f"got {row['fold']!r}") from None
        clips.append(clip)
    check_files_exist([c.path for c in clips], csv_path)
    return clips


def _warn_case_variants(table: Path, class_names: list[str]) -> None:
    """Log labels that differ only in case (Dog, dog): they are different classes, which is
    rarely meant."""
    variants: dict[str, list[str]] = defaultdict(list)
    for name in class_names:
        variants[name.casefold()].append(name)
    for names in variants.values():
        if len(names) > 1:
            logger.warning("%s: the labels %s differ only in case; they are %d different classes",
                           table, " and ".join(repr(n) for n in names), len(names))


def _warn_missing_classes(table: Path, class_names: list[str], clips: list[Clip], part: list[Clip],
                          part_name: str, consequence: str) -> None:
    """Log the classes that have no clip in `part` (e.g. a class of a single clip, which the
    stratified hold-out keeps for training)."""
    present = {lab for c in part for lab in c.labels}
    counts = {name: sum(name in c.labels for c in clips) for name in class_names if name not in present}
    if counts:
        listed = ", ".join(f"{name} ({n} clip{'s' if n > 1 else ''})" for name, n in counts.items())
        logger.warning("%s: no %s clip of %s: %s", table, part_name, listed, consequence)


def _stratified_holdout(clips: list[Clip], fraction: float, seed: int) -> tuple[list[Clip], list[Clip]]:
    """Hold out `fraction` of every label group (at least one clip of groups with two or more)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(clips):
        groups[LABEL_SEPARATOR.join(sorted(c.labels[:1]))].append(i)
    rng = np.random.default_rng(seed)
    held = set()
    for key in sorted(groups):
        members = rng.permutation(groups[key])
        n = int(round(fraction * len(members)))
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        held.update(members[:n].tolist())
    return [c for i, c in enumerate(clips) if i not in held], [c for i, c in enumerate(clips) if i in held]


def get_datasets(root: Path, csv_path: Optional[str | os.PathLike] = None,
                 fold: Optional[int] = None, val_fraction: float = 0.2, seed: int = 0,
                 multilabel: Optional[bool] = None, sample_rate: int = 32000,
                 clip_seconds: float = 10.0, cache_path: Optional[str | os.PathLike] = None) -> CustomData:
    """Training, validation and (if the CSV defines one) test sets of the clips in folder `root`.

    multilabel None decides from the CSV. Clips are padded or cut to `clip_seconds`: from a random
    offset when training, from the start otherwise."""
    table = Path(csv_path) if csv_path else root / DEFAULT_CSV
    clips = read_clips(table, root)
    if multilabel is None:
        multilabel = any(len(c.labels) > 1 for c in clips)
    if not multilabel:
        bad = next((i for i, c in enumerate(clips) if len(c.labels) != 1), None)
        if bad is not None:
            raise InputError(f"{table}: line {bad + 2}: a single-label dataset needs exactly one label "
                               f"per clip, got {len(clips[bad].labels)} (use --multilabel for clips "
                               "with zero or several labels)")
    class_names = sorted({lab for c in clips for lab in c.labels})
    _warn_case_variants(table, class_names)
    if len(class_names) < 2 and not multilabel:
        raise InputError(f"{table}: a single-label dataset needs at least two classes, found "
                           f"{', '.join(class_names) or 'none'}")
    folds = sorted({c.fold for c in clips if c.fold is not None})
    if any(c.split for c in clips):
        parts = {s: [c for c in clips if c.split == s] for s in ("train", "val", "test")}
        train, val, test = parts["train"], parts["val"] or parts["test"], parts["test"] if parts["val"] else []
    elif folds:
        fold = folds[0] if fold is None else fold
        if fold not in folds:
            raise InputError(f"{table}: no clip in fold {fold} (folds: {', '.join(map(str, folds))})")
        train, val, test = [c for c in clips if c.fold != fold], [c for c in clips if c.fold == fold], []
    else:
        if not 0.0 < val_fraction < 1.0:
            raise InputError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        (train, val), test = _stratified_holdout(clips, val_fraction, seed), []
    if not train or not val:
        raise InputError(f"{table}: the {'training' if not train else 'validation'} split is empty")
    _warn_missing_classes(table, class_names, clips, train, "training", "never learned")
    _warn_missing_classes(table, class_names, clips, val, "validation", "never validated")
    cache = make_cache(cache_path, "custom", sample_rate)
    index = {name: k for k, name in enumerate(class_names)}

    def dataset(part: list[Clip], training: bool) -> AudioFileDataset:
        targets = np.zeros((len(part), len(class_names)), dtype=np.float32)
        for i, c in enumerate(part):
            targets[i, [index[lab] for lab in c.labels]] = 1.0
        return AudioFileDataset([c.path for c in part], targets, [c.filename for c in part], sample_rate,
                                int(round(clip_seconds * sample_rate)), random_crop=training, cache=cache,
                                bad_clips="replace" if training else "mask")

    return CustomData(dataset(train, True), dataset(val, False), dataset(test, False) if test else None,
                      class_names, multilabel, folds)
