"""Sound event detection over recordings of any length with a clip tagger.

The recording is streamed block by block (never held whole), cut into windows of `window_length`
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

import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from datasets.audio import audio_duration, stream_audio
from helpers.inference.tagging import LoadedModel, top_k
from helpers.inference.windows import WindowEngine, num_windows


@dataclass(frozen=True)
class WindowPredictions:
    """Per-window class probabilities of one recording."""
    filename: str
    sample_rate: int
    window: int  # window length in samples
    hop: int  # hop in samples
    num_samples: int  # length of the recording at sample_rate
    probabilities: np.ndarray  # (n_windows, n_classes) float32
    frame_times: Optional[np.ndarray] = None  # (n_frames,) centre of each frame in seconds (frames=True)
    frame_probabilities: Optional[np.ndarray] = None  # (n_frames, n_classes) float32

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


def window_samples(window_length: float, hop_length: float, sample_rate: int, min_window: int = 2) -> tuple[int, int]:
    """Window and hop (seconds) in samples; ValueError unless both are positive and the window holds at
    least `min_window` samples (the frontend's FFT: a shorter window has no spectrogram frame of
    its own). A hop longer than the window leaves gaps between windows."""
    if not (math.isfinite(window_length) and math.isfinite(hop_length)):
        raise ValueError(f"window_length and hop_length must be finite numbers of seconds, got {window_length} "
                         f"and {hop_length}")
    window, hop = round(window_length * sample_rate), round(hop_length * sample_rate)
    if window < max(2, min_window):
        raise ValueError(f"window_length must be at least {max(2, min_window) / sample_rate:g} s (one FFT frame of "
                         f"{max(2, min_window)} samples at {sample_rate} Hz), got {window_length:g} s")
    if hop <= 0:
        raise ValueError(f"hop_length must be positive, got {hop_length} s")
    return window, hop


def tag_windows(tagger: LoadedModel, path: str | os.PathLike, window_length: float = 10.0,
                hop_length: float = 2.5, batch_size: int = 8, progress: bool = True, mode: str = "exact",
                frames: bool = False, frame_window: Optional[float] = None) -> WindowPredictions:
    """Stream `path` through a `WindowEngine` (mode "exact" or "shared"; frames=True adds the
    per-frame probabilities, each the head on the mean of the frames within `frame_window` seconds
    around it; default `windows.FRAME_WINDOW_SECONDS`); raises AudioLoadError for unreadable files. Memory is bounded by
    the engine and one decoded block, whatever the recording's length (the results grow by one
    row per window or frame)."""
    window_samples(window_length, hop_length, tagger.sample_rate)  # bad settings before the file
    blocks = stream_audio(path, tagger.sample_rate, block_seconds=max(window_length, 10.0))
    return tag_blocks(tagger, blocks, str(path), window_length, hop_length, batch_size, audio_duration(path),
                      progress, mode, frames, frame_window)


def tag_blocks(tagger: LoadedModel, blocks: Iterable[np.ndarray], name: str, window_length: float = 10.0,
               hop_length: float = 2.5, batch_size: int = 8, duration: Optional[float] = None,
               progress: bool = False, mode: str = "exact", frames: bool = False,
               frame_window: Optional[float] = None) -> WindowPredictions:
    """`tag_windows` for a recording given as consecutive mono blocks at the tagger's sample rate
    (`duration` in seconds, where known, sizes the progress bar)."""
    window, hop = window_samples(window_length, hop_length, tagger.sample_rate)
    engine = WindowEngine(tagger, window, hop, mode, batch_size, frames,
                          None if frame_window is None else round(frame_window * tagger.sample_rate))
    expected = num_windows(round(duration * tagger.sample_rate), window, hop) if duration else None
    rows, frame_times, frame_rows = [], [], []
    with tqdm(total=expected, desc=Path(name).name[:40], unit="window", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        for block in itertools.chain(blocks, [None]):
            done = engine.push(block) if block is not None else engine.finish()
            rows += [p for _, p in done]
            bar.update(len(done))
            if frames:
                times, probs = engine.take_frames()
                frame_times.append(times)
                frame_rows.append(probs)
    return WindowPredictions(name, tagger.sample_rate, window, hop, engine.num_samples, np.stack(rows),
                             np.concatenate(frame_times) if frames else None,
                             np.concatenate(frame_rows) if frames else None)


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
    probabilities (frame probabilities when the predictions have frames) over time, one row per
    class, with detected events outlined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    classes = top_classes(predictions, k)
    bounds, probs = predictions.segments()
    if predictions.frame_probabilities is not None:  # frames: each a bin around its centre time
        times, probs = predictions.frame_times, predictions.frame_probabilities
        step = times[1] - times[0] if len(times) > 1 else predictions.duration
        bounds = np.append(times - step / 2, times[-1] + step / 2)
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
