"""Clip embeddings of audio files with a released model, and the .npz file that holds them.

The embedding of a clip is the model's pooled embedding (global average of the last conv output,
as returned with the logits), or, for another `layer`, the global average over frequency and time
of that feature map. Each file is embedded whole (recordings longer than
`helpers.inference.batching.CHUNK_SECONDS` chunk by chunk, see `LoadedModel.forward_chunks`); files of equal
length are batched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from helpers.inference.formats import embeddings_schema, open_output
from helpers.inference.batching import iter_files
from helpers.inference.tagging import LoadedModel


def embed_files(tagger: LoadedModel, files: Sequence[Path], layer: Optional[int] = None,
                batch_size: int = 16, on_error: Optional[Callable[[Path, str], None]] = None
                ) -> tuple[list[Path], np.ndarray, dict[Path, str]]:
    """(files embedded, in input order; their float32 embeddings (n_files, D); one-line error by
    file for those that could not be read). `layer` as in `LoadedModel.embed`; `on_error` is told of
    each failure as it happens. Raised out of it (an interruption), the embeddings done so far are
    in the exception's `partial` attribute as the same triple."""
    rows: dict[Path, np.ndarray] = {}
    errors: dict[Path, str] = {}
    try:
        for path, row, error in iter_files(files, tagger.sample_rate,
                                           lambda batch: tagger.embed(batch, layer).cpu().numpy(),
                                           batch_size, desc="embedding",
                                           chunked_fn=lambda chunks: tagger.embed_chunks(chunks, layer)):
            if error is None:
                rows[path] = row
            else:
                errors[path] = error
                if on_error is not None:
                    on_error(path, error)
    except BaseException as e:
        e.partial = _stacked(files, rows, errors)  # type: ignore[attr-defined]
        raise
    return _stacked(files, rows, errors)


def _stacked(files: Sequence[Path], rows: dict[Path, np.ndarray], errors: dict[Path, str]
             ) -> tuple[list[Path], np.ndarray, dict[Path, str]]:
    done = [f for f in files if f in rows]
    matrix = np.stack([rows[f] for f in done]) if done else np.zeros((0, 0), dtype=np.float32)
    return done, matrix, errors


def save_embeddings(path: str | os.PathLike, filenames: Sequence[str | os.PathLike], embeddings: np.ndarray,
                    model_name: str, layer: Optional[int] = None, sample_rate: int = 32000, *,
                    model: Optional[Mapping[str, Any]] = None, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Write `filenames` (str) with their `embeddings` (n, D) float32 and the `model`, `layer`
    (-1 for the pooled embedding, which is the last layer's average) and `sample_rate`, in the
    format `path`'s suffix names (.npz or .parquet; helpers/inference/formats.py), atomically;
    `model` and `inputs` as `formats.open_output` takes them (the model record; the files read)."""
    if len(filenames) != len(embeddings):
        raise ValueError(f"{len(filenames)} file names for {len(embeddings)} embeddings")
    embeddings = np.asarray(embeddings, dtype=np.float32)
    meta = {"model": model_name, "layer": -1 if layer is None else layer, "sample_rate": sample_rate}
    schema = embeddings_schema(embeddings.shape[1] if embeddings.ndim == 2 else 0, meta)
    with open_output(path, schema, model=model, inputs=inputs) as writer:
        writer.add([(str(name), row) for name, row in zip(filenames, embeddings)])


def load_embeddings(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of a file written by `save_embeddings` (.npz or .parquet), as plain
    Python/NumPy values: filenames, embeddings (n, D) float32, model, layer, sample_rate."""
    if Path(path).suffix.lower() == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"efficientat"])
        column = table.column("embedding").combine_chunks()
        width = column.type.list_size
        matrix = column.values.to_numpy().reshape(-1, width) if len(column) else np.zeros((0, width), np.float32)
        return {"filenames": [str(n) for n in table.column("filename").to_pylist()], "embeddings": matrix,
                "model": meta["model"], "layer": int(meta["layer"]), "sample_rate": int(meta["sample_rate"])}
    with np.load(path, allow_pickle=False) as data:
        return {"filenames": [str(n) for n in data["filenames"]], "embeddings": data["embeddings"],
                "model": str(data["model"]), "layer": int(data["layer"]),
                "sample_rate": int(data["sample_rate"])}
