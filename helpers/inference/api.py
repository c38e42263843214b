"""The Python API: one object that tags, scores, embeds and detects events, for files or arrays.

    from efficientat import Tagger
    tagger = Tagger("mn04_as")                        # a registry name, a checkpoint, an ensemble, an .onnx
    tagger.tag("resources/demo_bells.wav", top_k=3)   # [('Clang', 0.5885), ('Ding', 0.5375), ...]

Audio is a path (a file, or a folder searched for audio files), a list of paths, or arrays with
their `sample_rate`: 1-D (samples,), 2-D (channels, samples; channels are averaged), a 3-D batch
(batch, channels, samples) or a list of arrays of any lengths. Everything is read, mixed to mono
and resampled as the command-line tools do, and recordings longer than a minute are run chunk by
chunk (`helpers.inference.batching.CHUNK_SECONDS`). Bad input raises ValueError with the one-line
message the commands print after `error:`. One input (a file or one array) gives one result, any
other input a list with one result per recording.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from common.errors import AudioLoadError
from datasets.audio import check_finite, find_audio_files, resample
from helpers.inference import batching, tagging
from helpers.inference.resolve import RuntimeConfig, resolve_model
from helpers.inference.sed import Event, detect_events, tag_blocks, tag_windows
from models.pretrained import DEFAULT_MODEL

Audio = Union[str, os.PathLike, np.ndarray, torch.Tensor, Sequence[Any]]
# a 2-D array is one recording (channels, samples); more rows than this is taken for a batch by mistake
MAX_CHANNELS = 8


class Tagger:
    """A model ready to tag audio. `model`: a registry name (default `DEFAULT_MODEL`, "mn04_as",
    shipped with the repository; any other downloads once, when named), a checkpoint of a training script (`runs/x/best.pt`), a
    list of registry names (an ensemble, logits averaged) or an ONNX file from export_onnx.py.
    `device`: "cpu" or "cuda" (fp16 autocast, as the original); `precision`: "fp32", or "bf16"
    on CPUs with native bfloat16."""

    def __init__(self, model: str | os.PathLike | Sequence[str] = DEFAULT_MODEL, device: str | torch.device = "cpu",
                 precision: str = "fp32", batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        # the one resolver every command uses (helpers/inference/resolve.py)
        self.loaded = resolve_model(model, RuntimeConfig(str(device), precision))

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names

    @property
    def sample_rate(self) -> int:
        """The rate the model runs at; arrays at other rates are resampled to it."""
        return self.loaded.sample_rate

    def __repr__(self) -> str:
        return f"Tagger({self.name!r}, device={str(self.loaded.device)!r}, classes={len(self.class_names)})"

    def tag(self, audio: Audio, sample_rate: Optional[int] = None, top_k: int = 5) -> list:
        """The `top_k` (label, probability) pairs, highest first (probabilities rounded to 4
        digits; `probabilities` has them all): a list for one input, a list of such lists for several."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        probs, single = self._run(audio, sample_rate, self.loaded.predict, self.loaded.predict_chunks)
        tags = [[(self.class_names[i], round(float(p[i]), 4)) for i in tagging.top_k(p, top_k)] for p in probs]
        return tags[0] if single else tags

    def probabilities(self, audio: Audio, sample_rate: Optional[int] = None) -> np.ndarray:
        """Class probabilities (N, classes) float32, one row per recording (sigmoid; softmax for a
        single-label fine-tuned model)."""
        return self._run(audio, sample_rate, self.loaded.predict, self.loaded.predict_chunks)[0]

    def embed(self, audio: Audio, sample_rate: Optional[int] = None, layer: Optional[int] = None) -> np.ndarray:
        """Clip embeddings (N, D) float32: the model's pooled embedding, or with `layer` the
        average of that feature map (0 stem, 1-15 blocks, 16 or -1 last conv), as embeddings.py."""
        return self._run(audio, sample_rate, lambda batch: self.loaded.embed(batch, layer).cpu().numpy(),
                         lambda chunks: self.loaded.embed_chunks(chunks, layer))[0]

    def detect(self, audio: Audio, sample_rate: Optional[int] = None, window: float = 10.0, hop: float = 2.5,
               threshold: float = 0.3) -> list[Event] | list[list[Event]]:
        """Sound events (`Event`: filename, onset, offset, event_label, probability; seconds) from
        windows of `window` seconds every `hop` seconds, as windowed_inference.py finds them: a
        list for one input, a list of lists for several."""
        items, single = _recordings(audio, sample_rate, self.sample_rate)
        found = []
        for name, item in items:
            if isinstance(item, Path):
                windows = tag_windows(self.loaded, item, window, hop, self.batch_size, progress=False)
            else:
                windows = tag_blocks(self.loaded, [item], name, window, hop, self.batch_size)
            found.append(detect_events(windows, self.class_names, threshold))
        return found[0] if single else found

    # frames(...): frame-level output for long recordings comes from helpers/inference/windows.py
    # (the long-recordings work) and is added here beside `detect`.

    def _run(self, audio: Audio, sample_rate: Optional[int], fn: Any, chunked_fn: Any) -> tuple[np.ndarray, bool]:
        """Rows of `fn` (batches of equal-length recordings) or `chunked_fn` (a recording longer
        than CHUNK_SECONDS, in chunks), one per recording, stacked; and whether one was given."""
        items, single = _recordings(audio, sample_rate, self.sample_rate)
        results, errors = batching.run_on_files(range(len(items)), self.sample_rate, fn, self.batch_size,
                                               chunked_fn=chunked_fn, read=lambda i, rate, seconds: _read(
                                                   *items[i], rate, seconds), progress=False)
        if errors:
            raise ValueError(next(iter(errors.values())))
        return np.stack([results[i] for i in range(len(items))]).astype(np.float32), single


def _recordings(audio: Audio, sample_rate: Optional[int], model_rate: int
                ) -> tuple[list[tuple[str, Path | np.ndarray]], bool]:
    """(name, file or mono waveform at `model_rate`) per recording, and whether `audio` is one."""
    if isinstance(audio, (str, os.PathLike)):
        return [(str(f), f) for f in find_audio_files([audio])], not Path(audio).is_dir()
    if isinstance(audio, (np.ndarray, torch.Tensor)):
        array = _numpy(audio)
        if array.ndim in (1, 2):
            return [("audio", _mono(array, sample_rate, model_rate, "audio"))], True
        if array.ndim == 3:
            return [(f"audio[{i}]", _mono(a, sample_rate, model_rate, f"audio[{i}]"))
                    for i, a in enumerate(array)], False
        raise ValueError(f"audio: expected (samples,), (channels, samples) or (batch, channels, samples), "
                         f"got shape {tuple(array.shape)}")
    if isinstance(audio, (list, tuple)) and audio:
        items: list[tuple[str, Path | np.ndarray]] = []
        for i, a in enumerate(audio):
            if isinstance(a, (str, os.PathLike)):
                items += [(str(f), f) for f in find_audio_files([a])]
            elif isinstance(a, (np.ndarray, torch.Tensor)) and _numpy(a).ndim in (1, 2):
                items.append((f"audio[{i}]", _mono(_numpy(a), sample_rate, model_rate, f"audio[{i}]")))
            else:
                raise ValueError(f"audio[{i}]: expected a path or a 1-D or 2-D array, got {type(a).__name__}")
        return items, False
    raise ValueError(f"audio must be a path, an array or a non-empty list of them, got {audio!r:.60}")


def _numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


def _mono(array: np.ndarray, sample_rate: Optional[int], model_rate: int, name: str) -> np.ndarray:
    """A 1-D or (channels, samples) array as mono float32 at `model_rate` (soxr HQ, as files are)."""
    if sample_rate is None or sample_rate <= 0:
        raise ValueError(f"{name}: give the sample rate of arrays (sample_rate=...), got {sample_rate}")
    if array.ndim == 2 and (array.shape[0] > array.shape[1] or array.shape[0] > MAX_CHANNELS):
        raise ValueError(f"{name}: a 2-D array is one recording (channels, samples), got shape {array.shape}: "
                         "transpose (samples, channels), or pass a batch as a list or (batch, channels, samples)")
    if np.issubdtype(array.dtype, np.integer):  # PCM samples: full scale is 1.0
        array = array / float(np.iinfo(array.dtype).max + 1)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name}: expected audio samples, got an array of {array.dtype}")
    mono = np.ascontiguousarray(array.mean(axis=0) if array.ndim == 2 else array, dtype=np.float32)
    if mono.size == 0:
        raise AudioLoadError(f"{name}: contains no audio samples")
    check_finite(name, mono, sample_rate)
    return resample(mono, sample_rate, model_rate)


def _read(name: str, item: Path | np.ndarray, sample_rate: int, chunk_seconds: float
          ) -> tuple[Optional[np.ndarray], Iterator[np.ndarray]]:
    """A file or a waveform in memory, whole or in chunks, as `batching.run_on_files` reads them."""
    if isinstance(item, Path):
        return batching.read_or_chunk(item, sample_rate, chunk_seconds)
    if len(item) < 2:
        raise AudioLoadError(f"{name}: too short to analyze ({len(item)} sample)")
    return batching.chunk_waveform(item, sample_rate, chunk_seconds)
