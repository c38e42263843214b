"""Sound event detection over recordings of any length with a clip tagger.

The recording is streamed block by block (never held whole), cut into windows of `window_size`
seconds every `hop_length` seconds, and each window is tagged. Windows cover the whole file: the
last one is zero-padded at the end. A recording shorter than a window is one window of its own
length, so it gets exactly the tags of the whole clip (padding would dilute them with silence).

Time resolution of the events is the hop: the recording is divided into hop-long segments, and a
segment's probability for a class is the average of the probabilities of the windows that overlap
it, each weighted by its overlap (the usual overlap-averaging of sliding-window tagging). A class is
active in a segment when that average reaches the threshold; consecutive active segments form one
event, whose probability is the peak segment average. A tagger says whether a sound is present
anywhere in a window, so windows that only touch an event count towards it: a low threshold lets
events grow by up to a window minus a hop on each side, a high one shrinks them towards the part
where every overlapping window agrees.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from datasets.audio import audio_duration, stream_audio
from helpers.inference.tagging import Tagger, top_k


@dataclass(frozen=True)
class WindowPredictions:
    """Per-window class probabilities of one recording."""
    filename: str
    sample_rate: int
    window: int  # window length in samples
    hop: int  # hop in samples
    num_samples: int  # length of the recording at sample_rate
    probabilities: np.ndarray  # (n_windows, n_classes) float32

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate

    @property
    def starts(self) -> np.ndarray:
        """Window start times in seconds."""
        return np.arange(len(self.probabilities)) * self.hop / self.sample_rate

    @property
    def ends(self) -> np.ndarray:
        """Window end times in seconds (the last ones clipped to the end of the recording)."""
        ends = np.arange(len(self.probabilities)) * self.hop + self.window
        return np.minimum(ends, self.num_samples) / self.sample_rate

    def segments(self) -> tuple[np.ndarray, np.ndarray]:
        """Hop-long segments: their n_segments + 1 boundaries in seconds (the last one the end of
        the recording) and their (n_segments, n_classes) overlap-weighted window averages."""
        n_windows, n_segments = len(self.probabilities), math.ceil(self.num_samples / self.hop)
        weighted = np.zeros((n_segments, self.probabilities.shape[1]))
        weights = np.zeros(n_segments)
        windows = np.arange(n_windows)
        for j in range(math.ceil(self.window / self.hop)):  # window i overlaps segments i .. i + j
            keep = windows + j < n_segments
            i, k = windows[keep], windows[keep] + j
            overlap = np.minimum.reduce([i * self.hop + self.window, (k + 1) * self.hop,
                                         np.full(len(k), self.num_samples)]) - k * self.hop
            np.add.at(weighted, k, overlap[:, None] * self.probabilities[i])
            np.add.at(weights, k, overlap)
        bounds = np.append(np.arange(n_segments) * self.hop, self.num_samples) / self.sample_rate
        return bounds, (weighted / weights[:, None]).astype(np.float32)


@dataclass(frozen=True)
class Event:
    """One detected event, DCASE style: times in seconds, peak probability."""
    filename: str
    onset: float
    offset: float
    event_label: str
    probability: float


EVENT_FIELDS = ("filename", "onset", "offset", "event_label", "probability")


def window_samples(window_size: float, hop_length: float, sample_rate: int) -> tuple[int, int]:
    """Window and hop in samples; ValueError unless 0 < hop <= window (windows must cover the file)."""
    if not (math.isfinite(window_size) and math.isfinite(hop_length)):
        raise ValueError(f"window_size and hop_length must be finite numbers of seconds, got {window_size} "
                         f"and {hop_length}")
    window, hop = round(window_size * sample_rate), round(hop_length * sample_rate)
    if window < 2:
        raise ValueError(f"window_size must be at least 2 samples, got {window_size} s")
    if not 0 < hop <= window:
        raise ValueError(f"hop_length must be positive and at most window_size, got {hop_length} s "
                         f"for windows of {window_size} s")
    return window, hop


def num_windows(num_samples: int, window: int, hop: int) -> int:
    """Windows needed to cover `num_samples` samples: one for a recording up to a window long."""
    if num_samples <= 0:
        return 0
    return 1 if num_samples <= window else math.ceil((num_samples - window) / hop) + 1


def sliding_windows(blocks: Iterable[np.ndarray], window: int, hop: int) -> Iterator[np.ndarray]:
    """Windows of `window` samples every `hop` samples from a stream of 1-D blocks, holding at most
    one window plus one block. The last window is zero-padded, except when the stream is shorter
    than one window: then it is the one window, unpadded. `num_windows` gives the count."""
    buffer = np.zeros(0, dtype=np.float32)
    total = emitted = 0
    for block in blocks:
        buffer = np.concatenate([buffer, block])
        total += len(block)
        while len(buffer) >= window:
            yield buffer[:window].copy()
            buffer = buffer[hop:]
            emitted += 1
    if total and emitted == 0:
        yield np.pad(buffer, (0, max(0, 2 - len(buffer))))  # the frontend needs two samples
    elif total and (emitted - 1) * hop + window < total:
        yield np.pad(buffer, (0, window - len(buffer)))


def _batches(items: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tag_windows(tagger: Tagger, path: str | os.PathLike, window_size: float = 10.0,
                hop_length: float = 2.5, batch_size: int = 8, progress: bool = True) -> WindowPredictions:
    """Stream `path` and tag every window (batches of `batch_size` windows); raises AudioLoadError
    for unreadable files. Memory is bounded by the window, the batch and one decoded block,
    whatever the recording's length."""
    window_samples(window_size, hop_length, tagger.sample_rate)  # bad settings before the file
    blocks = stream_audio(path, tagger.sample_rate, block_seconds=max(window_size, 10.0))
    return tag_blocks(tagger, blocks, str(path), window_size, hop_length, batch_size,
                      audio_duration(path), progress)


def tag_blocks(tagger: Tagger, blocks: Iterable[np.ndarray], name: str, window_size: float = 10.0,
               hop_length: float = 2.5, batch_size: int = 8, duration: Optional[float] = None,
               progress: bool = False) -> WindowPredictions:
    """`tag_windows` for a recording given as consecutive mono blocks at the tagger's sample rate
    (`duration` in seconds, where known, sizes the progress bar)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    window, hop = window_samples(window_size, hop_length, tagger.sample_rate)
    seen = [0]

    def counted(blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for block in blocks:
            seen[0] += len(block)
            yield block

    expected = num_windows(round(duration * tagger.sample_rate), window, hop) if duration else None
    rows = []
    with tqdm(total=expected, desc=Path(name).name[:40], unit="window", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for batch in _batches(sliding_windows(counted(blocks), window, hop), batch_size):
            rows.append(tagger.predict(np.stack(batch)))
            bar.update(len(batch))
    return WindowPredictions(name, tagger.sample_rate, window, hop, seen[0], np.concatenate(rows))


def detect_events(predictions: WindowPredictions, class_names: Sequence[str],
                  threshold: float = 0.3) -> list[Event]:
    """Events of every class whose segment probability reaches `threshold` (module doc),
    consecutive segments merged, sorted by onset then label."""
    bounds, probs = predictions.segments()
    events = []
    for c in np.flatnonzero((probs >= threshold).any(axis=0)):
        # edges of the runs of active segments: +1 where a run starts, -1 after it ends
        edges = np.diff(np.concatenate([[0], (probs[:, c] >= threshold).astype(np.int8), [0]]))
        for first, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            events.append(Event(predictions.filename, round(float(bounds[first]), 3),
                                round(float(bounds[stop]), 3), class_names[c],
                                round(float(probs[first:stop, c].max()), 4)))
    return sorted(events, key=lambda e: (e.onset, e.event_label))


def top_classes(predictions: WindowPredictions, k: int) -> np.ndarray:
    """Indices of the k classes with the highest peak probability over the windows."""
    return top_k(predictions.probabilities.max(axis=0), k)


def plot_activity(predictions: WindowPredictions, class_names: Sequence[str], path: str | os.PathLike | IO[bytes],
                  k: int = 10, events: Optional[Sequence[Event]] = None) -> None:
    """Save a PNG heat map of the k classes with the highest window probabilities: their segment
    probabilities over time (one row per class), with detected events outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    classes = top_classes(predictions, k)
    bounds, probs = predictions.segments()
    fig = Figure(figsize=(12, 1.2 + 0.35 * len(classes)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(bounds, np.arange(len(classes) + 1) - 0.5, probs[:, classes].T,
                         vmin=0.0, vmax=1.0, cmap="viridis")
    row_of = {class_names[c]: r for r, c in enumerate(classes)}
    for e in events or ():
        if e.event_label in row_of:
            ax.add_patch(Rectangle((e.onset, row_of[e.event_label] - 0.5), e.offset - e.onset, 1.0,
                                   fill=False, edgecolor="white", linewidth=1.2))
    ax.set_yticks(range(len(classes)), [class_names[c] for c in classes])
    ax.invert_yaxis()  # most active class on top
    ax.set_xlabel("time (s)")
    ax.set_title(f"{Path(predictions.filename).name}: class activity "
                 f"({predictions.window / predictions.sample_rate:g} s windows, "
                 f"{predictions.hop / predictions.sample_rate:g} s hop)")
    fig.colorbar(mesh, ax=ax, label="probability", pad=0.01)
    fig.savefig(path, format="png", dpi=100)
