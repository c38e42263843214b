"""What the web page computes for a recording: the results of the commands, for one upload.

The recording is streamed through `sed.tag_blocks` (the windows of windowed_inference.py, never
held whole, so a night of recordings takes the memory the command takes); its events come from
`sed.detect_events` and its timeline is the command's `--plot` figure (`sed.plot_activity`). The
clip tags and the clip embedding come from one more streamed pass through the loop inference.py
and embeddings.py use (`batching.iter_files`: whole up to a minute, in chunks beyond), so the page
shows the numbers the commands print. Bad input is a `PageError` with the one line the commands
print, naming the file by the name it had in the browser.
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from common.errors import AudioLoadError
from datasets.audio import audio_duration, stream_audio
from helpers.demo.models import Model
from helpers.inference import tagging
from helpers.inference.batching import iter_files, read_or_chunk
from helpers.inference.live import counted
from helpers.inference.formats import events_schema, open_output
from helpers.inference.sed import Event, WindowPredictions, detect_events, plot_activity, tag_blocks, window_samples
from helpers.inference.windows import MODES, shared_support
from models.pretrained import DEFAULT_MODEL

BLOCK_SECONDS = 10.0  # decoded at a time (the progress moves by this much)
BATCH_SIZE = 8  # windows tagged together, as windowed_inference.py
PLOT_CLASSES = 10  # rows of the timeline, as --plot_classes
MAX_WINDOW_SECONDS = 60.0  # the models were trained on 10-s clips; a window holds this much audio at most

# progress: (fraction done, what is being done)
Progress = Callable[[float, str], None]


class PageError(ValueError):
    """A problem with the input or the settings, shown on the page as one line."""


@dataclass(frozen=True)
class Settings:
    """What the page's controls set (the flags of windowed_inference.py)."""
    model: str = DEFAULT_MODEL
    window: float = 10.0  # --window_length, seconds
    hop: float = 1.0  # --hop_length, seconds
    threshold: float = 0.3
    top_k: int = 10
    mode: str = "exact"  # --windows

    def samples(self, tagger: Model) -> tuple[int, int]:
        """Window and hop in samples at the model's rate; PageError for settings out of range."""
        if not 0.0 <= self.threshold <= 1.0:
            raise PageError(f"threshold must be between 0 and 1, got {self.threshold:g}")
        if not 1 <= self.top_k <= len(tagger.class_names):
            raise PageError(f"top-k must be between 1 and {len(tagger.class_names)}, got {self.top_k}")
        if self.mode not in MODES:
            raise PageError(f"windows must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.window <= MAX_WINDOW_SECONDS:
            raise PageError(f"window must be at most {MAX_WINDOW_SECONDS:g} s, got {self.window:g} s")
        try:
            return window_samples(self.window, self.hop, tagger.sample_rate, tagger.frontend.n_fft)
        except ValueError as e:
            raise PageError(str(e).replace("window_length", "window").replace("hop_length", "hop")) from None


@dataclass(frozen=True)
class Analysis:
    """What the page shows for one recording."""
    name: str
    model: str
    duration: float  # seconds of audio
    tags: list[tuple[str, float]]  # the clip's top-k, highest first
    events: list[Event]
    timeline: Path  # the PNG
    downloads: list[Path]  # events .csv and .json, the embedding .npy, the timeline
    elapsed: float  # seconds the analysis took
    note: str = ""  # e.g. the windows mode that was used instead of the one asked for


def analyse(model: Model, path: Path, name: str, settings: Settings, folder: Path,
            progress: Optional[Progress] = None) -> Analysis:
    """Analyse the recording at `path` (shown as `name`) and write its downloads into `folder`."""
    started = time.monotonic()
    settings.samples(model)
    mode, note = settings.mode, ""
    if mode == "shared" and shared_support(model):
        mode, note = "exact", f"{model.name} runs exact windows ({shared_support(model)})"
    try:
        duration = audio_duration(path) or 0.0
        track = _Tracker(progress, duration, model.sample_rate,
                         settings.window / settings.hop if mode == "exact" else 1.0)
        blocks = counted(stream_audio(path, model.sample_rate, BLOCK_SECONDS), track.windows)
        windows = tag_blocks(model, blocks, name, settings.window, settings.hop, BATCH_SIZE, duration, mode=mode)
        probs, embedding = clip_outputs(model, path, track.clip)
    except (AudioLoadError, ValueError) as e:
        raise PageError(str(e).replace(str(path), name)) from None
    events = detect_events(windows, model.class_names, settings.threshold)
    stem = f"{slug(Path(name).stem)}_{slug(model.name)}"
    folder.mkdir(parents=True, exist_ok=True)
    timeline = folder / f"{stem}_timeline.png"
    timeline_png(windows, model.class_names, timeline, events)
    downloads = write_results(folder, stem, model, settings, events, embedding) + [timeline]
    tags = [(model.class_names[i], round(float(probs[i]), 4)) for i in tagging.top_k(probs, settings.top_k)]
    return Analysis(name, model.name, windows.duration, tags, events, timeline, downloads,
                    time.monotonic() - started, note)


def clip_outputs(tagger: Model, path: Path, on_samples: Callable[[int], None]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The clip's class probabilities and embedding from one pass, as inference.py and
    embeddings.py compute them (a recording longer than a minute in chunks); `on_samples` is
    called with the samples of each chunk."""
    classes = len(tagger.class_names)

    def whole(batch: torch.Tensor) -> np.ndarray:
        on_samples(batch.shape[-1])
        logits, embedding = tagger.forward(batch)
        return np.concatenate([tagger.probabilities(logits), embedding.cpu().numpy()], axis=1)

    def chunked(chunks: Iterator[np.ndarray]) -> np.ndarray:
        logits, embedding = tagger.forward_chunks(counted(chunks, on_samples))
        return np.concatenate([tagger.probabilities(logits)[0], embedding[0].cpu().numpy()])

    (_, row, error), = iter_files([path], tagger.sample_rate, whole, 1, chunked_fn=chunked, read=read_or_chunk,
                                  progress=False)
    if error is not None:
        raise AudioLoadError(error)
    return row[:classes], row[classes:].astype(np.float32)


def write_results(folder: Path, stem: str, model: Model, settings: Settings, events: Sequence[Event],
                  embedding: Optional[np.ndarray] = None) -> list[Path]:
    """The page's downloads, written the way the commands write them: the events as DCASE CSV and
    as JSON with the settings and the model's record (`formats.open_output`), the embedding as .npy."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    meta = {"model": model.name, "window_length": settings.window, "hop_length": settings.hop,
            "threshold": settings.threshold}
    for suffix in (".csv", ".json"):
        written.append(folder / f"{stem}_events{suffix}")
        with open_output(written[-1], events_schema(meta), option="--events", model=tagging.model_record(model),
                         inputs=()) as writer:
            writer.add([dataclasses.astuple(e) for e in events])
    if embedding is not None:
        written.append(folder / f"{stem}_embedding.npy")
        np.save(written[-1], embedding)
    return written


def timeline_png(windows: WindowPredictions, class_names: Sequence[str], target: Path | IO[bytes],
                 events: Sequence[Event] = (), time_offset: float = 0.0) -> None:
    """The command's --plot figure of `windows` into `target` (the live view passes the latest
    windows and their start in stream time)."""
    plot_activity(windows, class_names, target, PLOT_CLASSES, events, time_offset)


def event_rows(events: Sequence[Event]) -> list[list]:
    """The events table: label, onset, offset, probability."""
    return [[e.event_label, e.onset, e.offset, e.probability] for e in events]


class _Tracker:
    """Progress over the two passes: the windows (each sample computed `weight` times) and the clip."""

    def __init__(self, progress: Optional[Progress], duration: float, rate: int, weight: float) -> None:
        self.progress, self.duration, self.rate, self.weight = progress, duration, rate, weight
        self._windows = self._clip = 0.0

    def _report(self, what: str) -> None:
        if self.progress is None or not self.duration:
            return
        done = (self.weight * self._windows + self._clip) / ((self.weight + 1) * self.duration)
        seconds = self._windows if what == "windows" else self._clip
        self.progress(min(1.0, done), f"{what}: {clock(seconds)} of {clock(self.duration)}")

    def windows(self, samples: int) -> None:
        self._windows += samples / self.rate
        self._report("windows")

    def clip(self, samples: int) -> None:
        self._clip += samples / self.rate
        self._report("clip tags")


def clock(seconds: float) -> str:
    """h:mm:ss or m:ss."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def slug(text: str) -> str:
    """`text` as a safe part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "audio"
