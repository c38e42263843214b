"""What the corpus job reads: audio files, folders and manifests, listed and decoded by Ray tasks.

The driver only sorts the command line's paths into files, folders and manifests and looks one
level into each folder; Ray tasks walk the sub-folders and read the manifests (text: one path per
line; CSV: a `file`, `path` or `filename` column), so millions of paths are never listed by the
driver. Every row has `file` (the path as given: the table's key) and `path` (absolute, what the
workers open). Where files can repeat (manifests) or some are done already (`--resume`), one
Ray aggregation by `file` keeps each file once and drops those already in the table.

`decode` (the pipeline's first stage, CPU tasks scaled apart from the model actors) turns files
into mono float32 waveforms at the model's rate through the project's one loader
(`read_or_chunk`); a file that cannot be read becomes its error. Files longer than
`CHUNK_SECONDS` are only marked: the model stage reads them chunk by chunk, so no long recording
is ever held whole in memory or in Ray's object store. Nothing here imports torch: decode workers
start fast and stay small.
"""
from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.aggregate import Max

from common.errors import InputError
from common.files import read_text
from datasets.audio import APPLEDOUBLE_PREFIX, AUDIO_EXTENSIONS, AudioLoadError, find_audio_files
from helpers.inference.batching import read_or_chunk
from helpers.inference.corpus_table import where

MANIFEST_COLUMNS = ("file", "path", "filename")  # the first of these a CSV manifest has is read


@dataclass
class Inputs:
    """The job's input, sorted on the driver: single files, folders and manifests (as given, and
    absolute)."""
    files: list[tuple[str, str]] = field(default_factory=list)
    folders: list[tuple[str, str]] = field(default_factory=list)
    manifests: list[tuple[str, str]] = field(default_factory=list)

    def roots(self) -> list[str]:
        """Every given path, absolute (each node must see them)."""
        return [a for _, a in self.files + self.folders + self.manifests]


def sort_inputs(audio_paths: Sequence[str], manifests: Sequence[str]) -> Inputs:
    """Inputs from --audio_path and --manifest values; InputError for a path that is not there or
    a manifest of an unknown kind. A path inside a folder that is given too is left out (each file
    is processed once)."""
    inputs = Inputs()
    for given in audio_paths:
        path = Path(given)
        if not path.exists():
            raise InputError(f"{given}: no such file or folder")
        (inputs.folders if path.is_dir() else inputs.files).append((given, os.path.abspath(given)))
    for given in manifests:
        if not Path(given).is_file():
            raise InputError(f"{given}: no such manifest file")
        if Path(given).suffix.lower() == ".csv":
            manifest_column(Path(given))
        inputs.manifests.append((given, os.path.abspath(given)))
    folders = [a for _, a in inputs.folders]
    inside = lambda a: any(a != f and a.startswith(f.rstrip(os.sep) + os.sep) for f in folders)  # noqa: E731
    inputs.files = [(g, a) for g, a in inputs.files if not inside(a)]
    inputs.folders = [(g, a) for g, a in inputs.folders if not inside(a)]
    return inputs


def manifest_column(path: Path) -> str:
    """The column of a CSV manifest that holds the paths; InputError if it has none."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    for name in MANIFEST_COLUMNS:
        if name in (h.strip() for h in header):
            return name
    raise InputError(f"{path}: a CSV manifest needs a column named {', '.join(MANIFEST_COLUMNS[:-1])} or "
                     f"{MANIFEST_COLUMNS[-1]}; its header is {','.join(header)[:80]!r}")


def _rows(files: Sequence[str], paths: Sequence[str]) -> pa.Table:
    return pa.table({"file": pa.array(files, pa.string()), "path": pa.array(paths, pa.string())})


def _walk(batch: pa.Table) -> pa.Table:
    """Audio files of the folder units in `batch` (given, absolute, recursive): a unit that is
    not recursive lists only the files directly in its folder."""
    files, paths = [], []
    for given, root, recursive in zip(*(batch.column(c).to_pylist() for c in ("given", "root", "recursive"))):
        if recursive:
            try:
                found = find_audio_files([root])
            except AudioLoadError:  # a sub-folder without audio
                found = []
        else:
            found = sorted(e.path for e in os.scandir(root) if e.is_file() and not e.name.startswith(APPLEDOUBLE_PREFIX)
                           and Path(e.name).suffix.lower() in AUDIO_EXTENSIONS)
        for p in found:
            paths.append(str(p))
            files.append(str(Path(given) / os.path.relpath(p, root)))
    return _rows(files, paths)


def _folder_units(folders: Sequence[tuple[str, str]]) -> list[dict]:
    """One unit per given folder (its own files) and per sub-folder (walked whole)."""
    units = []
    for given, root in folders:
        units.append({"given": given, "root": root, "recursive": False})
        units += [{"given": str(Path(given) / e.name), "root": e.path, "recursive": True}
                  for e in sorted(os.scandir(root), key=lambda e: e.name) if e.is_dir()]
    return units


def _manifest_lines(batch: pa.Table, base: str, column: str) -> pa.Table:
    """(file, path) of a manifest's lines: blank lines and '#' comments skipped; relative paths
    are relative to the manifest's folder."""
    files = [s.strip() for s in batch.column(column).to_pylist() if s and s.strip() and not s.strip().startswith("#")]
    return _rows(files, [f if os.path.isabs(f) else os.path.normpath(os.path.join(base, f)) for f in files])


def _read_manifest(given: str, absolute: str) -> ray.data.Dataset:
    base = os.path.dirname(absolute)
    if Path(absolute).suffix.lower() == ".csv":
        column = manifest_column(Path(absolute))
        ds = ray.data.read_csv(absolute, convert_options=pacsv.ConvertOptions(column_types={column: pa.string()}),
                               parse_options=pacsv.ParseOptions(newlines_in_values=True))
    else:
        read_text(Path(absolute))  # one-line error for a file that is not text, before Ray runs
        column, ds = "text", ray.data.read_text(absolute)
    return ds.map_batches(_manifest_lines, batch_format="pyarrow", fn_kwargs={"base": base, "column": column})


def listing(inputs: Inputs) -> tuple[ray.data.Dataset, bool]:
    """The (file, path) rows of all inputs as a Ray dataset, and whether files can repeat in it
    (manifests)."""
    parts = []
    if inputs.files:
        parts.append(ray.data.from_arrow(_rows([g for g, _ in inputs.files], [a for _, a in inputs.files])))
    units = _folder_units(inputs.folders)
    if units:
        parts.append(ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
            _walk, batch_format="pyarrow", batch_size=1))
    parts += [_read_manifest(g, a) for g, a in inputs.manifests]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds, bool(inputs.manifests)


def _flag(batch: pa.Table, done: int) -> pa.Table:
    return batch.append_column("done", pa.array([done] * batch.num_rows, pa.int8()))


def _done_files(batch: pa.Table) -> pa.Table:
    """The (file, path "", done 1) rows of the part files named in `batch`."""
    files = [pq.read_table(p, columns=["file"]).column("file") for p in batch.column("part").to_pylist()]
    column = pa.chunked_array([c for f in files for c in f.chunks], pa.string())
    return _flag(pa.table({"file": column, "path": pa.array([""] * len(column), pa.string())}), 1)


def _not_done(batch: pa.Table) -> pa.Table:
    keep = pc.equal(batch.column("done"), 0)
    return batch.filter(keep).select(["file", "path"])


def to_process(rows: ray.data.Dataset, may_repeat: bool, done_parts: Optional[Sequence[str]],
               partitions: int) -> ray.data.Dataset:
    """`rows` with each file once and without the files in `done_parts` (the table's part files
    when resuming): one hash aggregation by file over the listing and the table's files, where
    either is needed; `rows` as they are otherwise."""
    if not may_repeat and not done_parts:
        return rows
    flagged = rows.map_batches(_flag, batch_format="pyarrow", fn_kwargs={"done": 0})
    if done_parts:
        # tasks read the parts' file column (not ray.data.read_parquet: its path resolution imports
        # fsspec's HTTP filesystem from several threads, which fails at random without aiohttp)
        done = ray.data.from_items([{"part": p} for p in done_parts], override_num_blocks=min(len(done_parts), 64))
        flagged = flagged.union(done.map_batches(_done_files, batch_format="pyarrow"))
    grouped = flagged.groupby("file", num_partitions=partitions).aggregate(
        Max("done", alias_name="done"), Max("path", alias_name="path"))
    return grouped.map_batches(_not_done, batch_format="pyarrow")


def decode(batch: pa.Table, sample_rate: int) -> pa.Table:
    """Decode the files of `batch` (file, path): their waveforms (empty for errors and for long
    files, marked `long`), durations, errors, and where and how long decoding took."""
    node, pid = where()
    waves, durations, errors, long, seconds = [], [], [], [], []
    for given, path in zip(batch.column("file").to_pylist(), batch.column("path").to_pylist()):
        start = time.perf_counter()
        wave, error, is_long = np.zeros(0, np.float32), None, False
        try:
            whole, _ = read_or_chunk(Path(path), sample_rate)
            if whole is None:
                is_long = True
            else:
                wave = whole
        except AudioLoadError as e:
            error = str(e).replace(path, given, 1)
        waves.append(wave)
        durations.append(len(wave) / sample_rate if len(wave) else None)
        errors.append(error)
        long.append(is_long)
        seconds.append(time.perf_counter() - start)
    offsets = np.cumsum([0] + [len(w) for w in waves], dtype=np.int64)
    values = np.concatenate(waves) if waves else np.zeros(0, np.float32)
    return pa.table({
        "file": batch.column("file"), "path": batch.column("path"),
        "waveform": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32())),
        "long": pa.array(long, pa.bool_()), "duration": pa.array(durations, pa.float64()),
        "error": pa.array(errors, pa.string()), "_decode_node": pa.array([node] * len(waves), pa.string()),
        "_decode_pid": pa.array([pid] * len(waves), pa.int64()), "_decode_s": pa.array(seconds, pa.float64())})
