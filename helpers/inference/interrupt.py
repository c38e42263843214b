"""SIGINT (Ctrl-C) and SIGTERM as one exception that a multi-file run catches to keep its work.

Inside `StopSignals.installed()` the first of these signals raises `Interrupted` where the program
is (decoding, running the model), except inside `deferred()` blocks (writing a result), which finish
first. Later signals are ignored, so the run's closing writes are not cut short. A live stream turns
it around: after `hold()` a signal is only noted (the loop stops at the next block), except inside
`waiting()` (blocked on input), where it raises at once.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Callable, Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A signal asked the run to stop; `signum` says which (exit status 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """The handler of SIGINT and SIGTERM for one run (see the module doc)."""

    def __init__(self, error: Callable[[int], BaseException] = Interrupted) -> None:
        """`error(signum)` is what a signal raises (default `Interrupted`)."""
        self.signum: Optional[int] = None
        self._deferred = 0
        self._error = error

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if not self._deferred:
            raise self._error(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        """The handler in place inside the block, the previous ones restored after it."""
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def hold(self) -> None:
        """From now on a signal is only recorded (the run is writing what it finished)."""
        self._deferred += 1

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that a signal does not cut short; a signal that came meanwhile raises after it."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
        if self.signum is not None and not self._deferred:
            raise self._error(self.signum)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Inside a held run, a block (waiting for input) that a signal interrupts at once; a signal
        noted before raises on entry."""
        if self.signum is not None:
            raise self._error(self.signum)
        self._deferred -= 1
        try:
            yield
        finally:
            self._deferred += 1
