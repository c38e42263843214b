"""Audio tagging with a released model, an ensemble or a fine-tuned checkpoint: model + matching
frontend + class names.

Scripts (inference.py, windowed inference, embedding extraction) build a `Tagger` once and feed it
batches of waveforms; the frontend settings come from the model's registry entry unless overridden.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from datasets.audio import AudioLoadError, stream_audio
from common.labels import label_table
from models.checkpoint import load_finetuned
from models.ensemble import EnsembleModel, ensemble_frontend_kwargs, get_ensemble_model
from helpers.inference.onnx_export import OnnxModel
from models.factory import FRONTEND_DEFAULTS, create_model, frontend_kwargs
from models.fast import PRECISIONS
from models.frontend_twins import FastMelFrontend
from models.runtime import fast_inference
from models.preprocess import AugmentMelSTFT

# Recordings longer than this are tagged chunk by chunk (Tagger.forward_chunks), so memory does not
# grow with their length; shorter ones in one pass.
CHUNK_SECONDS = 60.0
# heads whose output depends on the last feature map only through its average over frequency and
# time, so that chunks combine exactly (mlp: pooling first; fully convolutional: linear, then pooling)
POOLING_HEADS = ("mlp", "fully_convolutional")


@dataclass
class Tagger:
    """An eval-mode model with its frontend; call it on (B, L) waveforms at `sample_rate`."""
    model: nn.Module
    frontend: AugmentMelSTFT
    class_names: list[str]
    name: str
    device: torch.device
    class_ids: Optional[list[str]] = None  # AudioSet MIDs where the classes are AudioSet's
    multilabel: bool = True  # sigmoid per class; False: softmax over classes (single-label models)
    model_takes_waveforms: bool = False  # an ONNX graph with the frontend inside

    def spectrograms(self, waveforms: torch.Tensor) -> torch.Tensor:
        """The model's input for waveforms (B, L): (B, 1, n_mels, frames), or the waveforms."""
        return waveforms if self.model_takes_waveforms else self.frontend(waveforms).unsqueeze(1)

    @property
    def sample_rate(self) -> int:
        return self.frontend.sr

    def _autocast(self) -> contextlib.AbstractContextManager:
        # the released models were trained in fp16; on CUDA they run under autocast like the original
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, waveforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw float32 logits (B, N) and embeddings (B, D) for waveforms (B, L)."""
        waveforms = waveforms.to(self.device)
        with self._autocast():
            logits, embedding = self.model(self.spectrograms(waveforms))
        return logits.float(), embedding.float()

    @torch.no_grad()
    def embed(self, waveforms: torch.Tensor | np.ndarray, layer: Optional[int] = None) -> torch.Tensor:
        """Float32 clip embeddings (B, D): the model's pooled embedding, or with `layer` the global
        average over frequency and time of that feature map (index into the 17 maps returned with
        return_fmaps: 0 stem, 1-15 blocks, 16 = -1 last conv, whose average is the embedding)."""
        waveforms = _batch(waveforms).to(self.device)
        if layer is None:
            return self.forward(waveforms)[1]
        if isinstance(self.model, (EnsembleModel, OnnxModel)):
            raise ValueError("feature maps of a chosen layer are not available for an ensemble or an ONNX model")
        with self._autocast():
            _, fmaps = self.model(self.spectrograms(waveforms), return_fmaps=True)
        if not -len(fmaps) <= layer < len(fmaps):
            raise ValueError(f"layer must be in {-len(fmaps)}..{len(fmaps) - 1}, got {layer}")
        return fmaps[layer].float().mean(dim=(2, 3))

    def predict(self, waveforms: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities (B, N) as float32 NumPy array (sigmoid, or softmax for a
        single-label model)."""
        return self.probabilities(self.forward(_batch(waveforms))[0])

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """Sigmoid (softmax for a single-label model) of logits (B, N), as a float32 NumPy array."""
        probs = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)
        return probs.cpu().numpy()

    def predict_chunks(self, chunks: Iterable[np.ndarray]) -> np.ndarray:
        """Class probabilities (N,) of one recording given in chunks (`forward_chunks`)."""
        return self.probabilities(self.forward_chunks(chunks)[0])[0]

    def embed_chunks(self, chunks: Iterable[np.ndarray], layer: Optional[int] = None) -> np.ndarray:
        """Embedding (D,) of one recording given in chunks (`forward_chunks`)."""
        return self.forward_chunks(chunks, layer)[1][0].cpu().numpy()

    def _members(self) -> list[nn.Module]:
        members = list(self.model.models) if isinstance(self.model, EnsembleModel) else [self.model]
        for m in members:
            head_type = getattr(m, "head_type", "exported (ONNX)")  # an OnnxModel has no head to apply
            if head_type not in POOLING_HEADS:
                raise ValueError(f"a {head_type} head cannot combine chunks: recordings longer than "
                                 f"{CHUNK_SECONDS:g} s cannot be tagged with this model")
        return members

    @torch.no_grad()
    def forward_chunks(self, chunks: Iterable[np.ndarray], layer: Optional[int] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (1, N) and embedding (1, D) of one recording given as consecutive waveform
        chunks, holding one chunk at a time (see README, "long recordings"). Each model's last
        feature map is averaged over frequency and time across all chunks (every chunk weighted by
        its number of frames), which is the embedding, and the model's head is applied to that
        average, as it is to the average of one whole feature map. With `layer`, the embedding is
        feature map `layer` averaged the same way."""
        members = self._members()
        sums: list[Optional[torch.Tensor]] = [None] * (len(members) + 1)
        counts = [0] * (len(members) + 1)
        for chunk in chunks:
            with self._autocast():
                spec = self.frontend(_batch(chunk).to(self.device)).unsqueeze(1)
                for k, member in enumerate(members):
                    if layer is not None and k == 0:  # every stage's output is kept only when asked for
                        fmaps = member.forward_features(spec, return_fmaps=True)
                        maps = [fmaps[-1], fmaps[layer]]
                    else:
                        maps = [member.forward_features(spec)]
                    for slot, fmap in zip((k, len(members)), maps):
                        total = fmap.float().sum(dim=(2, 3))
                        sums[slot] = total if sums[slot] is None else sums[slot] + total
                        counts[slot] += fmap.shape[2] * fmap.shape[3]
        if sums[0] is None:
            raise ValueError("no audio to tag")
        means = [s / c if s is not None else None for s, c in zip(sums, counts)]
        with self._autocast():
            logits = torch.stack([m.forward_head(mean[:, :, None, None]).float()
                                  for m, mean in zip(members, means)]).mean(dim=0)
        if isinstance(self.model, EnsembleModel):
            return logits, logits
        return logits, means[-1] if layer is not None else means[0]


def _batch(waveforms: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, L) tensor from a tensor or array, 1-D input becoming a batch of one."""
    if isinstance(waveforms, np.ndarray):
        waveforms = torch.from_numpy(waveforms)
    return waveforms.unsqueeze(0) if waveforms.dim() == 1 else waveforms


def select_device(cuda: bool) -> torch.device:
    """CUDA if asked for and available, else CPU."""
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def build_tagger(model_name: str = "mn10_as", ensemble: Optional[Sequence[str]] = None,
                 device: torch.device | str = "cpu", strides: Optional[Sequence[int]] = None,
                 head_type: Optional[str] = None, checkpoint: Optional[str | os.PathLike] = None,
                 precision: str = "fp32", fast: bool = True, **frontend_overrides: Any) -> Tagger:
    """A Tagger for a released model, an ensemble of them, or a checkpoint written by a training
    script (fine-tuned on your classes; its class names and settings come from the checkpoint).
    Model arguments left at None come from the registry. Frontend settings that are not None
    replace the model's, except that the spectrogram's shape (`sr`, `win_length`, `hopsize`,
    `n_fft`, `n_mels`) must be the one the model was trained with (its registry entry or
    checkpoint): on another spectrogram a model gives confident nonsense, so a contradicting value
    is a ValueError. On the CPU the model and frontend are the eval-only fast copies in
    `precision` ("fp32", or "bf16" where the CPU has it; models/fast.py) unless fast=False (ONNX
    export: onnxruntime optimizes the plain graph itself)."""
    device = torch.device(device)
    class_ids: Optional[list[str]] = None
    multilabel = True
    if checkpoint:
        model, settings, names, multilabel = load_finetuned(checkpoint)
        _check_frontend(str(checkpoint), settings, frontend_overrides)
        name = str(checkpoint)
    else:
        if ensemble:
            name = "ensemble(" + ", ".join(ensemble) + ")"
            settings = ensemble_frontend_kwargs(list(ensemble))
            _check_frontend(name, settings, frontend_overrides)
            model = get_ensemble_model(list(ensemble))
        else:
            name, settings = model_name, frontend_kwargs(model_name)
            _check_frontend(name, settings, frontend_overrides)
            extra = {k: v for k, v in (("strides", strides), ("head_type", head_type)) if v is not None}
            model = create_model(model_name, **extra)
        table = label_table()
        names, class_ids = [n for _, n in table], [mid for mid, _ in table]
    settings = {**settings, **{k: v for k, v in frontend_overrides.items() if v is not None}}
    model, frontend = model.to(device).eval(), AugmentMelSTFT(**settings).to(device).eval()
    if fast:
        model, frontend = fast_inference(model, frontend, precision)
    return Tagger(model, frontend, names, name, device, class_ids, multilabel)


def build_onnx_tagger(path: str | os.PathLike, model_name: str = "mn10_as", **frontend_overrides: Any) -> Tagger:
    """A CPU Tagger running the exported model at `path` (export_onnx.py, float or int8) with
    onnxruntime. A graph without the frontend gets `model_name`'s frontend (with overrides);
    527 classes are AudioSet's."""
    model = OnnxModel(path)
    frontend = FastMelFrontend(AugmentMelSTFT(**frontend_kwargs(model_name, **frontend_overrides)))
    table = label_table() if model.num_classes == 527 else None
    names = [n for _, n in table] if table else [f"class {i}" for i in range(model.num_classes)]
    return Tagger(model, frontend, names, str(path), torch.device("cpu"),
                  [mid for mid, _ in table] if table else None, model_takes_waveforms=model.takes_waveforms)


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """The inference commands' --precision flag (CPU compute precision of the fast path)."""
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="CPU precision: bf16 needs a CPU with native bfloat16 (AVX512-BF16 or AMX)")


def _check_frontend(name: str, settings: dict[str, Any], given: dict[str, Any]) -> None:
    """ValueError naming the spectrogram settings in `given` (not None) that differ from the
    trained `settings`."""
    wrong = [f"{key}={settings.get(key)}, not {value}" for key, value in given.items()
             if key in FRONTEND_DEFAULTS and value is not None and settings.get(key) != value]
    if wrong:
        raise ValueError(f"{name} was trained with {'; '.join(wrong)}: leave the spectrogram settings to "
                         "the model (another spectrogram gives meaningless tags)")


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
        raise AudioLoadError(f"{path}: too short to analyze ({size} sample)")
    return np.concatenate(head), iter(())


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


def run_on_files(files: Sequence[Path], sample_rate: int, fn: Callable[[torch.Tensor], np.ndarray],
                 batch_size: int = 16, desc: str = "tagging",
                 chunked_fn: Optional[Callable[[Iterator[np.ndarray]], np.ndarray]] = None,
                 chunk_seconds: float = CHUNK_SECONDS) -> tuple[dict[Path, np.ndarray], dict[Path, str]]:
    """Apply `fn` to batches (B, L) of consecutive files of equal length (so no padding changes a
    result), each file read whole; `fn` returns one row per waveform. Files longer than
    `chunk_seconds` go to `chunked_fn` instead, as an iterator of chunks (`read_or_chunk`), which
    returns their row. Returns the rows by file, and a one-line error message by file for those
    that could not be read. A progress bar on stderr appears for more than one file."""
    results: dict[Path, np.ndarray] = {}
    errors: dict[Path, str] = {}
    pending: list[tuple[Path, np.ndarray]] = []

    def flush() -> None:
        if pending:
            rows = fn(torch.from_numpy(np.stack([w for _, w in pending])))
            results.update((path, row) for (path, _), row in zip(pending, rows))
            pending.clear()

    for path in tqdm(files, desc=desc, unit="file", disable=len(files) <= 1, file=sys.stderr):
        try:
            waveform, chunks = read_or_chunk(path, sample_rate, chunk_seconds if chunked_fn else math.inf)
            if waveform is None:
                flush()
                results[path] = chunked_fn(chunks)
                continue
        except AudioLoadError as e:
            errors[path] = str(e)
            continue
        if pending and (len(pending) == batch_size or len(pending[0][1]) != len(waveform)):
            flush()
        pending.append((path, waveform))
    flush()
    return results, errors


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Class indices of the k highest probabilities, highest first (ties: lower index first)."""
    return np.argsort(-probabilities, kind="stable")[:k]


def format_tags(probabilities: np.ndarray, class_names: Sequence[str], k: int = 10) -> str:
    """The original inference.py's printed block: header, `<label>: <p:.3f>` lines, footer."""
    lines = ["************* Acoustic Event Detected: *****************"]
    lines += [f"{class_names[i]}: {probabilities[i]:.3f}" for i in top_k(probabilities, k)]
    lines.append("*" * 56)
    return "\n".join(lines)
