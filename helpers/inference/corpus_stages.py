"""The three stages of the corpus job's Ray Data pipeline, each run where Ray places it.

1. `corpus_inputs.decode` (Ray tasks, CPU, without torch): files -> waveforms at the model's rate.
2. `ModelStage` (a pool of Ray actors, each holding one model, CPU or GPU): the waveforms of a
   batch go through `iter_files` as in inference.py / embeddings.py (files of equal length
   batched, long files chunked, non-finite outputs turned into errors) and become table rows.
3. `corpus_table.write` (Ray tasks, without torch): a part file per batch of rows, and a summary
   row for the driver's progress bar.

The model is resolved in one place, `resolve_tagger` (`resolve.resolve_model`), on the driver (to check the flags and learn the
table's shape) and in every actor.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import torch

from common.download import sha256sum
from common.errors import AudioLoadError
from helpers.inference.batching import CHUNK_SECONDS, iter_files, read_or_chunk
from helpers.inference.corpus_table import table_schema, where
from helpers.inference.resolve import RuntimeConfig, resolve_model
from helpers.inference.tagging import LoadedModel, model_record, top_k
from models.pretrained import DEFAULT_MODEL, checkpoint_path


@dataclass(frozen=True)
class ModelSpec:
    """Which model tags the corpus: a registry name, an ensemble of names, or a training
    script's checkpoint, in a CPU precision."""
    model_name: Optional[str] = None
    ensemble: Optional[tuple[str, ...]] = None
    checkpoint: Optional[str] = None
    precision: str = "fp32"


@dataclass(frozen=True)
class Columns:
    """Which columns the table gets besides file, duration, error and the top-k tags."""
    top_k: int = 10
    all_classes: bool = False
    embeddings: bool = False
    logits: bool = False


@dataclass(frozen=True)
class TableShape:
    """What the driver learns from the model: the class names, the embedding size, the rate."""
    class_names: tuple[str, ...]
    class_ids: Optional[tuple[str, ...]]
    embedding_dim: int
    sample_rate: int
    model: Optional[dict[str, Any]] = None  # tagging.model_record, kept in every part's metadata

    def schema(self, columns: Columns) -> pa.Schema:
        return table_schema(len(self.class_names), columns.top_k, columns.all_classes,
                            self.embedding_dim if columns.embeddings else None, columns.logits, self.model)


def resolve_tagger(spec: ModelSpec, device: str = "cpu") -> LoadedModel:
    """The corpus job's model (the one place it calls the model resolver)."""
    ref: Any = spec.checkpoint or (list(spec.ensemble) if spec.ensemble else spec.model_name or DEFAULT_MODEL)
    return resolve_model(ref, RuntimeConfig(device=device, precision=spec.precision))


def table_shape(tagger: LoadedModel) -> TableShape:
    """The table's shape for `tagger` (one forward pass on a second of silence)."""
    embedding = tagger.forward(torch.zeros(1, tagger.sample_rate))[1]
    return TableShape(tuple(tagger.class_names), tuple(tagger.class_ids) if tagger.class_ids else None,
                      int(embedding.shape[1]), tagger.sample_rate, model_record(tagger))


def model_identity(spec: ModelSpec, tagger: LoadedModel) -> dict[str, Any]:
    """The model's name, the sha256 of every weights file it was built from and its frontend."""
    if spec.checkpoint:
        files = [Path(spec.checkpoint)]
    else:
        files = [checkpoint_path(n, progress=False) for n in (spec.ensemble or [spec.model_name or DEFAULT_MODEL])]
    return {"name": tagger.name, "precision": spec.precision,
            "weights": [{"file": p.name, "sha256": sha256sum(p)} for p in files],
            "frontend": tagger.frontend.eval_settings(), "classes": len(tagger.class_names)}


class _Batch:
    """One batch's decoded files as the model stage reads them (`iter_files`'s reader)."""

    def __init__(self, table: pa.Table, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.files = table.column("file").to_pylist()
        self.paths = table.column("path").to_pylist()
        self.errors = table.column("error").to_pylist()
        self.long = table.column("long").to_pylist()
        self.durations = table.column("duration").to_pylist()
        column = table.column("waveform").combine_chunks()
        self.offsets = column.offsets.to_numpy()
        self.values = column.values.to_numpy(zero_copy_only=False)

    def lengths(self) -> list[int]:
        return list(np.diff(self.offsets))

    def read(self, i: int, sample_rate: int, chunk_seconds: float) -> tuple[Optional[np.ndarray], Iterator[np.ndarray]]:
        if self.errors[i] is not None:
            raise AudioLoadError(self.errors[i])
        if self.long[i]:
            whole, chunks = read_or_chunk(Path(self.paths[i]), sample_rate, chunk_seconds)
            return whole, self._counted(i, chunks)
        return self.values[self.offsets[i]:self.offsets[i + 1]], iter(())

    def _counted(self, i: int, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        total = 0
        for chunk in chunks:
            total += len(chunk)
            yield chunk
        self.durations[i] = total / self.sample_rate


class ModelStage:
    """A Ray actor holding the model: batches of decoded files -> table rows (module doc)."""

    def __init__(self, spec: ModelSpec, columns: Columns, shape: TableShape, batch_size: int, gpu: bool,
                 threads: int) -> None:
        torch.set_num_threads(threads)
        self.tagger = resolve_tagger(spec, "cuda" if gpu else "cpu")
        self.columns, self.shape, self.batch_size = columns, shape, batch_size
        self.schema = shape.schema(columns)
        self.node, self.pid = where()

    def _outputs(self, logits: torch.Tensor, embedding: torch.Tensor) -> np.ndarray:
        rows = [logits.cpu().numpy()] + ([embedding.cpu().numpy()] if self.columns.embeddings else [])
        return np.concatenate(rows, axis=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        data = _Batch(batch, self.tagger.sample_rate)
        order = sorted(range(batch.num_rows), key=lambda i: (data.lengths()[i], i))  # equal lengths side by side
        results: dict[int, np.ndarray] = {}
        errors: dict[int, str] = {}
        for i, row, error in iter_files(order, self.tagger.sample_rate,
                                        lambda w: self._outputs(*self.tagger.forward(w)), self.batch_size,
                                        chunked_fn=lambda chunks: self._outputs(*self.tagger.forward_chunks(chunks))[0],
                                        chunk_seconds=CHUNK_SECONDS, read=data.read, progress=False):
            if error is None:
                results[i] = row
            else:
                errors[i] = error.replace(data.paths[i], data.files[i], 1)
        table = self._table(data, results, errors)
        per_file = (time.perf_counter() - start) / max(1, batch.num_rows)
        extra = {"_decode_node": batch.column("_decode_node"), "_decode_pid": batch.column("_decode_pid"),
                 "_decode_s": batch.column("_decode_s"),
                 "_model_node": pa.array([self.node] * batch.num_rows, pa.string()),
                 "_model_pid": pa.array([self.pid] * batch.num_rows, pa.int64()),
                 "_model_s": pa.array([per_file] * batch.num_rows, pa.float64())}
        for name, values in extra.items():
            table = table.append_column(name, values)
        return table

    def _table(self, data: _Batch, results: dict[int, np.ndarray], errors: dict[int, str]) -> pa.Table:
        n, classes = len(data.files), len(self.shape.class_names)
        ok = np.array([i in results for i in range(n)])
        outputs = np.zeros((n, classes + (self.shape.embedding_dim if self.columns.embeddings else 0)), np.float32)
        for i, row in results.items():
            outputs[i] = row
        logits = outputs[:, :classes]
        probs = self.tagger.probabilities(torch.from_numpy(logits))
        ranked = [top_k(p, self.columns.top_k) if good else None for p, good in zip(probs, ok)]
        columns: dict[str, Any] = {
            "file": data.files, "duration": data.durations, "error": [errors.get(i) for i in range(n)],
            "top_indices": [r.tolist() if r is not None else None for r in ranked],
            "top_labels": [[self.shape.class_names[k] for k in r] if r is not None else None for r in ranked],
            "top_probabilities": [p[r].tolist() if r is not None else None for p, r in zip(probs, ranked)]}
        fixed = {"probabilities": (self.columns.all_classes, probs), "logits": (self.columns.logits, logits),
                 "embedding": (self.columns.embeddings, outputs[:, classes:])}
        arrays = [pa.array(columns[f.name], f.type) if f.name in columns else None for f in self.schema]
        for k, f in enumerate(self.schema):
            if f.name in fixed and fixed[f.name][0]:
                values = np.ascontiguousarray(fixed[f.name][1], np.float32)
                arrays[k] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1],
                                                               mask=pa.array(~ok))
        return pa.Table.from_arrays(arrays, schema=self.schema)
