"""What windowed inference shows while the windows arrive, and the plot it draws at the end.

Each window's top tags (stdout) and the JSON record of each event start and end (`event_record`,
written as a line by the JSON-lines writer). The files go through the output-format registry
(helpers/inference/formats.py); the plot is drawn at the end, atomically, and is the only output
that keeps every window's probabilities in memory (2.1 kB per window of 527 classes).
"""
from __future__ import annotations

import datetime
from typing import Any, Optional, Sequence

import numpy as np

from common.files import atomic_write
from helpers.inference.events import EventChange
from helpers.inference.sed import Event, WindowPredictions, plot_activity
from helpers.inference.tagging import top_k
from helpers.inference.writers import write_target, writing


def event_record(change: EventChange, filename: Optional[str] = None, started: Optional[float] = None
                 ) -> dict[str, Any]:
    """The JSON record of an event start or end; with `started` (the stream's first sample, POSIX
    time) also "time", the wall clock of the onset or offset in ISO 8601."""
    record: dict[str, Any] = {"event": change.kind, "label": change.label, "onset": change.onset}
    if change.kind == "end":
        record.update(offset=change.offset, max_probability=change.max_probability)
    if filename is not None:
        record["filename"] = filename
    if started is not None:
        at = change.onset if change.kind == "start" else change.offset
        record["time"] = datetime.datetime.fromtimestamp(started + at).astimezone().isoformat(timespec="milliseconds")
    return record


def window_lines(start: float, end: float, probs: np.ndarray, class_names: Sequence[str], k: int) -> str:
    """A window's top tags, as the original script prints them."""
    lines = [f"Window: {start:.2f} - {end:.2f}"] + [f"\t{class_names[i]}: {probs[i]:.2f}" for i in top_k(probs, k)]
    return "\n".join(lines) + "\n\n"


class PlotKeeper:
    """The window probabilities of one recording, kept for the plot drawn at the end."""

    def __init__(self, path: str, class_names: Sequence[str], k: int) -> None:
        self.path, self.class_names, self.k = path, class_names, k
        self.rows: list[np.ndarray] = []
        self.frame_times: list[np.ndarray] = []  # --frames: drawn instead of the windows
        self.frame_rows: list[np.ndarray] = []

    def write(self, filename: str, sample_rate: int, window: int, hop: int, num_samples: int,
              events: list[Event]) -> None:
        frames = (np.concatenate(self.frame_times), np.concatenate(self.frame_rows)) if self.frame_rows else (None, None)
        pred = WindowPredictions(filename, sample_rate, window, hop, num_samples,
                                 np.stack(self.rows) if self.rows else np.zeros((0, len(self.class_names)), np.float32),
                                 *frames)
        with writing(self.path), atomic_write(write_target(self.path), "wb") as f:
            plot_activity(pred, self.class_names, f, self.k, events)
