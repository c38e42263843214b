"""Errors caused by the user's input (paths, data files, arguments), and how every script turns
them into one clear line on stderr and exit code 2 (the argparse convention) instead of a traceback."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence


class AudioLoadError(ValueError):
    """A file could not be read as audio; the message names the file and the problem."""


class DownloadError(RuntimeError):
    """A file could not be fetched or failed its check; the message says where to put it by hand."""


class InputError(ValueError):
    """Bad user input: a missing dataset folder or file, a malformed data file, inconsistent
    arguments. The message is one line that names the file or argument and the problem."""


def fail(message: str) -> NoReturn:
    """Print `error: <message>` on stderr and exit with status 2 (usage or input error)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_suffix(option: str, path: Optional[str | os.PathLike], suffixes: Sequence[str]) -> None:
    """`fail` unless `path` (when given) ends in one of `suffixes`, e.g. (".json", ".csv")."""
    if path and Path(path).suffix.lower() not in suffixes:
        fail(f"{path}: {option} must end in {' or '.join(suffixes)}")


def run_cli(main: Callable[[], Optional[int]]) -> Optional[int]:
    """Run a script's `main` and return its exit status; an InputError, AudioLoadError or
    DownloadError ends the program through `fail` (one line on stderr, exit status 2)."""
    try:
        return main()
    except (InputError, AudioLoadError, DownloadError) as e:
        fail(str(e))
