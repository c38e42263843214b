"""The teacher's clip-name -> row mapping (`--fname_to_index`), read without running code.

Accepted: a .json object {"<YouTube ID>": row, ...}, a .csv with the columns `name,row`, or the
pickle the original project released (fname_to_index.pkl). A pickle is read by an unpickler that
refuses every class and function reference, so a file holding anything but plain dicts, strings
and numbers is refused instead of executed.
"""
from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

from common.errors import InputError
from common.files import read_text

FORMATS = ".json (name -> row object), .csv (columns name,row) or the released .pkl"


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only built-in containers and scalars: no class or function is ever looked up."""

    def find_class(self, module: str, name: str) -> type:
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (only plain data is read)")


def _parse(path: Path) -> object:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(read_text(path))
    if suffix == ".csv":
        rows = csv.DictReader(io.StringIO(read_text(path), newline=""))
        if rows.fieldnames is None or not {"name", "row"} <= set(rows.fieldnames):
            raise ValueError("the columns must be name,row")
        return {r["name"]: int(r["row"]) for r in rows}
    with open(path, "rb") as f:
        return _PlainUnpickler(f).load()


def read_name_index(path: str | Path) -> dict[str, int]:
    """The mapping in `path` (see the module doc); InputError of one line naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: teacher file not found")
    try:
        index = _parse(path)
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError,
            UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path}: not a name -> row mapping ({FORMATS}): {first}") from None
    if not isinstance(index, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                              for k, v in index.items()):
        raise InputError(f"{path}: holds a {type(index).__name__}, not a name -> row mapping ({FORMATS})")
    return index
