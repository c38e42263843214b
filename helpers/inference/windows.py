"""Window computation for sound event detection: feed samples as they come, get each window's
class probabilities as soon as its last sample is in.

Provisional exact-mode engine (every window is a full forward pass of the tagger), built on
sed.sliding_windows' rules; the long-recordings work replaces this module.
"""
from __future__ import annotations

import numpy as np

from helpers.inference.tagging import Tagger


class WindowEngine:
    """Windows of `window` samples every `hop` samples over a stream of mono float32 samples at
    `tagger.sample_rate`, tagged in batches of at most `batch_size`. Holds at most one window."""

    def __init__(self, tagger: Tagger, window: int, hop: int, mode: str = "exact", batch_size: int = 8,
                 frames: bool = False) -> None:
        if mode != "exact" or frames:
            raise ValueError("this engine computes exact windows only")
        if not 0 < hop <= window or batch_size < 1:
            raise ValueError(f"need 0 < hop <= window and batch_size >= 1, got {hop}, {window}, {batch_size}")
        self.tagger, self.window, self.hop, self.batch_size = tagger, window, hop, batch_size
        self.num_samples = 0
        self._buffer = np.zeros(0, dtype=np.float32)
        self._emitted = 0

    def _tag(self, windows: list[np.ndarray]) -> list[tuple[int, np.ndarray]]:
        out = []
        for start in range(0, len(windows), self.batch_size):
            probs = self.tagger.predict(np.stack(windows[start:start + self.batch_size]))
            out += [(self._emitted + start + i, p) for i, p in enumerate(probs)]
        self._emitted += len(windows)
        return out

    def push(self, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Add samples; returns the windows completed by them as (index, probabilities), in order."""
        self.num_samples += len(samples)
        self._buffer = np.concatenate([self._buffer, np.asarray(samples, dtype=np.float32)])
        windows = []
        while len(self._buffer) >= self.window:
            windows.append(self._buffer[:self.window].copy())
            self._buffer = self._buffer[self.hop:]
        return self._tag(windows) if windows else []

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """End of stream: the last window, zero-padded (a stream shorter than a window is one
        window of its own length, at least two samples); nothing if the windows cover it."""
        total, emitted = self.num_samples, self._emitted
        if total and emitted == 0:
            last = np.pad(self._buffer, (0, max(0, 2 - len(self._buffer))))
        elif total and (emitted - 1) * self.hop + self.window < total:
            last = np.pad(self._buffer, (0, self.window - len(self._buffer)))
        else:
            return []
        self._buffer = np.zeros(0, dtype=np.float32)
        return self._tag([last])
