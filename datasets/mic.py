"""A microphone as a stream of audio blocks, through the optional `sounddevice` package (PortAudio).

The sound card's callback queues what it records (`LiveInput`, which the web page's microphone
feeds too); the reader takes it from the queue. When the reader falls behind (a model too slow for
the hop), whole hops are dropped from the queue instead of letting it grow: one warning when
dropping starts, and `dropped_seconds` counts them.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Iterator, Optional

import numpy as np

from common.errors import AudioLoadError

logger = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-live.txt (or pip install sounddevice; on Debian/Ubuntu also apt install libportaudio2)"


def sounddevice() -> Any:
    """The sounddevice module; AudioLoadError saying what to install when it (or PortAudio) is missing."""
    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:
        raise AudioLoadError(f"--mic needs the sounddevice package, which is not usable here ({e}): {INSTALL}") from None
    return sd


def input_devices() -> list[str]:
    """One line per device that can record: index, name, channels, default rate."""
    sd = sounddevice()
    return [f"{i}: {d['name']} ({d['max_input_channels']} channel(s), {d['default_samplerate']:g} Hz)"
            for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]


class LiveInput:
    """Mono float32 blocks (1, n) at `rate` that a producer (a sound card's callback, a web page)
    `put`s as they are recorded and `blocks()` yields, until `end()`. When the reader falls behind
    by more than `max_behind_seconds` (a model too slow for the hop), whole hops of `hop_seconds`
    are dropped from the queue instead of letting it grow: one warning when dropping starts, and
    `dropped_seconds` counts them."""

    def __init__(self, name: str, rate: int, hop_seconds: float, max_behind_seconds: float) -> None:
        self.name, self.rate = name, rate
        self.hop = max(1, round(hop_seconds * self.rate))
        self.max_behind = max(self.hop, round(max_behind_seconds * self.rate))
        self.dropped = 0  # samples
        self._queue: queue.Queue[Optional[np.ndarray]] = queue.Queue()
        self._queued = 0  # samples waiting in the queue
        self._ended = False  # the end marker was taken from the queue
        self._lock = threading.Lock()

    def put(self, samples: np.ndarray) -> None:
        """Queue mono samples (copied by the caller if its buffer is reused)."""
        with self._lock:
            self._queued += len(samples)
        self._queue.put(samples)

    def end(self) -> None:
        """No more samples: `blocks()` ends after those queued."""
        self._queue.put(None)

    def _take(self, block: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if block is None:
            self._ended = True
            return None
        with self._lock:
            self._queued -= len(block)
        return block

    @property
    def dropped_seconds(self) -> float:
        return self.dropped / self.rate

    def _drop_behind(self, block: np.ndarray) -> np.ndarray:
        """`block` less whole hops from the front of what is waiting when more than `max_behind`
        samples wait after it."""
        behind = self._queued - self.max_behind
        if behind <= 0:
            return block
        drop = -(-behind // self.hop) * self.hop
        parts, have = [block], len(block)
        while have < drop + self.hop and not self._ended and not self._queue.empty():
            part = self._take(self._queue.get_nowait())
            if part is not None:
                parts.append(part)
                have += len(part)
        drop = min(drop, have - have % self.hop)
        if drop and not self.dropped:
            logger.warning("%s: the model cannot keep up with the input; dropping whole hops (the final "
                           "line says how much)", self.name)
        self.dropped += drop
        return np.concatenate(parts)[drop:]

    def blocks(self) -> Iterator[np.ndarray]:
        while not self._ended:
            block = self._take(self._queue.get())
            if block is None:
                return
            block = self._drop_behind(block)
            if len(block):
                yield block[None, :]


class Microphone(LiveInput):
    """Mono float32 blocks (1, n) from an input device (None: the default) at its default rate."""

    def __init__(self, device: Optional[str], hop_seconds: float, max_behind_seconds: float) -> None:
        sd = sounddevice()
        key: Any = int(device) if device is not None and device.isdigit() else device
        try:
            info = sd.query_devices(key, "input")
        except (ValueError, sd.PortAudioError) as e:
            devices = "; ".join(input_devices()) or "none"
            raise AudioLoadError(f"microphone {device or '(default)'}: {e}; input devices: {devices}") from None
        super().__init__(f"microphone {info['name']}", int(info["default_samplerate"]), hop_seconds,
                         max_behind_seconds)
        self._stream = sd.InputStream(device=key, channels=1, samplerate=self.rate, dtype="float32",
                                      callback=self._callback)

    def _callback(self, data: np.ndarray, frames: int, time: Any, status: Any) -> None:
        self.put(data[:, 0].copy())

    def blocks(self) -> Iterator[np.ndarray]:
        with self._stream:
            yield from super().blocks()
