"""Audio tagging with a released model, an ensemble or a fine-tuned checkpoint: model + matching
frontend + class names.

Scripts (inference.py, windowed inference, embedding extraction) build a `Tagger` once and feed it
batches of waveforms; the frontend settings come from the model's registry entry unless overridden.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from datasets.audio import AudioLoadError, load_audio
from helpers.common.labels import label_table
from models.checkpoint import load_finetuned
from models.ensemble import EnsembleModel, ensemble_frontend_kwargs, get_ensemble_model
from models.factory import create_model, frontend_kwargs
from models.preprocess import AugmentMelSTFT


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
            spec = self.frontend(waveforms).unsqueeze(1)
            logits, embedding = self.model(spec)
        return logits.float(), embedding.float()

    @torch.no_grad()
    def embed(self, waveforms: torch.Tensor | np.ndarray, layer: Optional[int] = None) -> torch.Tensor:
        """Float32 clip embeddings (B, D): the model's pooled embedding, or with `layer` the global
        average over frequency and time of that feature map (index into the 17 maps returned with
        return_fmaps: 0 stem, 1-15 blocks, 16 = -1 last conv, whose average is the embedding)."""
        waveforms = _batch(waveforms).to(self.device)
        if layer is None:
            return self.forward(waveforms)[1]
        if isinstance(self.model, EnsembleModel):
            raise ValueError("feature maps of a chosen layer are not available for an ensemble")
        with self._autocast():
            _, fmaps = self.model(self.frontend(waveforms).unsqueeze(1), return_fmaps=True)
        if not -len(fmaps) <= layer < len(fmaps):
            raise ValueError(f"layer must be in {-len(fmaps)}..{len(fmaps) - 1}, got {layer}")
        return fmaps[layer].float().mean(dim=(2, 3))

    def predict(self, waveforms: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities (B, N) as float32 NumPy array (sigmoid, or softmax for a
        single-label model)."""
        logits, _ = self.forward(_batch(waveforms))
        probs = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)
        return probs.cpu().numpy()


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
                 **frontend_overrides: Any) -> Tagger:
    """A Tagger for a released model, an ensemble of them, or a checkpoint written by a training
    script (fine-tuned on your classes; its class names and settings come from the checkpoint).
    Model arguments left at None come from the registry; frontend overrides that are not None
    replace the registry's (or checkpoint's) settings."""
    device = torch.device(device)
    overrides = {k: v for k, v in frontend_overrides.items() if v is not None}
    class_ids: Optional[list[str]] = None
    multilabel = True
    if checkpoint:
        model, settings, names, multilabel = load_finetuned(checkpoint)
        settings = {**settings, **overrides}
        name = str(checkpoint)
    else:
        if ensemble:
            model = get_ensemble_model(list(ensemble))
            settings = {**ensemble_frontend_kwargs(list(ensemble)), **overrides}
            name = "ensemble(" + ", ".join(ensemble) + ")"
        else:
            extra = {k: v for k, v in (("strides", strides), ("head_type", head_type)) if v is not None}
            model = create_model(model_name, **extra)
            settings = frontend_kwargs(model_name, **overrides)
            name = model_name
        table = label_table()
        names, class_ids = [n for _, n in table], [mid for mid, _ in table]
    return Tagger(model.to(device).eval(), AugmentMelSTFT(**settings).to(device).eval(), names, name, device,
                  class_ids, multilabel)


def run_on_files(files: Sequence[Path], sample_rate: int, fn: Callable[[torch.Tensor], np.ndarray],
                 batch_size: int = 16, desc: str = "tagging") -> tuple[dict[Path, np.ndarray], dict[Path, str]]:
    """Load each file whole at `sample_rate` and apply `fn` to batches (B, L) of consecutive files of
    equal length (so no padding changes a result); `fn` returns one row per waveform. Returns the
    rows by file, and a one-line error message by file for those that could not be read. A progress
    bar on stderr appears for more than one file."""
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
            waveform = load_audio(path, sample_rate)
            if len(waveform) < 2:
                raise AudioLoadError(f"{path}: too short to analyze ({len(waveform)} sample)")
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
