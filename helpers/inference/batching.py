"""Files to model rows: decoding, batching files of equal length, chunking long recordings.

The inference scripts tag, embed or analyze many files; `iter_files` reads each once, runs
consecutive files of equal length as one batch (no padding changes a result), hands recordings
longer than CHUNK_SECONDS to a chunked function so memory does not grow with their length, and
yields each file's row, or a one-line error, as soon as it is known.
"""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from datasets.audio import AudioLoadError, native_length, stream_audio

if TYPE_CHECKING:  # imported where a batch is made: the corpus job's decode tasks read audio without torch
    import torch

# Recordings longer than this are tagged chunk by chunk (LoadedModel.forward_chunks), so memory does not
# grow with their length; shorter ones in one pass.
CHUNK_SECONDS = 60.0


def read_or_chunk(path: Path, sample_rate: int, chunk_seconds: float = CHUNK_SECONDS
                  ) -> tuple[Optional[np.ndarray], Iterator[np.ndarray]]:
    """(whole waveform, no chunks) for a recording of at most `chunk_seconds`; otherwise (None,
    chunks of `chunk_seconds`, the last up to a second longer), decoded while they are consumed.
    Raises AudioLoadError for unreadable files (also while iterating)."""
    chunk = chunk_seconds * sample_rate
    blocks = stream_audio(path, sample_rate)
    head: list[np.ndarray] = []
    size = 0
    for block in blocks:
        head.append(block)
        size += len(block)
        if size > chunk:
            return None, _chunks(np.concatenate(head), blocks, int(chunk), sample_rate)
    if size < 2:
        given = native_length(path) or (size, sample_rate)
        raise AudioLoadError(f"{path}: too short to analyze ({given[0]} sample(s) at {given[1]} Hz)")
    return np.concatenate(head), iter(())


def chunk_waveform(waveform: np.ndarray, sample_rate: int, chunk_seconds: float = CHUNK_SECONDS
                   ) -> tuple[Optional[np.ndarray], Iterator[np.ndarray]]:
    """`read_or_chunk` for a mono waveform already in memory: the same chunks a file of it gives."""
    if len(waveform) <= chunk_seconds * sample_rate:
        return waveform, iter(())
    return None, _chunks(waveform, iter(()), int(chunk_seconds * sample_rate), sample_rate)


def _chunks(start: np.ndarray, blocks: Iterator[np.ndarray], chunk: int, tail: int) -> Iterator[np.ndarray]:
    """Chunks of `chunk` samples of `start` followed by `blocks`; a remainder shorter than `tail`
    samples joins the last chunk."""
    buffer = start
    for block in itertools.chain(blocks, [None]):
        if block is not None:
            buffer = np.concatenate([buffer, block])
        while len(buffer) >= chunk + tail:
            yield buffer[:chunk]
            buffer = buffer[chunk:]
    yield buffer


Outcome = tuple[Path, Optional[np.ndarray], Optional[str]]  # (file, its row, or a one-line error)
# reads an item (a file, or for the Python API a waveform in memory) as `read_or_chunk` does
Reader = Callable[[Any, int, float], tuple[Optional[np.ndarray], Iterator[np.ndarray]]]


def iter_files(files: Sequence[Path], sample_rate: int, fn: Callable[[torch.Tensor], np.ndarray],
               batch_size: int = 16, desc: str = "tagging",
               chunked_fn: Optional[Callable[[Iterator[np.ndarray]], np.ndarray]] = None,
               chunk_seconds: float = CHUNK_SECONDS, read: Reader = read_or_chunk,
               progress: bool = True) -> Iterator[Outcome]:
    """Apply `fn` to batches (B, L) of consecutive files of equal length (so no padding changes a
    result), each file read whole; `fn` returns one row per waveform. Files longer than
    `chunk_seconds` go to `chunked_fn` instead, as an iterator of chunks (`read_or_chunk`), which
    returns their row. Yields (file, row, None) as soon as a file's row is computed, in input
    order, or (file, None, message) for a file that cannot be read or whose row is not finite
    (audio far outside [-1, 1] overflows the spectrogram). A progress bar on stderr appears for
    more than one file (unless `progress` is False). `read(item, sample_rate, chunk_seconds)`
    reads an item (default: a file path, `read_or_chunk`)."""
    pending: list[tuple[Path, np.ndarray]] = []

    def flush() -> Iterator[Outcome]:
        import torch
        if pending:
            rows = fn(torch.from_numpy(np.stack([w for _, w in pending])))
            done = [(path, row) for (path, _), row in zip(pending, rows)]
            pending.clear()
            yield from (_checked_row(path, row) for path, row in done)

    for path in tqdm(files, desc=desc, unit="file", disable=len(files) <= 1 or not progress,
                     file=sys.stderr):
        try:
            waveform, chunks = read(path, sample_rate, chunk_seconds if chunked_fn else math.inf)
            if waveform is None:
                yield from flush()
                yield _checked_row(path, chunked_fn(chunks))
                continue
        except AudioLoadError as e:
            yield from flush()
            yield path, None, str(e)
            continue
        if pending and (len(pending) == batch_size or len(pending[0][1]) != len(waveform)):
            yield from flush()
        pending.append((path, waveform))
    yield from flush()


def _checked_row(path: Path, row: np.ndarray) -> Outcome:
    if np.isfinite(row).all():
        return path, row, None
    return path, None, (f"{path}: the model's output is not finite (NaN or infinity): are the samples far "
                        "outside [-1, 1]?")


def run_on_files(files: Sequence[Path], sample_rate: int, fn: Callable[[torch.Tensor], np.ndarray],
                 batch_size: int = 16, desc: str = "tagging",
                 chunked_fn: Optional[Callable[[Iterator[np.ndarray]], np.ndarray]] = None,
                 chunk_seconds: float = CHUNK_SECONDS, read: Reader = read_or_chunk,
                 progress: bool = True) -> tuple[dict[Any, np.ndarray], dict[Any, str]]:
    """`iter_files` run to the end: the rows by file, and a one-line error message by file."""
    results: dict[Path, np.ndarray] = {}
    errors: dict[Path, str] = {}
    for path, row, error in iter_files(files, sample_rate, fn, batch_size, desc, chunked_fn, chunk_seconds,
                                          read, progress):
        if error is None:
            results[path] = row
        else:
            errors[path] = error
    return results, errors
