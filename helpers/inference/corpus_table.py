"""The corpus job's output: a folder of Parquet part files with one row per input file, and the
`manifest.json` beside them (docs/corpus.md, "Output").

Every part is written whole or not at all: to a hidden temporary file beside it, then renamed
(`common.files.publish`). Its name is a hash of the files it holds, so a write that Ray runs twice
(a worker died after the rename, before reporting it) replaces the part by the same rows instead
of adding a second copy. Before the rename a writer checks the folder's job token: a writer left
over from a stopped job never publishes into the next job's table. Readers (pyarrow, pandas,
DuckDB `read_parquet('out/*.parquet')`) never see the temporaries: their names start with a dot
and end in .tmp. This module is the one place that writes part files: `write` is the pipeline's
last stage (Ray tasks, without torch).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import ray

from common.errors import InputError
from common.files import TEMP_TAG, atomic_write, lock_folder, publish, temp_path
from helpers.inference.writers import MODEL_RECORD

MANIFEST = "manifest.json"
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
JOB_TOKEN = ".corpus-job"  # holds the id of the job allowed to publish parts into the folder
FORMAT_VERSION = 1


def table_schema(class_count: int, top_k: int, all_classes: bool, embedding_dim: Optional[int],
                 logits: bool, model: Optional[dict[str, Any]] = None) -> pa.Schema:
    """The columns of a corpus table: file, duration (seconds), error (null, or the one-line
    reason), the top-k class indices, labels and probabilities (highest first), and with the
    options the 527 (class_count) probabilities in class order, the clip embedding, the logits.
    `model` (`tagging.model_record`) goes into the metadata as in every output of
    helpers/inference/writers.py (`ParquetWriter.read_record` reads it back)."""
    fields = [pa.field("file", pa.string(), nullable=False), pa.field("duration", pa.float64()),
              pa.field("error", pa.string()), pa.field("top_indices", pa.list_(pa.int16())),
              pa.field("top_labels", pa.list_(pa.string())), pa.field("top_probabilities", pa.list_(pa.float32()))]
    if all_classes:
        fields.append(pa.field("probabilities", pa.list_(pa.float32(), class_count)))
    if embedding_dim is not None:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_dim)))
    if logits:
        fields.append(pa.field("logits", pa.list_(pa.float32(), class_count)))
    meta = {"efficientat.top_k": str(top_k)}
    if model is not None:
        meta["efficientat"] = json.dumps({"kind": "corpus", MODEL_RECORD: model})
    return pa.schema(fields, metadata=meta)


def part_files(folder: str | os.PathLike) -> list[Path]:
    """The finished part files of the table in `folder`, sorted."""
    return sorted(Path(folder).glob(f"{PART_PREFIX}*{PART_SUFFIX}"))


def part_name(files: Sequence[str]) -> str:
    """The part file name for rows of `files`: the same set of files always gets the same name."""
    digest = hashlib.sha256("\n".join(sorted(files)).encode("utf-8", "surrogateescape")).hexdigest()
    return f"{PART_PREFIX}{digest[:24]}{PART_SUFFIX}"


def write_part(folder: str | os.PathLike, table: pa.Table, token: str) -> Optional[Path]:
    """Write `table` (sorted by file) as one whole part into `folder` and return its path; None
    (nothing published) when `folder`'s job token is no longer `token` (a newer job owns it).
    InputError when the folder is not there (on a cluster: not on a filesystem every node mounts)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: the output folder does not exist on this node "
                         "(the output must be on a filesystem every node of the cluster mounts)")
    table = table.sort_by("file")
    path = folder / part_name(table.column("file").to_pylist())
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        if job_token(folder) != token:
            return None
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def job_token(folder: str | os.PathLike) -> Optional[str]:
    """The id of the job that owns `folder` (None if none has)."""
    try:
        return (Path(folder) / JOB_TOKEN).read_text().strip()
    except FileNotFoundError:
        return None


def claim_folder(folder: str | os.PathLike, resume: bool) -> str:
    """Take `folder` for a new job: refuse (InputError) a folder that another job is writing into
    (its OS lock, `common.files.lock_folder`), or, without `resume`, a folder that already holds
    anything; remove the part temporaries earlier jobs left (no job but this one writes now) and
    write a new job token, which stops any straggler of an earlier job from publishing. Returns
    the token."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: --output is a file, not a folder")
    lock_folder(folder, "corpus job")
    held = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    if held and not resume:
        raise InputError(f"{folder}: the output folder is not empty (holds {len(held)} file(s), e.g. "
                         f"{sorted(held)[0]}); pass --resume to continue its table, or choose another folder")
    for tmp in folder.glob(f".{PART_PREFIX}*.{TEMP_TAG}-*.tmp"):
        tmp.unlink(missing_ok=True)
    token = uuid.uuid4().hex
    with atomic_write(folder / JOB_TOKEN) as f:
        f.write(token)
    return token


def read_manifest(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The manifest.json of `folder` (None when there is none); InputError if it is unreadable."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable corpus manifest ({e})") from None


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write manifest.json into `folder` atomically."""
    with atomic_write(Path(folder) / MANIFEST, encoding="utf-8") as f:
        json.dump({"format_version": FORMAT_VERSION, **manifest}, f, indent=1)
        f.write("\n")


def open_table(folder: str | os.PathLike) -> pds.Dataset:
    """The table in `folder` as one pyarrow dataset (read lazily, part by part)."""
    parts = part_files(folder)
    if not parts:
        raise InputError(f"{folder}: holds no corpus table (no {PART_PREFIX}*{PART_SUFFIX} files)")
    return pds.dataset([str(p) for p in parts], format="parquet")


def table_counts(folder: str | os.PathLike) -> dict[str, int]:
    """Rows and failed rows of the table in `folder`, counted part by part (memory does not grow
    with the table); zeros when there are no parts yet."""
    if not part_files(folder):
        return {"rows": 0, "failed": 0}
    table = open_table(folder)
    return {"rows": table.count_rows(), "failed": table.count_rows(filter=pds.field("error").is_valid())}


def iter_batches(folder: str | os.PathLike, columns: Sequence[str], valid_only: bool = False,
                 batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
    """Record batches of `columns` of the table in `folder` (with `valid_only`, rows without an
    error only), streamed part by part."""
    table = open_table(folder)
    missing = [c for c in columns if c not in table.schema.names]
    if missing:
        raise InputError(f"{folder}: the table has no {', '.join(missing)} column (written without the flag "
                         f"--{missing[0]}?)")
    condition = pds.field("error").is_null() if valid_only else None
    yield from table.to_batches(columns=list(columns), filter=condition, batch_size=batch_size)


def where() -> tuple[str, int]:
    """The Ray node id and the pid of the worker running this stage (for files per node)."""
    return ray.get_runtime_context().get_node_id(), os.getpid()


def node_check(folder: str, token: str, roots: list[str]) -> tuple[str, str, list[str]]:
    """On a node: its id and IP, and what it misses: the job's output `folder` (by its job token)
    and the inputs' `roots`."""
    problems = [f"{folder}: not the job's output folder (another filesystem?)"] if job_token(folder) != token else []
    problems += [f"{r}: not there" for r in roots if not os.path.exists(r)]
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), problems


def write(batch: pa.Table, folder: str, token: str, schema: pa.Schema) -> pa.Table:
    """Write `batch`'s rows as one part file; a one-row summary for the driver: rows, failures
    (their messages), files per model node and decode node, and the decode and model seconds."""
    errors = [e for e in batch.column("error").to_pylist() if e is not None]
    models = Counter(batch.column("_model_node").to_pylist())
    decoders = Counter(batch.column("_decode_node").to_pylist())
    pids = {"decode": sorted(set(batch.column("_decode_pid").to_pylist())),
            "model": sorted(set(batch.column("_model_pid").to_pylist()))}
    part = write_part(folder, batch.select(schema.names).cast(schema), token)
    return pa.table({
        "part": [part.name if part else None], "rows": [batch.num_rows], "failed": [len(errors)],
        "errors": pa.array([errors], pa.list_(pa.string())),
        "nodes": [json.dumps({"model": models, "decode": decoders, "pids": pids})],
        "decode_s": [float(pc.sum(batch.column("_decode_s")).as_py() or 0.0)],
        "model_s": [float(pc.sum(batch.column("_model_s")).as_py() or 0.0)]})
