"""What windowed inference writes while the windows arrive, and at the end.

Written as they happen: each window's top tags (stdout), event starts and ends as JSON lines (stdout
or a .jsonl file, one flushed line each). Written whole at the end, atomically: the .csv/.json event
list, the window probabilities (rows streamed to a temporary file meanwhile, so memory does not grow
with the stream) and the plot (the only output that keeps every window's probabilities in memory:
2.1 kB per window of 527 classes). A write that fails (a full disk) is one InputError naming the file,
and leaves no partial file behind.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import os
import select
import stat
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Sequence

import numpy as np

from common.errors import InputError
from common.files import DISK_FULL, atomic_path, atomic_write, disk_full
from helpers.inference.events import EventChange
from helpers.inference.tables import TableWriter
from helpers.inference.sed import EVENT_FIELDS, Event, WindowPredictions, plot_activity
from helpers.inference.tagging import top_k


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Inside: a full disk or quota is the scripts' shared one line (`common.files.disk_full`, exit 1);
    any other OSError (a file size limit) is an InputError naming `path`."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full(e, path) from None
        raise InputError(f"{path}: cannot be written ({e.strerror or e})") from None


class LineOutput:
    """Text lines to stdout or a file, each flushed as written; `gone` once stdout's reader left."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] = sys.stdout if path == "-" else open(path, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        with writing(self.path):
            self._file.write(text)
            self._file.flush()

    @property
    def gone(self) -> bool:
        """True once the reader of a stdout pipe has closed it (seen by a failed write, or by poll,
        for a stream that has nothing to write for a long time)."""
        if self._file is not sys.stdout:
            return False
        if getattr(self._file, "reader_gone", False):
            return True
        try:
            fd = self._file.fileno()
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return False
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        if self._file is not sys.stdout:
            with writing(self.path):
                self._file.close()


def event_line(change: EventChange, filename: Optional[str] = None, started: Optional[float] = None) -> str:
    """One JSON line for an event start or end; with `started` (the stream's first sample, POSIX
    time) also "time", the wall clock of the onset or offset in ISO 8601."""
    record: dict[str, Any] = {"event": change.kind, "label": change.label, "onset": change.onset}
    if change.kind == "end":
        record.update(offset=change.offset, max_probability=change.max_probability)
    if filename is not None:
        record["filename"] = filename
    if started is not None:
        at = change.onset if change.kind == "start" else change.offset
        record["time"] = datetime.datetime.fromtimestamp(started + at).astimezone().isoformat(timespec="milliseconds")
    return json.dumps(record) + "\n"


def window_lines(start: float, end: float, probs: np.ndarray, class_names: Sequence[str], k: int) -> str:
    """A window's top tags, as the original script prints them."""
    lines = [f"Window: {start:.2f} - {end:.2f}"] + [f"\t{class_names[i]}: {probs[i]:.2f}" for i in top_k(probs, k)]
    return "\n".join(lines) + "\n\n"


def write_event_file(path: str, events: list[Event], settings: dict[str, Any]) -> None:
    """The events as DCASE CSV, or JSON with the run's `settings`, through the one table writer."""
    with writing(path):
        table = TableWriter(path, EVENT_FIELDS, settings, key="events", errors=False)
        for e in events:
            table.add(dataclasses.asdict(e), [dataclasses.astuple(e)])
        table.close()


class ProbabilityWriter:
    """Every window's start, end and class probabilities to .csv or .npz; rows go to disk as they
    come (the .csv's temporary file, or a raw record file for the .npz) and the file appears whole
    at `close`."""

    def __init__(self, path: str, class_names: Sequence[str], model: str, frames: bool = False) -> None:
        self.path, self.class_names, self.model, self.frames = path, list(class_names), model, frames
        self.filenames: list[str] = []
        self._stack = contextlib.ExitStack()
        self._npz = Path(path).suffix.lower() == ".npz"
        self._record = np.dtype([("file", "<i4"), ("start", "<f8"), ("end", "<f8"),
                                 ("probabilities", "<f4", (len(class_names),))])
        self._frame_record = np.dtype([("file", "<i4"), ("time", "<f8"), ("probabilities", "<f4", (len(class_names),))])
        with writing(path):
            self._tmp = self._stack.enter_context(atomic_path(path))
            if self._npz:
                self._rows = self._stack.enter_context(tempfile.TemporaryFile(dir=Path(path).parent))
                if frames:
                    self._frame_rows = self._stack.enter_context(tempfile.TemporaryFile(dir=Path(path).parent))
            else:
                self._rows = self._stack.enter_context(open(self._tmp, "w", newline="", encoding="utf-8"))
                self._csv = csv.writer(self._rows)
                self._csv.writerow(["filename", "time" if frames else "start", *([] if frames else ["end"]),
                                    *self.class_names])

    def _file_index(self, filename: str) -> int:
        if not self.filenames or self.filenames[-1] != filename:
            self.filenames.append(filename)
        return len(self.filenames) - 1

    def add(self, filename: str, start: float, end: float, probs: np.ndarray) -> None:
        """One window (with --frames, a .csv holds frames only)."""
        index = self._file_index(filename)
        with writing(self.path):
            if self._npz:
                np.array([(index, start, end, probs)], dtype=self._record).tofile(self._rows)
            elif not self.frames:
                self._csv.writerow([filename, f"{start:.3f}", f"{end:.3f}", *(f"{x:.5f}" for x in probs)])

    def add_frames(self, filename: str, times: np.ndarray, probs: np.ndarray) -> None:
        """Frames (--frames): their centre times in seconds and probabilities."""
        index = self._file_index(filename)
        with writing(self.path):
            if self._npz:
                rows = np.zeros(len(times), dtype=self._frame_record)
                rows["file"], rows["time"], rows["probabilities"] = index, times, probs
                rows.tofile(self._frame_rows)
            else:
                self._csv.writerows([filename, f"{t:.3f}", *(f"{x:.5f}" for x in row)] for t, row in zip(times, probs))

    def close(self) -> None:
        """Complete the file (the .npz is built from the record file, a block at a time)."""
        with writing(self.path):
            if self._npz:
                self._rows.flush()
                count = self._rows.tell() // self._record.itemsize
                rows = np.memmap(self._rows, dtype=self._record, mode="r", shape=(count,)) if count \
                    else np.zeros(0, dtype=self._record)
                frames = self._read_frames() if self.frames else {}
                with open(self._tmp, "wb") as f:
                    np.savez(f, filenames=np.array(self.filenames), file_index=rows["file"], starts=rows["start"],
                             ends=rows["end"], probabilities=rows["probabilities"],
                             class_names=np.array(self.class_names), model=np.array(self.model), **frames)
                del rows, frames
            self._stack.close()

    def _read_frames(self) -> dict[str, np.ndarray]:
        """The frame records as the .npz's frame_times, frame_file_index and frame_probabilities."""
        self._frame_rows.flush()
        count = self._frame_rows.tell() // self._frame_record.itemsize
        rows = np.memmap(self._frame_rows, dtype=self._frame_record, mode="r", shape=(count,)) if count \
            else np.zeros(0, dtype=self._frame_record)
        return {"frame_times": rows["time"], "frame_file_index": rows["file"],
                "frame_probabilities": rows["probabilities"]}

    def abort(self) -> None:
        """Leave nothing behind (closing the temporary file may fail again, on a full disk)."""
        with contextlib.suppress(OSError):
            self._stack.__exit__(InputError, InputError("aborted"), None)


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
        with writing(self.path), atomic_write(self.path, "wb") as f:
            plot_activity(pred, self.class_names, f, self.k, events)
