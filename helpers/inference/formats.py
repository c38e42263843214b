"""The one registry of output formats: a file's suffix picks its writer, for every kind of result.

    check_output_path("--output", "tags.parquet", "tags", inputs=args.audio_path)  # before any work
    writer = open_output("tags.parquet", tags_schema({"model": "mn04_as"}), resume=True,
                         model=model_record(tagger), inputs=files)
    writer.add([("a.wav", 1, 0, "/m/09x0r", "Speech", 0.91)])
    writer.close()                                          # also after an interruption

Kinds: "tags" (inference.py --output), "probabilities" (windowed_inference.py --probabilities),
"events" (--events) and "embeddings" (embeddings.py --output); each is a `writers.Schema` made by
the function of its name here. `FORMATS` maps a suffix to its `OutputFormat`: the writer class
(helpers/inference/writers.py: temporary file and rename, symlinks written through, a full disk one
line, --resume carry-over) and the kinds it holds. `open_output` is the one way an output is opened,
so that what every output must satisfy is checked in one place: it is none of the command's
inputs (issue 31 item 9), it records the model that wrote it, and a --resume by another model is
refused (item 10).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from common.errors import InputError
from common.files import check_not_input, check_output
from helpers.inference.writers import (MODEL_RECORD, Column, CsvWriter, JsonLinesWriter, JsonWriter, NpzWriter,
                                       OutputWriter, ParquetWriter, Schema, Table, write_target)

KINDS = ("tags", "probabilities", "events", "embeddings")
STDOUT = "-"  # standard output: a live stream of JSON lines (events)
# the fields of a model record that must agree for a --resume (the name may be spelled otherwise)
MODEL_FIELDS = ("checksum", "classes", "classes_sha256", "frontend")


@dataclass(frozen=True)
class OutputFormat:
    """A format: its `suffix`, the `writer` class, the `kinds` it holds; `live`: written line by
    line as results come (no temporary file); `requires`: a module it needs, and how to `install` it."""
    suffix: str
    writer: type[OutputWriter]
    kinds: frozenset[str]
    live: bool = False
    requires: Optional[str] = None
    install: str = ""


FORMATS: dict[str, OutputFormat] = {f.suffix: f for f in (
    OutputFormat(".csv", CsvWriter, frozenset({"tags", "probabilities", "events"})),
    OutputFormat(".json", JsonWriter, frozenset({"tags", "events"})),
    OutputFormat(".jsonl", JsonLinesWriter, frozenset({"events"}), live=True),
    OutputFormat(".npz", NpzWriter, frozenset({"probabilities", "embeddings"})),
    OutputFormat(".parquet", ParquetWriter, frozenset(KINDS), requires="pyarrow",
                 install="pip install -r requirements-parquet.txt"),
)}


def suffixes(kind: str) -> tuple[str, ...]:
    """The suffixes an output of `kind` may have."""
    return tuple(s for s, f in FORMATS.items() if kind in f.kinds)


def output_format(path: str | os.PathLike, kind: str, option: str = "--output") -> OutputFormat:
    """The format of output `path` (its suffix, in any case; "-" is standard output, JSON lines):
    InputError (one line naming `option`) for a suffix `kind` has no format for, or a format whose
    package is not installed."""
    if str(path) == STDOUT and kind == "events":
        return FORMATS[".jsonl"]
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None or kind not in fmt.kinds:
        known = suffixes(kind)
        raise InputError(f"{path}: {option} must end in {', '.join(known[:-1])} or {known[-1]}")
    if fmt.requires and importlib.util.find_spec(fmt.requires) is None:
        raise InputError(f"{path}: {option} {fmt.suffix} needs the {fmt.requires} package: {fmt.install}")
    return fmt


def check_output_path(option: str, path: Optional[str | os.PathLike], kind: str,
                      inputs: Iterable[str | os.PathLike] = ()) -> Optional[OutputFormat]:
    """Before any work: `path` (when given) has a format for `kind`, can be written (its folder,
    or a symbolic link's target's) and is none of the `inputs` (the files a command reads: the
    same file under any spelling, `common.files.check_not_input`). Returns the format (None
    without a path)."""
    if not path:
        return None
    fmt = output_format(path, kind, option)
    if str(path) != STDOUT:
        check_output(write_target(path), option)
        check_not_input(option, path, inputs)
    return fmt


def check_resumed_model(fmt: OutputFormat, path: str | os.PathLike, record: Optional[Mapping[str, Any]],
                        option: str = "--output") -> None:
    """InputError unless the earlier output at `path` (if any) was written by the model `record`
    describes (`tagging.model_record`: weights, classes and frontend must agree; the name may be
    spelled otherwise). An earlier output that records no model is resumed with a warning line."""
    old = write_target(path)
    if record is None or not old.is_file():
        return
    try:
        earlier = fmt.writer.read_record(old)
    except (OSError, ValueError, KeyError, TypeError):
        return  # not readable: carry_over says so
    if earlier is None:
        print(f"warning: {path}: {option} records no model (written before outputs recorded theirs): resuming it "
              f"with {record.get('name')} unchecked", file=sys.stderr)
        return
    differ = [key for key in MODEL_FIELDS if earlier.get(key) != record.get(key)]
    if differ:
        raise InputError(f"{path}: --resume: it was written by {earlier.get('name')}, not by {record.get('name')} "
                         f"(their {', '.join(differ)} differ): resume it with that model, or write another {option}")


def open_output(path: str | os.PathLike, schema: Schema, resume: bool = False, option: str = "--output", *,
                model: Optional[Mapping[str, Any]] = None, inputs: Iterable[str | os.PathLike] = ()) -> OutputWriter:
    """The writer of output `path` in the format its suffix names (`output_format`), holding
    `schema`; `model` (`helpers.inference.tagging.model_record`) is recorded in it (`MODEL_RECORD`:
    a JSON field, a CSV's sidecar `<output>.model.json`, Parquet metadata, an .npz array of JSON);
    an output that is one of the `inputs` is an InputError. With `resume` the rows of an earlier
    file there are carried over first (its `done` says which inputs they are about), unless
    another model wrote it (`check_resumed_model`); one that cannot be read back is an InputError."""
    inputs = list(inputs)
    if str(path) != STDOUT:
        check_not_input(option, path, inputs)
    if model is not None:
        schema = replace(schema, meta={**schema.meta, MODEL_RECORD: dict(model)})
    fmt = output_format(path, schema.kind, option)
    if resume:
        check_resumed_model(fmt, path, schema.meta.get(MODEL_RECORD), option)
    writer = fmt.writer(path, schema)
    if resume:
        try:
            writer.carry_over()
        except ValueError as e:
            writer.abort()
            raise InputError(str(e)) from None
    return writer


TAG_COLUMNS = ("file", "rank", "index", "mid", "label", "probability")
EVENT_COLUMNS = ("filename", "onset", "offset", "event_label", "probability")


def tags_schema(meta: Mapping[str, Any]) -> Schema:
    """A file's ranked tags, a row each: file, rank, class index, AudioSet MID, label, probability;
    a JSON record per file (its tags nested) and the files that failed."""
    kinds = {"rank": "int", "index": "int", "probability": "float"}
    table = Table("tags", tuple(Column(c, kinds.get(c, "str")) for c in TAG_COLUMNS), key="file")
    return Schema("tags", (table,), dict(meta), json_key="results", nest="tags", errors=True)


def events_schema(meta: Mapping[str, Any]) -> Schema:
    """Sound events in the DCASE layout (filename, onset, offset, event_label, probability), a row each."""
    table = Table("events", tuple(Column(c, "str" if c in ("filename", "event_label") else "float")
                                  for c in EVENT_COLUMNS), key="filename")
    return Schema("events", (table,), dict(meta), json_key="events")


def probabilities_schema(class_names: Sequence[str], model: str, frames: bool = False) -> Schema:
    """Every window's start, end and class probabilities; with `frames` also every frame's centre
    time and probabilities (the frames are then what a single-table format holds)."""
    probs = {"kind": "vector", "labels": tuple(class_names), "digits": 5}
    windows = Table("windows", (Column("filename", npz="file_index", indexed=True),
                                Column("start", "float", digits=3, npz="starts"),
                                Column("end", "float", digits=3, npz="ends"),
                                Column("probabilities", npz="probabilities", **probs)), key="filename")
    framed = Table("frames", (Column("filename", npz="frame_file_index", indexed=True),
                              Column("time", "float", digits=3, npz="frame_times"),
                              Column("probabilities", npz="frame_probabilities", **probs)), key="filename")
    meta = {"model": model, "class_names": list(class_names)}
    return Schema("probabilities", (framed, windows) if frames else (windows,), meta)


def embeddings_schema(dim: int, meta: Mapping[str, Any]) -> Schema:
    """A file's embedding (`dim` float32 values) a row each; `meta`: model, layer, sample_rate."""
    table = Table("embeddings", (Column("filename", npz="filenames"),
                                 Column("embedding", "vector", width=dim, npz="embeddings")), key="filename")
    return Schema("embeddings", (table,), dict(meta))
