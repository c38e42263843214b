"""The one writer of the inference scripts' result tables (.csv or .json), and the suffixes it knows.

A `TableWriter` takes results as they are produced: CSV rows go to the file's temporary copy and
are flushed at once, JSON records are kept until the end (a JSON document is complete only when
closed). `close()` makes the file appear complete, also after an interruption (with what was done),
atomically; an `--output` that is a symbolic link is written through (its target is replaced), never
replaced by a file.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from common.errors import check_suffix
from common.files import atomic_path, check_output

TABLE_SUFFIXES = (".json", ".csv")


def check_table_output(option: str, path: Optional[str | os.PathLike],
                       suffixes: Sequence[str] = TABLE_SUFFIXES) -> None:
    """Fail (one line) unless `path`, when given, ends in one of `suffixes` and can be written."""
    check_suffix(option, path, suffixes)
    if path:
        check_output(write_target(path), option)


def write_target(path: str | os.PathLike) -> Path:
    """Where writing `path` goes: the file a symbolic link points to, else `path` itself."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


class TableWriter:
    """Results to a .csv (`columns`, one row per value list) or a .json ({**meta, key: records,
    "errors": [...]}, without "errors" when `errors` is False); see the module doc."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], meta: dict[str, Any],
                 key: str = "results", errors: bool = True) -> None:
        self.path = Path(path)
        self.json = self.path.suffix.lower() == ".json"
        self.meta, self.key, self.columns = meta, key, list(columns)
        self.records: list[dict[str, Any]] = []
        self.errors: Optional[list[dict[str, str]]] = [] if errors else None
        self.count = 0
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_path(write_target(self.path)))
        self._file = self._stack.enter_context(open(self._tmp, "w", newline="", encoding="utf-8"))
        self._csv = None if self.json else csv.writer(self._file)
        if self._csv is not None:
            self._csv.writerow(columns)
            self._file.flush()

    def carry_over(self, column: str = "file") -> set[str]:
        """Copy the results of an earlier file at `path` (written by this class with the same
        columns) into this one; returns their `column` values (the files already done), for a
        resumed run to skip. An absent file gives nothing; an unreadable one is a ValueError."""
        old = write_target(self.path)
        if not old.is_file():
            return set()
        try:
            if self._csv is None:
                records = json.loads(old.read_text(encoding="utf-8"))[self.key]
                done = {r[column] for r in records}
                self.records += records
                self.count += len(records)
                return done
            with open(old, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                if next(reader) != self.columns:
                    raise ValueError(f"its columns are not {', '.join(self.columns)}")
                where = self.columns.index(column)
                rows = list(reader)
        except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
            raise ValueError(f"{self.path}: cannot resume from it ({type(e).__name__}: {e})") from None
        self._csv.writerows(rows)
        self._file.flush()
        done = {row[where] for row in rows if len(row) > where}
        self.count += len(done)
        return done

    def add(self, record: dict[str, Any], rows: Iterable[Sequence[Any]]) -> None:
        """One result: `record` for the JSON list, `rows` (in column order) for the CSV."""
        self.count += 1
        if self._csv is None:
            self.records.append(record)
        else:
            self._csv.writerows(rows)
            self._file.flush()

    def add_error(self, file: str, message: str) -> None:
        """A file that gave no result (listed under "errors" in the JSON; the CSV has only results)."""
        if self.errors is not None:
            self.errors.append({"file": file, "error": message})

    def close(self) -> None:
        """Complete the file: it appears at `path` (or a link's target) with everything added."""
        if self._csv is None:
            errors = {} if self.errors is None else {"errors": self.errors}
            json.dump({**self.meta, self.key: self.records, **errors}, self._file, indent=2)
        self._stack.close()

    def abort(self) -> None:
        """Leave nothing behind (the earlier file at `path`, if any, stays as it was)."""
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
