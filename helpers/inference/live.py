"""Tag a stream of audio blocks window by window and report while it runs: the loop shared by files,
standard input and a microphone.

Each block goes to the window engine; every finished window is printed (top tags), written (window
probabilities) and fed to the event tracker, whose starts and ends go out as JSON lines at once. At
the end of the stream, or when SIGINT or SIGTERM arrives, or when the only reader of stdout has
gone, the received audio is finished as at the end of a file: the last window is tagged, open events
end at the last sample, and the caller writes its files whole.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from common.errors import AudioLoadError
from datasets.stream import StreamStalled
from helpers.inference.events import EventChange, EventTracker
from helpers.inference.interrupt import Interrupted, StopSignals
from helpers.inference.outputs import PlotKeeper, event_record, window_lines
from helpers.inference.writers import JsonLinesWriter, LineOutput, OutputWriter
from helpers.inference.windows import WindowEngine

logger = logging.getLogger(__name__)


@dataclass
class Sinks:
    """Where finished windows and event changes go (each optional)."""
    class_names: Sequence[str]
    top_k: int = 0
    windows_out: Optional[LineOutput] = None  # window lines (stdout)
    events_out: Optional[JsonLinesWriter] = None  # event starts and ends as they happen
    probabilities: Optional[OutputWriter] = None  # windows (and frames) of a probabilities schema
    plot: Optional[PlotKeeper] = None
    wall_clock: bool = False
    files_only_on_stdout: bool = False  # nothing but stdout is written: stop once its reader has gone
    name_in_lines: bool = False  # JSON lines carry the file name (several files)

    def stdout_gone(self) -> bool:
        outs = [o for o in (self.windows_out, self.events_out and self.events_out.lines)
                if o is not None and o.path == "-"]
        return self.files_only_on_stdout and any(o.gone for o in outs)


@dataclass
class StreamResult:
    num_samples: int
    events: list
    stopped: Optional[int] = None  # the signal that stopped it
    reader_gone: bool = False
    error: Optional[str] = None  # why the input ended early (unreadable further on, stalled)


class StreamRun:
    """One stream through the engine, the tracker and the sinks (see module doc)."""

    def __init__(self, name: str, engine: WindowEngine, tracker: EventTracker, sinks: Sinks,
                 bad: Optional[list[tuple[int, int]]] = None) -> None:
        self.name, self.engine, self.tracker, self.sinks = name, engine, tracker, sinks
        self.bad = bad if bad is not None else []  # sample ranges holding NaN/inf (the source appends)
        self.started: Optional[float] = None
        self._warned: set[tuple[int, int]] = set()
        self._pending: list[np.ndarray] = []  # samples not yet handed to the engine
        self._pending_samples = self._windows_done = 0

    def _skip(self, index: int) -> bool:
        start = index * self.tracker.hop
        while self.bad and self.bad[0][1] <= start:
            self._warned.discard(self.bad.pop(0))
        hit = [r for r in self.bad if r[0] < start + self.tracker.window]
        for r in hit:
            if r not in self._warned:
                self._warned.add(r)
                rate = self.tracker.sample_rate
                logger.warning("%s: NaN or infinite samples at %.3f s of the stream: the windows that "
                               "hold them are skipped", self.name, r[0] / rate)
        return bool(hit)

    def _window(self, index: int, probs: np.ndarray, final: bool) -> list[EventChange]:
        rate, s = self.tracker.sample_rate, self.sinks
        start = index * self.tracker.hop
        end = min(start + self.tracker.window, self.engine.num_samples)
        if self._skip(index):
            if s.plot is not None:
                s.plot.rows.append(np.zeros_like(probs))
            return [] if final else self.tracker.push(index, None)
        if s.windows_out is not None and s.top_k:
            s.windows_out.write(window_lines(start / rate, end / rate, probs, s.class_names, s.top_k))
        if s.probabilities is not None:
            s.probabilities.add([(self.name, start / rate, end / rate, probs)], table="windows")
        if s.plot is not None:
            s.plot.rows.append(probs)
        return [] if final else self.tracker.push(index, probs)

    def _emit(self, changes: list[EventChange]) -> None:
        if self.sinks.events_out is not None:
            for change in changes:
                self.sinks.events_out.add_record(event_record(change, self.name if self.sinks.name_in_lines else None,
                                                              self.started if self.sinks.wall_clock else None))

    def _push(self, block: Optional[np.ndarray]) -> None:
        """Hand samples to the engine once they complete a window (None: all that wait): a live
        stream arrives in blocks of a few milliseconds, and passing each on costs more than the wait."""
        if block is not None:
            self._pending.append(block)
            self._pending_samples += len(block)
            due = self._windows_done * self.tracker.hop + self.tracker.window
            if self.engine.num_samples + self._pending_samples < due:
                return
        if self._pending:
            samples = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending, self._pending_samples = [], 0
            for index, probs in self.engine.push(samples):
                self._windows_done = index + 1
                self._emit(self._window(index, probs, final=False))
            self._frames()

    def _frames(self) -> None:
        """Frames the engine computed (--frames) to the probabilities file and the plot."""
        if not self.engine.frames:
            return
        times, probs = self.engine.take_frames()
        if self.sinks.probabilities is not None:
            self.sinks.probabilities.add([(self.name, t, row) for t, row in zip(times, probs)], table="frames")
        if self.sinks.plot is not None:
            self.sinks.plot.frame_times.append(times)
            self.sinks.plot.frame_rows.append(probs)

    def run(self, blocks: Iterable[np.ndarray], stop: StopSignals) -> StreamResult:
        """Tag `blocks` until they end, a signal stops them or stdout's only reader goes; then finish."""
        result = StreamResult(0, [])
        try:
            it = iter(blocks)
            while True:
                with stop.waiting():
                    block = next(it, None)
                if block is None:
                    break
                if self.started is None:
                    self.started = time.time() - len(block) / self.tracker.sample_rate
                self._push(block)
                if self.sinks.stdout_gone():
                    result.reader_gone = True
                    break
        except Interrupted as e:
            result.stopped = e.signum
        except (AudioLoadError, StreamStalled) as e:
            result.error = str(e)
        self._push(None)
        last = self.engine.finish()
        for index, probs in last:
            self._window(index, probs, final=True)
        self._frames()
        kept = [(i, None if self._skip(i) else p) for i, p in last]
        self._emit(self.tracker.finish(self.engine.num_samples, kept))
        result.num_samples = self.engine.num_samples
        result.events = self.tracker.sorted_events()
        result.stopped = result.stopped or stop.signum
        return result


def counted(blocks: Iterable[np.ndarray], on_block: Callable[[int], None]) -> Iterator[np.ndarray]:
    """`blocks`, calling `on_block(len(block))` for each (progress bars)."""
    for block in blocks:
        on_block(len(block))
        yield block
