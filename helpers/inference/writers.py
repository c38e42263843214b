"""The writers of the output formats (the registry that picks one by suffix: `formats.py`).

Every output is a `Schema`: one or more tables of typed columns (`Column`), the run's settings
(`meta`) and how a JSON document nests its records. Every writer takes rows as they are produced
(`add`) and gives the same guarantees:

- the rows go to a temporary file beside the output (`common.files.atomic_path`) and the output
  appears complete, atomically, at `close()`, also after an interruption (with what was added);
  `abort()` leaves nothing (an earlier file stays as it was);
- an output that is a symbolic link is written through (its target is replaced), never replaced;
- a full disk (or quota) is the scripts' one line naming the output, any other write error an
  InputError naming it (`writing`);
- `carry_over()` copies the rows of an earlier output of the same schema (`--resume`);
  `read_record(path)` reads back the model record (`meta[MODEL_RECORD]`) an output holds.

JSON lines are the exception: each line is written and flushed as it comes (a live stream of
events, to a file or standard output), so they have no temporary file.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import select
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from common.errors import InputError
from common.files import DISK_FULL, atomic_path, atomic_write, disk_full

Row = Sequence[Any]  # one value per column; a vector column's value is a 1-D float array
MODEL_RECORD = "model_record"  # the meta key of the model that wrote an output (formats.open_output)


@dataclass(frozen=True)
class Column:
    """A column: `kind` "str", "int", "float" or "vector" (float32 values: `labels` names them,
    one column each in CSV and Parquet; without labels a vector is one list column of `width`);
    `digits` the decimals CSV writes; `npz` its array's name in an .npz (None: not there), and
    `indexed` that it is stored as an index into the output's list of names (`Schema.names`)."""
    name: str
    kind: str = "str"
    labels: tuple[str, ...] = ()
    width: int = 0
    digits: Optional[int] = None
    npz: Optional[str] = None
    indexed: bool = False

    @property
    def size(self) -> int:
        return len(self.labels) or self.width

    def headers(self) -> list[str]:
        """The CSV columns it takes: itself, or a vector's labels."""
        return list(self.labels) if self.kind == "vector" else [self.name]


@dataclass(frozen=True)
class Table:
    """Rows of `columns`; `key` names the column that says which input a row is about."""
    name: str
    columns: tuple[Column, ...]
    key: str = "file"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


@dataclass(frozen=True)
class Schema:
    """What an output holds: `kind` (tags, probabilities, events, embeddings), its `tables` (the
    first is the one a single-table format writes), `meta` (the model and settings: JSON fields,
    Parquet metadata, .npz arrays), the JSON document's list (`json_key`), a JSON record per input
    with its rows under `nest`, or a record per row; `errors`: the JSON lists the inputs that gave
    no result; `names`: the .npz array of the names an `indexed` column refers to."""
    kind: str
    tables: tuple[Table, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    json_key: str = "results"
    nest: Optional[str] = None
    errors: bool = False
    names: str = "filenames"

    @property
    def table(self) -> Table:
        return self.tables[0]


def write_target(path: str | os.PathLike) -> Path:
    """Where writing `path` goes: the file a symbolic link points to, else `path` itself."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Inside: a full disk or quota is the scripts' shared one line (`common.files.disk_full`, exit 1);
    any other OSError (a file size limit) is an InputError naming `path`."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full(e, path) from None
        raise InputError(f"{path}: cannot be written ({e.strerror or e})") from None


class OutputWriter:
    """The writer of one output file (see the module doc). `count`: the inputs added to the first
    table (one `add` each) and carried over; `done`: the keys carried over."""

    temporary = True  # rows go to a temporary file that appears at `close`

    def __init__(self, path: str | os.PathLike, schema: Schema) -> None:
        self.path, self.schema = Path(path), schema
        self.count = 0
        self.done: set[str] = set()
        self.errors: list[dict[str, str]] = []
        self._stack = contextlib.ExitStack()
        with writing(self.path):
            self._tmp = self._stack.enter_context(atomic_path(write_target(self.path))) if self.temporary else None
            self._open()

    def _open(self) -> None:
        """Start the (temporary) file."""

    def _write(self, table: Table, rows: Sequence[Row]) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Complete the temporary file before it is renamed."""

    def _carry(self, old: Path) -> list[str]:
        """Write the rows of the earlier output `old`; their keys, one per row."""
        raise ValueError(f"{type(self).__name__} cannot continue an earlier file")

    @classmethod
    def read_record(cls, old: Path) -> Optional[dict[str, Any]]:
        """The model record (`meta[MODEL_RECORD]`) of the earlier output `old`; None if it has none."""
        return None

    def add(self, rows: Sequence[Row], table: Optional[str] = None) -> None:
        """The rows of one result (in column order) to `table` (default: the first)."""
        target = self.schema.table if table is None else next(t for t in self.schema.tables if t.name == table)
        if target is self.schema.table:
            self.count += 1
        with writing(self.path):
            self._write(target, rows)

    def add_error(self, name: str, message: str) -> None:
        """An input that gave no result (listed in a JSON document whose schema has `errors`)."""
        self.errors.append({self.schema.table.key: name, "error": message})

    def carry_over(self) -> set[str]:
        """Copy the rows of an earlier output at `path` (written with this schema) into this one;
        returns the inputs they are about (`done`), for a resumed run to skip. No earlier file
        gives nothing; one that cannot be read back is a ValueError."""
        old = write_target(self.path)
        if not old.is_file():
            return set()
        try:
            keys = self._carry(old)
        except (OSError, ValueError, KeyError, TypeError, StopIteration) as e:
            raise ValueError(f"{self.path}: cannot resume from it ({type(e).__name__}: {e})") from None
        self.done |= set(keys)
        self.count += len(set(keys))
        return self.done

    def close(self) -> None:
        """Complete the file: it appears at `path` (or a link's target) with everything added."""
        with writing(self.path):
            self._finish()
            self._stack.close()

    def abort(self) -> None:
        """Leave nothing behind (closing the temporary file may fail again, on a full disk)."""
        with contextlib.suppress(OSError):
            self._stack.__exit__(InputError, InputError("aborted"), None)

    def __enter__(self) -> "OutputWriter":
        return self

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], tb: Any) -> None:
        """Closed when the block ends, also by an interruption (what was added is kept); aborted
        when it ends by another exception."""
        if kind is None or issubclass(kind, (KeyboardInterrupt, SystemExit)) or getattr(error, "signum", None):
            self.close()
        else:
            self.abort()


def _plain(value: Any) -> Any:
    """A value as JSON and CSV write it (NumPy scalars as Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value


class CsvWriter(OutputWriter):
    """Comma-separated rows of the first table under a header line, each flushed as added."""

    def _open(self) -> None:
        self._file = self._stack.enter_context(open(self._tmp, "w", newline="", encoding="utf-8"))
        self._csv = csv.writer(self._file)
        self._header = [h for c in self.schema.table.columns for h in c.headers()]
        self._csv.writerow(self._header)
        self._file.flush()

    @staticmethod
    def _cells(column: Column, value: Any) -> list[Any]:
        values = value if column.kind == "vector" else [value]
        return [f"{v:.{column.digits}f}" if column.digits is not None else _plain(v) for v in values]

    def _write(self, table: Table, rows: Sequence[Row]) -> None:
        if table is self.schema.table:
            self._csv.writerows([cell for c, v in zip(table.columns, row) for cell in self._cells(c, v)]
                                for row in rows)
            self._file.flush()

    def _carry(self, old: Path) -> list[str]:
        with open(old, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            if next(reader) != self._header:
                raise ValueError(f"its columns are not {', '.join(self._header)}")
            rows = list(reader)
        self._csv.writerows(rows)
        self._file.flush()
        where = self._header.index(self.schema.table.key)
        return [row[where] for row in rows if len(row) > where]

    @staticmethod
    def sidecar(target: Path) -> Path:
        """Where a CSV's model record lies: `<file>.model.json` beside it (a CSV has no header
        fields, and a comment line would break the readers of plain CSV)."""
        return target.with_name(target.name + ".model.json")

    @classmethod
    def read_record(cls, old: Path) -> Optional[dict[str, Any]]:
        sidecar = cls.sidecar(old)
        return json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else None

    def _finish(self) -> None:
        sidecar = self.sidecar(write_target(self.path))
        record = self.schema.meta.get(MODEL_RECORD)
        if record is None:
            with contextlib.suppress(FileNotFoundError):
                sidecar.unlink()  # an earlier run's: not this file's model
            return
        with atomic_write(sidecar) as f:
            json.dump(record, f, indent=2)


class JsonWriter(OutputWriter):
    """One JSON document, written at `close`: {**meta, json_key: records, "errors": [...]}, a
    record per input (its rows under `nest`) or, without `nest`, per row."""

    def _open(self) -> None:
        self.records: list[dict[str, Any]] = []

    def _write(self, table: Table, rows: Sequence[Row]) -> None:
        if table is not self.schema.table:
            return
        dicts = [{c.name: (v.tolist() if isinstance(v, np.ndarray) else _plain(v)) for c, v in zip(table.columns, row)}
                 for row in rows]
        if self.schema.nest is None:
            self.records += dicts
        elif dicts:
            key = table.key
            self.records.append({key: dicts[0][key], self.schema.nest: [{k: v for k, v in d.items() if k != key}
                                                                         for d in dicts]})

    def _carry(self, old: Path) -> list[str]:
        records = json.loads(old.read_text(encoding="utf-8"))[self.schema.json_key]
        self.records += records
        return [r[self.schema.table.key] for r in records]

    @classmethod
    def read_record(cls, old: Path) -> Optional[dict[str, Any]]:
        return json.loads(old.read_text(encoding="utf-8")).get(MODEL_RECORD)

    def _finish(self) -> None:
        errors = {"errors": self.errors} if self.schema.errors else {}
        with open(self._tmp, "w", encoding="utf-8") as f:
            json.dump({**self.schema.meta, self.schema.json_key: self.records, **errors}, f, indent=2)


class LineOutput:
    """Text lines to stdout ("-") or a file, each flushed as written; `gone` once stdout's reader left."""

    def __init__(self, path: str) -> None:
        self.path = path
        with writing(path):
            self._file: IO[str] = sys.stdout if path == "-" else open(write_target(path), "w", encoding="utf-8")

    def write(self, text: str) -> None:
        with writing(self.path):
            self._file.write(text)
            self._file.flush()

    @property
    def gone(self) -> bool:
        """True once the reader of a stdout pipe has closed it (seen by a failed write, or by poll,
        for a stream that has nothing to write for a long time)."""
        if self._file is not sys.stdout:
            return False
        if getattr(self._file, "reader_gone", False):
            return True
        try:
            fd = self._file.fileno()
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return False
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        if self._file is not sys.stdout:
            with writing(self.path):
                self._file.close()


class JsonLinesWriter(OutputWriter):
    """A JSON object per line, written and flushed as it comes, to a file or standard output ("-"):
    a live stream (no temporary file; what was written stays). `add` writes a row per line,
    `add_record` any object."""

    temporary = False

    def _open(self) -> None:
        self.lines = LineOutput(str(self.path))
        self._stack.callback(self.lines.close)

    def add_record(self, record: Mapping[str, Any]) -> None:
        self.lines.write(json.dumps(dict(record)) + "\n")

    def _write(self, table: Table, rows: Sequence[Row]) -> None:
        if table is self.schema.table:
            for row in rows:
                self.add_record({c.name: (v.tolist() if isinstance(v, np.ndarray) else _plain(v))
                                 for c, v in zip(table.columns, row)})

    def abort(self) -> None:
        self.lines.close()


class NpzWriter(OutputWriter):
    """NumPy arrays, one per column with an `npz` name (rows streamed to a record file beside the
    output, so memory does not grow with them), the names `indexed` columns refer to, and every
    `meta` value as an array; built a table at a time at `close`."""

    def _open(self) -> None:
        self.names: list[str] = []
        self._records: dict[str, tuple[np.dtype, IO[bytes]]] = {}
        self._strings: dict[str, list[str]] = {}  # str columns stored whole (not indexed)
        for table in self.schema.tables:
            fields = [(c.npz, "<i4" if c.indexed else "<f4" if c.kind == "vector" else "<f8" if c.kind == "float"
                       else "<i8", (c.size,) if c.kind == "vector" else ()) for c in table.columns
                      if c.npz and (c.kind != "str" or c.indexed)]
            folder = write_target(self.path).parent
            self._records[table.name] = (np.dtype(fields), self._stack.enter_context(tempfile.TemporaryFile(dir=folder)))
            self._strings.update({c.npz: [] for c in table.columns if c.npz and c.kind == "str" and not c.indexed})

    def _index(self, name: str) -> int:
        if not self.names or self.names[-1] != name:
            self.names.append(name)
        return len(self.names) - 1

    def _write(self, table: Table, rows: Sequence[Row]) -> None:
        dtype, file = self._records[table.name]
        records = np.zeros(len(rows), dtype=dtype)
        for column, values in zip(table.columns, zip(*rows)):
            if column.npz in self._strings:
                self._strings[column.npz] += [str(v) for v in values]
            elif column.npz and column.indexed:
                records[column.npz] = [self._index(str(v)) for v in values]
            elif column.npz:
                records[column.npz] = np.asarray(values)
        records.tofile(file)

    def _arrays(self, table: Table) -> dict[str, np.ndarray]:
        dtype, file = self._records[table.name]
        file.flush()
        count = file.tell() // dtype.itemsize if dtype.itemsize else 0
        rows = np.memmap(file, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)
        return {name: rows[name] for name in dtype.names or ()}

    def _finish(self) -> None:
        arrays: dict[str, np.ndarray] = {}
        for table in self.schema.tables:
            arrays.update(self._arrays(table))
        if any(c.indexed for t in self.schema.tables for c in t.columns):
            arrays[self.schema.names] = np.array(self.names)
        arrays.update({name: np.array(values) for name, values in self._strings.items()})
        arrays.update({key: np.array(json.dumps(value) if isinstance(value, Mapping) else value)
                       for key, value in self.schema.meta.items()})  # a mapping (the model record) as JSON
        with open(self._tmp, "wb") as f:
            np.savez(f, **arrays)
        del arrays


class ParquetWriter(OutputWriter):
    """An Apache Parquet file of the first table (pyarrow; `requirements-parquet.txt`): a column
    per column (a labelled vector: a float32 column per label; an unlabelled one: a fixed-size list),
    `meta` as JSON under the schema's metadata key b"efficientat", rows written in row groups as
    they come."""

    GROUP_ROWS = 4096

    def _open(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}
        fields = []
        for c in self.schema.table.columns:
            if c.kind != "vector":
                fields.append(pa.field(c.name, types[c.kind]))
            elif c.labels:
                fields += [pa.field(label, pa.float32()) for label in c.labels]
            else:
                fields.append(pa.field(c.name, pa.list_(pa.float32(), c.width)))
        meta = json.dumps({"kind": self.schema.kind, **self.schema.meta})
        self._arrow = pa.schema(fields, metadata={b"efficientat": meta.encode()})
        self._parquet = self._stack.enter_context(pq.ParquetWriter(self._tmp, self._arrow))
        self._pending: list[Row] = []

    def _flush(self) -> None:
        import pyarrow as pa
        if not self._pending:
            return
        columns: list[Any] = []
        for k, c in enumerate(self.schema.table.columns):
            values = [row[k] for row in self._pending]
            if c.kind != "vector":
                columns.append([_plain(v) for v in values])
                continue
            matrix = np.asarray(np.stack(values), dtype=np.float32)
            if c.labels:
                columns += list(matrix.T)
            else:
                columns.append(pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), c.width))
        self._parquet.write_batch(pa.record_batch(columns, schema=self._arrow))
        self._pending = []

    def _write(self, table: Table, rows: Sequence[Row]) -> None:
        if table is self.schema.table:
            self._pending += rows
            if len(self._pending) >= self.GROUP_ROWS:
                self._flush()

    @classmethod
    def read_record(cls, old: Path) -> Optional[dict[str, Any]]:
        import pyarrow.parquet as pq
        metadata = pq.read_schema(old).metadata or {}
        return json.loads(metadata.get(b"efficientat", b"{}")).get(MODEL_RECORD)

    def _carry(self, old: Path) -> list[str]:
        import pyarrow.parquet as pq
        earlier = pq.read_table(old)
        if earlier.schema.names != self._arrow.names:
            raise ValueError(f"its columns are not {', '.join(self._arrow.names)}")
        self._flush()
        self._parquet.write_table(earlier.cast(self._arrow))
        return [str(v) for v in earlier.column(self.schema.table.key).to_pylist()]

    def _finish(self) -> None:
        self._flush()
