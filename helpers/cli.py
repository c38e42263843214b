"""What every command-line script shares: how it stops on bad input."""
from __future__ import annotations

import sys
from typing import NoReturn


def fail(message: str) -> NoReturn:
    """Print `error: <message>` on stderr and exit with status 2 (usage or input error)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
