"""Teacher files for knowledge distillation from a corpus table written with `--logits`: the
logits as an (n, 527) float32 .npy and the clip name -> row mapping, the two files
`ex_audioset.py --teacher_preds ... --fname_to_index ...` reads (`datasets.audioset.TeacherPredictions`).

A clip's name is the one the training data gives it (`datasets.audioset.normalize_name` of the
name stored in the HDF5 file): with `names="ytid"` the YouTube ID in an AudioSet file name
(`Y<id>.wav`, `<id>.mp3`, `<id>_30.000.flac`: what `python -m datasets.prepare_hdf5` matches to an
AudioSet segments CSV), with `names="relative"` the path relative to `root` (what it stores for a
`filename,labels` CSV with that root as --audio_dir). The table is read part by part and the logits
are written into a memory-mapped file, so memory holds only the mapping.

Unlabelled audio of one's own has no labels for the class-balanced sampler and the label term of
the loss: `pseudo_labels` writes `prepare_hdf5`'s `filename,labels` CSV with the teacher's labels
(its top class and every class at probability >= `threshold`), so the recipe runs unchanged.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.dataset as pds

from common.errors import InputError
from common.files import atomic_path
from datasets.audioset import NUM_CLASSES, normalize_name
from helpers.inference.corpus_table import iter_batches, open_table

NAME_MODES = ("ytid", "relative")
_YTID = re.compile(r"Y?([A-Za-z0-9_-]{11})(?:_.*)?")
INDEX_SUFFIXES = (".json", ".csv")
PSEUDO_THRESHOLD = 0.5  # teacher probability from which a class is a pseudo-label


def clip_name(file: str, names: str = "ytid", root: Optional[str] = None) -> Optional[str]:
    """The training data's name of the clip in `file` (module doc); None when `file` holds no
    YouTube ID (names="ytid") or lies outside `root` (names="relative")."""
    if names == "ytid":
        match = _YTID.fullmatch(Path(file).stem)
        return match.group(1) if match else None
    relative = os.path.relpath(os.path.abspath(file), os.path.abspath(root or "."))
    if relative.startswith(os.pardir + os.sep):
        return None
    return normalize_name(Path(relative).with_suffix(".mp3").as_posix())


def export_teacher(folder: str | os.PathLike, preds: str | os.PathLike, index: str | os.PathLike,
                   names: str = "ytid", root: Optional[str] = None,
                   pseudo_labels: Optional[str | os.PathLike] = None, threshold: float = PSEUDO_THRESHOLD) -> int:
    """Write the teacher logits of the table in `folder` to `preds` (.npy) and the name -> row
    mapping to `index` (.json or .csv with columns name,row), and with `pseudo_labels` the labels
    CSV (module doc; names="relative" only), all atomically; rows with an error are left out.
    Returns the number of rows. InputError for a table without 527 logits, a file that gives no
    name, or two files that give one name."""
    preds, index = Path(preds), Path(index)
    if preds.suffix.lower() != ".npy" or index.suffix.lower() not in INDEX_SUFFIXES:
        raise InputError(f"the teacher files are a .npy ({preds}) and a .json or .csv mapping ({index})")
    if pseudo_labels is not None and names != "relative":
        raise InputError("--pseudo_labels names the files relative to --audio_root: use --teacher_names relative")
    count = _check_table(folder)
    rows: dict[str, int] = {}
    sources: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        out = np.lib.format.open_memmap(stack.enter_context(atomic_path(preds)), mode="w+", dtype=np.float32,
                                        shape=(count, NUM_CLASSES))
        labels = _labels_writer(stack, pseudo_labels)
        for batch in iter_batches(folder, ["file", "logits"], valid_only=True):
            logits = batch.column(1).values.to_numpy(zero_copy_only=False).reshape(-1, NUM_CLASSES)
            for file, row in zip(batch.column(0).to_pylist(), logits):
                name = _name(file, names, root)
                if name in rows:
                    raise InputError(f"{sources[name]} and {file} both give the clip name {name!r}")
                rows[name], sources[name] = len(rows), file
                out[rows[name]] = row
                if labels is not None:
                    labels.writerow([os.path.relpath(os.path.abspath(file), os.path.abspath(root)),
                                     ";".join(map(str, teacher_labels(row, threshold)))])
        out.flush()
        del out
        _write_index(index, rows)
    return len(rows)


def _check_table(folder: str | os.PathLike) -> int:
    """The number of rows without an error of a table with AudioSet logits; InputError otherwise."""
    table = open_table(folder)
    if "logits" not in table.schema.names:
        raise InputError(f"{folder}: the table has no logits column: run the corpus job with --logits")
    width = table.schema.field("logits").type.list_size
    if width != NUM_CLASSES:
        raise InputError(f"{folder}: its logits have {width} classes; AudioSet distillation needs {NUM_CLASSES}")
    return table.count_rows(filter=pds.field("error").is_null())


def _name(file: str, names: str, root: Optional[str]) -> str:
    name = clip_name(file, names, root)
    if name is None:
        why = ("no YouTube ID in its file name: use --teacher_names relative" if names == "ytid"
               else f"not inside {root}")
        raise InputError(f"{file}: gives no clip name ({why})")
    return name


def teacher_labels(logits: np.ndarray, threshold: float = PSEUDO_THRESHOLD) -> list[int]:
    """The classes a teacher gives a clip: its top class and every class at probability >= `threshold`."""
    chosen = set(np.flatnonzero(logits >= np.log(threshold / (1 - threshold))).tolist()) | {int(np.argmax(logits))}
    return sorted(chosen)


def _labels_writer(stack: contextlib.ExitStack, path: Optional[str | os.PathLike]) -> Optional[Any]:
    """A csv writer of `prepare_hdf5`'s filename,labels CSV at `path` (published when the export ends)."""
    if path is None:
        return None
    f = stack.enter_context(open(stack.enter_context(atomic_path(path)), "w", newline="", encoding="utf-8"))
    writer = csv.writer(f)
    writer.writerow(["filename", "labels"])
    return writer


def _write_index(path: Path, rows: dict[str, int]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".json":
            json.dump(rows, f)
        else:
            writer = csv.writer(f)
            writer.writerow(["name", "row"])
            writer.writerows(rows.items())
