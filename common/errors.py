"""Errors caused by the user's input (paths, data files, arguments), and how every script turns
them into one clear line on stderr and exit code 2 (the argparse convention) instead of a traceback."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn, Optional, Sequence


class AudioLoadError(ValueError):
    """A file could not be read as audio; the message names the file and the problem."""


class DownloadError(RuntimeError):
    """A file could not be fetched or failed its check; the message says where to put it by hand."""


class InputError(ValueError):
    """Bad user input: a missing dataset folder or file, a malformed data file, inconsistent
    arguments. The message is one line that names the file or argument and the problem."""


@contextmanager
def as_input_error() -> Iterator[None]:
    """Inside: a ValueError or RuntimeError (an unreadable file, a failed download, settings a
    model or checkpoint refuses) is bad input, raised again as a one-line InputError."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, RuntimeError) as e:
        raise InputError(str(e)) from None


def fail(message: str, status: int = 2) -> NoReturn:
    """Print `error: <message>` on stderr and exit with `status` (2: usage or input error)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def exit_status(done: int, failed: int, signum: Optional[int] = None) -> int:
    """The exit status of a command over many inputs: 128 + the signal that stopped it (130 for
    SIGINT, 143 for SIGTERM; what was done is written), 2 when nothing was done, 1 when some
    inputs failed (the others are done), 0 when all were done."""
    if signum is not None:
        return 128 + signum
    if not done:
        return 2
    return 1 if failed else 0


def no_space_message(error: OSError) -> Optional[str]:
    """The one line for an OSError of a full disk or quota (ENOSPC, EDQUOT), naming the file
    when the error does; None for any other error."""
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    what = "no space left on device" if error.errno == errno.ENOSPC else "disk quota exceeded"
    return f"{error.filename}: {what}" if error.filename else what


def check_suffix(option: str, path: Optional[str | os.PathLike], suffixes: Sequence[str]) -> None:
    """`fail` unless `path` (when given) ends in one of `suffixes`, e.g. (".json", ".csv")."""
    if path and Path(path).suffix.lower() not in suffixes:
        fail(f"{path}: {option} must end in {' or '.join(suffixes)}")


class _PipeTolerantStdout:
    """sys.stdout that, once its reader has gone (`script | head`), discards further output
    instead of raising BrokenPipeError, so the script still finishes its work and writes its files."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.reader_gone = False  # set once the reader has closed the pipe

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard()

    def _discard(self) -> None:
        self.reader_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # later flushes, also at exit, go nowhere
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def run_cli(main: Callable[[], Optional[int]]) -> Optional[int]:
    """Run a script's `main` and return its exit status; an InputError, AudioLoadError or
    DownloadError ends the program through `fail` (one line on stderr, exit status 2), a full
    disk too (`no_space_message`, exit status 1). Output
    piped into a command that stops reading early is discarded from then on, without a traceback."""
    stdout, sys.stdout = sys.stdout, _PipeTolerantStdout(sys.stdout)
    try:
        return main()
    except (InputError, AudioLoadError, DownloadError) as e:
        fail(str(e))
    except OSError as e:
        message = no_space_message(e)
        if message is None:
            raise
        fail(message, status=1)
    finally:
        sys.stdout = stdout
