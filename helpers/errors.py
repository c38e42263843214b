"""Errors caused by the user's input (paths, data files, arguments), and the CLI guard that turns
them into one clear line on stderr and exit code 2 instead of a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from datasets.audio import AudioLoadError


class InputError(ValueError):
    """Bad user input: a missing dataset folder or file, a malformed data file, inconsistent
    arguments. The message is one line that names the file or argument and the problem."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's `main`; an InputError or AudioLoadError ends the program with
    `<script>: error: <message>` on stderr and exit status 2 (the argparse convention)."""
    try:
        main()
    except (InputError, AudioLoadError) as e:
        prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "efficientat"
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
