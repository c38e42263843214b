"""The AudioSet class table (527 classes): index order, MIDs and display names."""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

from common.download import cached_file

LABELS_FILE = "class_labels_indices.csv"
# The AudioSet release first, the original repository's copy as fallback.
LABELS_URLS = (
    "http://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv/class_labels_indices.csv",
    "https://raw.githubusercontent.com/fschmid56/EfficientAT/main/metadata/class_labels_indices.csv",
)
NUM_CLASSES = 527


def read_label_table(path: Path) -> list[tuple[str, str]]:
    """(mid, display_name) per class from a class_labels_indices.csv; raises ValueError unless it
    has the header index,mid,display_name, 527 rows with indices 0..526 in order and unique MIDs."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a CSV label table ({e})") from None
    if not rows or [c.strip() for c in rows[0]] != ["index", "mid", "display_name"]:
        raise ValueError(f"{path}: expected the header 'index,mid,display_name'")
    body = rows[1:]
    if len(body) != NUM_CLASSES:
        raise ValueError(f"{path}: expected {NUM_CLASSES} classes, found {len(body)}")
    table = []
    for i, row in enumerate(body):
        if len(row) != 3 or row[0] != str(i):
            raise ValueError(f"{path}: row {i + 2} is not '{i},<mid>,<name>'")
        table.append((row[1], row[2]))
    if len({mid for mid, _ in table}) != NUM_CLASSES:
        raise ValueError(f"{path}: MIDs are not unique")
    return table


@lru_cache(maxsize=None)
def _load(path: str) -> tuple[tuple[str, str], ...]:
    return tuple(read_label_table(Path(path)))


def label_table() -> list[tuple[str, str]]:
    """(mid, display_name) for the 527 AudioSet classes, downloaded into the cache on first use."""
    return list(_load(str(cached_file(LABELS_FILE, LABELS_URLS, validate=read_label_table, progress=False))))


def class_names() -> list[str]:
    """Display names of the 527 AudioSet classes in class-index order."""
    return [name for _, name in label_table()]
