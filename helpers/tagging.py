"""Audio tagging with a released model (or an ensemble): model + matching frontend + class names.

Scripts (inference.py, windowed inference, embedding extraction) build a `Tagger` once and feed it
batches of waveforms; the frontend settings come from the model's registry entry unless overridden.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from helpers.labels import label_table
from models.ensemble import ensemble_frontend_kwargs, get_ensemble_model
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

    def predict(self, waveforms: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class probabilities (B, N) as float32 NumPy array."""
        if isinstance(waveforms, np.ndarray):
            waveforms = torch.from_numpy(waveforms)
        if waveforms.dim() == 1:
            waveforms = waveforms.unsqueeze(0)
        logits, _ = self.forward(waveforms)
        return torch.sigmoid(logits).cpu().numpy()


def select_device(cuda: bool) -> torch.device:
    """CUDA if asked for and available, else CPU."""
    return torch.device("cuda" if cuda and torch.cuda.is_available() else "cpu")


def build_tagger(model_name: str = "mn10_as", ensemble: Optional[Sequence[str]] = None,
                 device: torch.device | str = "cpu", strides: Optional[Sequence[int]] = None,
                 head_type: Optional[str] = None, **frontend_overrides: Any) -> Tagger:
    """A Tagger for a released model (or an ensemble of them). Model arguments left at None come
    from the registry; frontend overrides that are not None replace the registry's settings."""
    device = torch.device(device)
    if ensemble:
        names = list(ensemble)
        settings = {**ensemble_frontend_kwargs(names),
                    **{k: v for k, v in frontend_overrides.items() if v is not None}}
        model: nn.Module = get_ensemble_model(names)
        name = "ensemble(" + ", ".join(names) + ")"
    else:
        extra = {k: v for k, v in (("strides", strides), ("head_type", head_type)) if v is not None}
        model = create_model(model_name, **extra)
        settings = frontend_kwargs(model_name, **frontend_overrides)
        name = model_name
    table = label_table()
    return Tagger(model.to(device).eval(), AugmentMelSTFT(**settings).to(device).eval(),
                  [n for _, n in table], name, device, [mid for mid, _ in table])


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Class indices of the k highest probabilities, highest first (ties: lower index first)."""
    return np.argsort(-probabilities, kind="stable")[:k]


def format_tags(probabilities: np.ndarray, class_names: Sequence[str], k: int = 10) -> str:
    """The original inference.py's printed block: header, `<label>: <p:.3f>` lines, footer."""
    lines = ["************* Acoustic Event Detected: *****************"]
    lines += [f"{class_names[i]}: {probabilities[i]:.3f}" for i in top_k(probabilities, k)]
    lines.append("*" * 56)
    return "\n".join(lines)
