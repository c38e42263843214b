"""Event detection while the windows arrive: the events of `sed.detect_events`, each reported as
soon as the segments that decide it are final.

A hop-long segment k is overlapped by windows k - span + 1 .. k (span = ceil(window / hop)), so it
is final once window k is done; its probability is the overlap-weighted average of those windows,
summed in the order `WindowPredictions.segments` sums them, so the numbers are the same to the bit.
Only the last `span` windows are held, whatever the length of the stream.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from helpers.inference.sed import Event


@dataclass(frozen=True)
class EventChange:
    """An event starting (offset and max_probability None) or ending, times in seconds of the stream."""
    kind: str  # "start" or "end"
    label: str
    onset: float
    offset: Optional[float] = None
    max_probability: Optional[float] = None


class EventTracker:
    """Feed windows in order (`push`; a skipped window as None), get event starts and ends."""

    def __init__(self, class_names: Sequence[str], window: int, hop: int, sample_rate: int,
                 threshold: float, filename: str = "") -> None:
        self.class_names, self.window, self.hop, self.sample_rate = class_names, window, hop, sample_rate
        self.threshold, self.filename = threshold, filename
        self.span = math.ceil(window / hop)
        self._windows: deque[tuple[int, np.ndarray]] = deque()
        self._next_segment = 0  # first segment not yet final
        self._open: dict[int, tuple[int, np.float32]] = {}  # class -> (first segment, peak)
        self.events: list[Event] = []  # ended events, for the files written at the end

    def _time(self, segment: int) -> float:
        return round(segment * self.hop / self.sample_rate, 3)

    def _segment(self, k: int, num_samples: float) -> np.ndarray:
        """Probabilities of segment k: overlap-weighted average of the windows held that overlap it
        (zeros where all were skipped)."""
        weighted, weight = None, 0.0
        held = dict(self._windows)
        for j in range(self.span):
            probs = held.get(k - j)
            if probs is None:
                continue
            overlap = min((k - j) * self.hop + self.window, (k + 1) * self.hop, num_samples) - k * self.hop
            term = overlap * probs.astype(np.float64)
            weighted = term if weighted is None else weighted + term
            weight += overlap
        if weighted is None:
            return np.zeros(len(self.class_names), dtype=np.float32)
        return (weighted / weight).astype(np.float32)

    def _finalize(self, last: int, num_samples: float) -> list[EventChange]:
        changes = []
        while self._next_segment <= last:
            k = self._next_segment
            probs = self._segment(k, num_samples)
            active = set(np.flatnonzero(probs >= self.threshold).tolist())
            for c in sorted(set(self._open) - active, key=lambda c: self.class_names[c]):
                changes.append(self._end(c, k))
            for c in sorted(active, key=lambda c: self.class_names[c]):
                first, peak = self._open.get(c, (k, probs[c]))
                if c not in self._open:
                    changes.append(EventChange("start", self.class_names[c], self._time(k)))
                self._open[c] = (first, max(peak, probs[c]))
            self._next_segment += 1
            while self._windows and self._windows[0][0] <= self._next_segment - self.span:
                self._windows.popleft()
        return changes

    def _end(self, c: int, stop: int, offset: Optional[float] = None) -> EventChange:
        first, peak = self._open.pop(c)
        onset, offset = self._time(first), self._time(stop) if offset is None else offset
        self.events.append(Event(self.filename, onset, offset, self.class_names[c], round(float(peak), 4)))
        return EventChange("end", self.class_names[c], onset, offset, round(float(peak), 4))

    def push(self, index: int, probs: Optional[np.ndarray]) -> list[EventChange]:
        """Window `index` (None: skipped, it counts in no segment); returns the changes it makes final."""
        if probs is not None:
            self._windows.append((index, probs))
        return self._finalize(index, math.inf)

    def finish(self, num_samples: int, last_windows: Sequence[tuple[int, Optional[np.ndarray]]] = ()
               ) -> list[EventChange]:
        """End of a stream of `num_samples` samples: the windows from the engine's finish, then every
        remaining segment; open events end at the last sample."""
        self._windows.extend((i, p) for i, p in last_windows if p is not None)
        changes = self._finalize(math.ceil(num_samples / self.hop) - 1, num_samples)
        end = round(num_samples / self.sample_rate, 3)
        for c in sorted(self._open, key=lambda c: self.class_names[c]):
            changes.append(self._end(c, 0, end))
        return changes

    def sorted_events(self) -> list[Event]:
        """The ended events as `detect_events` orders them (onset, then label)."""
        return sorted(self.events, key=lambda e: (e.onset, e.event_label))
