"""Clip embeddings of audio files with a released model, and the .npz file that holds them.

The embedding of a clip is the model's pooled embedding (global average of the last conv output,
as returned with the logits), or, for another `layer`, the global average over frequency and time
of that feature map. Each file is embedded whole (recordings longer than
`helpers.inference.tagging.CHUNK_SECONDS` chunk by chunk, see `Tagger.forward_chunks`); files of equal
length are batched.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from common.files import atomic_write
from helpers.inference.tagging import Tagger, run_on_files


def embed_files(tagger: Tagger, files: Sequence[Path], layer: Optional[int] = None,
                batch_size: int = 16) -> tuple[list[Path], np.ndarray, dict[Path, str]]:
    """(files embedded, in input order; their float32 embeddings (n_files, D); one-line error by
    file for those that could not be read). `layer` as in `Tagger.embed`."""
    results, errors = run_on_files(files, tagger.sample_rate,
                                   lambda batch: tagger.embed(batch, layer).cpu().numpy(),
                                   batch_size, desc="embedding",
                                   chunked_fn=lambda chunks: tagger.embed_chunks(chunks, layer))
    done = [f for f in files if f in results]
    matrix = np.stack([results[f] for f in done]) if done else np.zeros((0, 0), dtype=np.float32)
    return done, matrix, errors


def save_embeddings(path: str | os.PathLike, filenames: Sequence[str | os.PathLike], embeddings: np.ndarray,
                    model_name: str, layer: Optional[int] = None, sample_rate: int = 32000) -> None:
    """Write an .npz (atomically) with `filenames` (str), `embeddings` (n, D) float32, `model`,
    `layer` (-1 for the pooled embedding, which is the last layer's average) and `sample_rate`."""
    if len(filenames) != len(embeddings):
        raise ValueError(f"{len(filenames)} file names for {len(embeddings)} embeddings")
    with atomic_write(path, "wb") as f:
        np.savez(f, filenames=np.array([str(n) for n in filenames]),
                 embeddings=np.asarray(embeddings, dtype=np.float32), model=np.array(model_name),
                 layer=np.array(-1 if layer is None else layer), sample_rate=np.array(sample_rate))


def load_embeddings(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of a file written by `save_embeddings`, as plain Python/NumPy values."""
    with np.load(path, allow_pickle=False) as data:
        return {"filenames": [str(n) for n in data["filenames"]], "embeddings": data["embeddings"],
                "model": str(data["model"]), "layer": int(data["layer"]),
                "sample_rate": int(data["sample_rate"])}
