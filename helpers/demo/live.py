"""The web page's Live tab: a browser's microphone through the live loop of windowed_inference.py.

The page hands each recorded piece to `LiveSession.feed`; a thread runs the command's loop
(`helpers.inference.live.StreamRun`: the window engine, the event tracker) over them, resampled
as a stream (`datasets.stream.Stream`), so the tags and events are those the command finds for
the same audio; a second thread redraws the timeline of the last `LIVE_SECONDS` when windows
came. The page asks `snapshot()` for what to show: the latest window's tags, the newest timeline,
and the events so far (an open one without its offset). It answers at once, so that the browser's
next piece is taken as soon as it comes (Gradio drops pieces sent while the last is being
answered). Memory stays bounded: the session keeps the windows of the timeline and the events.
"""
from __future__ import annotations

import io
import json
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from datasets.mic import LiveInput
from datasets.stream import Stream
from helpers.demo.analysis import BATCH_SIZE, PLOT_CLASSES, Settings, slug, timeline_png, write_results
from helpers.demo.models import Model
from helpers.inference import tagging
from helpers.inference.events import EventTracker
from helpers.inference.interrupt import StopSignals
from helpers.inference.live import Sinks, StreamResult, StreamRun
from helpers.inference.outputs import PlotKeeper
from helpers.inference.sed import Event, WindowPredictions
from helpers.inference.windows import WindowEngine

logger = logging.getLogger(__name__)

LIVE_SECONDS = 120.0  # the live timeline shows this much of the latest audio
PAINT_EVERY = 0.25  # seconds between looks for new windows to draw
OPEN = "ongoing"  # the offset and probability of an event that has not ended
SOURCE = "browser microphone"


class EventLines:
    """Where the live loop writes its event starts and ends (`Sinks.events_out`): kept as records."""

    path = "page"  # not stdout: the loop never waits for a reader
    gone = False
    lines = None  # no line output of its own

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, text: str) -> None:
        """JSON lines, as the loop writes them to a file."""
        self.records += [json.loads(line) for line in text.splitlines() if line.strip()]

    def add_record(self, record: dict) -> None:
        """One record, as the loop hands it to a JSON-lines writer."""
        self.records.append(dict(record))

    def close(self) -> None:
        pass


class RecentRows(deque):
    """The latest window probabilities (as many as the live timeline shows), where the live loop
    appends them (`PlotKeeper.rows`), counting every one."""

    def __init__(self, span: int) -> None:
        super().__init__(maxlen=span)
        self.total = 0
        self._lock = threading.Lock()

    def append(self, row: np.ndarray) -> None:
        with self._lock:
            super().append(row)
            self.total += 1

    def latest(self) -> tuple[list[np.ndarray], int]:
        """The rows kept and how many came in all, at one moment."""
        with self._lock:
            return list(self), self.total


@dataclass
class Snapshot:
    """What the Live tab shows at one moment."""
    seconds: float  # audio received
    windows: int  # windows tagged
    tags: list[tuple[str, float]]  # the latest window's top-k
    events: list[list] = field(default_factory=list)  # label, onset, offset and probability (OPEN while open)
    timeline: Optional[bytes] = None  # a PNG; None: no window yet, or none since the last one
    lost: float = 0.0  # seconds recorded that never arrived (the browser sends a piece only after the last)
    dropped: float = 0.0  # seconds dropped because the model could not keep up


class LiveSession:
    """One recording from one browser: `feed` its pieces, `snapshot` what to show, `finish` at the end."""

    def __init__(self, model: Model, settings: Settings, rate: int, max_behind: Optional[float] = None) -> None:
        """`max_behind`: seconds of audio waiting for the model beyond which whole hops are dropped
        (default: as windowed_inference.py --mic, two hops and at least a second)."""
        self.tagger, self.settings = model, settings
        self.model = model.name
        self.window, self.hop = settings.samples(model)
        self.input = LiveInput(SOURCE, rate, settings.hop,
                               max(2 * settings.hop, 1.0) if max_behind is None else max_behind)
        stream = Stream(SOURCE, rate, 1, self.input.blocks())
        keeper = PlotKeeper("", model.class_names, PLOT_CLASSES)
        self.rows = keeper.rows = RecentRows(math.ceil(LIVE_SECONDS * model.sample_rate / self.hop))
        self.lines = EventLines()
        sinks = Sinks(model.class_names, events_out=self.lines, plot=keeper)
        engine = WindowEngine(model, self.window, self.hop, "exact", BATCH_SIZE)
        tracker = EventTracker(model.class_names, self.window, self.hop, model.sample_rate, settings.threshold,
                               SOURCE)
        self._run = StreamRun(SOURCE, engine, tracker, sinks, stream.bad)
        self.received = 0  # samples at `rate`
        self._arrivals: Optional[tuple[float, int]] = None  # when the first piece came, and its samples
        self._last_arrival = 0.0
        self.rate = rate
        self.result: Optional[StreamResult] = None
        self.error: Optional[str] = None
        self._timeline: tuple[Optional[bytes], int] = (None, 0)  # the newest PNG and the windows it shows
        self._shown = 0  # windows in the last timeline `snapshot` gave
        self._thread = threading.Thread(target=self._loop, args=(stream,), name="live-page", daemon=True)
        self._painter = threading.Thread(target=self._paint, name="live-page-timeline", daemon=True)
        self._thread.start()
        self._painter.start()

    def _loop(self, stream: Stream) -> None:
        try:
            self.result = self._run.run(stream.blocks(self.tagger.sample_rate), StopSignals())
            self.error = self.result.error
        except Exception as e:  # noqa: BLE001 (shown on the page; the server goes on)
            logger.exception("live stream failed")
            self.error = f"{SOURCE}: {type(e).__name__}: {e}"

    def _paint(self) -> None:
        """Redraw the timeline whenever windows came, until the stream has ended and its last is drawn."""
        drawn = 0
        while True:
            ended = not self._thread.is_alive()
            rows, total = self.rows.latest()
            if total != drawn:
                self._timeline = (self._draw(rows, total), total)
                drawn = total
            elif ended:
                return
            else:
                time.sleep(PAINT_EVERY)

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def feed(self, samples: np.ndarray) -> None:
        """Mono float32 samples at the session's rate, as recorded."""
        now = time.monotonic()
        if self._arrivals is None:
            self._arrivals = (now, len(samples))
        self._last_arrival = now
        self.received += len(samples)
        self.input.put(np.ascontiguousarray(samples, dtype=np.float32))

    def finish(self, timeout: float = 60.0) -> None:
        """End of the recording: the last window is tagged and open events end (as at the end of a
        stream), and the timeline shows them."""
        self.input.end()
        self._thread.join(timeout)
        self._painter.join(timeout)

    def lost(self) -> float:
        """Seconds of audio missing between the first piece and the latest: the time between their
        arrivals less the audio that came after the first."""
        if self._arrivals is None:
            return 0.0
        first, samples = self._arrivals
        return max(0.0, self._last_arrival - first - (self.received - samples) / self.rate)

    def ended_events(self) -> list[Event]:
        """The events that have ended, sorted (all of them once finished)."""
        return self._run.tracker.sorted_events()

    def snapshot(self, top_k: int) -> Snapshot:
        """The latest tags and events, and the timeline if a newer one was drawn since the last snapshot."""
        rows, total = self.rows.latest()
        shot = Snapshot(self.received / self.rate, total, [], self._event_rows(), lost=self.lost(),
                        dropped=self.input.dropped / self.rate)
        if rows:
            shot.tags = [(self.tagger.class_names[i], round(float(rows[-1][i]), 4))
                         for i in tagging.top_k(rows[-1], top_k)]
        png, drawn = self._timeline
        if png is not None and drawn != self._shown:
            shot.timeline, self._shown = png, drawn
        return shot

    def _event_rows(self) -> list[list]:
        open_: dict[tuple[str, float], list] = {}
        rows = []
        for r in list(self.lines.records):
            if r["event"] == "start":
                open_[(r["label"], r["onset"])] = [r["label"], r["onset"], OPEN, OPEN]
                rows.append(open_[(r["label"], r["onset"])])
            else:
                row = open_.pop((r["label"], r["onset"]), None)
                if row is None:
                    rows.append(row := [r["label"], r["onset"], OPEN, OPEN])
                row[2], row[3] = r["offset"], r["max_probability"]
        return rows

    def _draw(self, rows: list[np.ndarray], total: int) -> bytes:
        """The timeline of the windows `rows` (the last of `total`), events outlined; open ones up to now."""
        first = total - len(rows)
        rate = self.tagger.sample_rate
        windows = WindowPredictions(SOURCE, rate, self.window, self.hop, (len(rows) - 1) * self.hop + self.window,
                                    np.stack(rows))
        end = round(((total - 1) * self.hop + self.window) / rate, 3)
        events = [Event(SOURCE, onset, end if offset == OPEN else offset, label, 0.0)
                  for label, onset, offset, _ in self._event_rows()]
        png = io.BytesIO()
        timeline_png(windows, self.tagger.class_names, png, events, first * self.hop / rate)
        return png.getvalue()

    def downloads(self, folder: Path) -> list[Path]:
        """The events found so far as the file mode's .csv and .json."""
        return write_results(folder, f"live_{slug(self.model)}", self.tagger, self.settings, self.ended_events())
