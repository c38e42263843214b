"""A model ready to run: `LoadedModel`, the network in eval mode with its frontend and class
names, as `helpers.inference.resolve.resolve_model` makes it from whatever names a model.

Commands (inference.py, windowed inference, embeddings, the Python API) resolve a model once and
feed it batches of waveforms; recordings longer than `batching.CHUNK_SECONDS` go through
`forward_chunks` (one chunk at a time).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from helpers.inference.batching import CHUNK_SECONDS
from helpers.inference.onnx_export import OnnxModel
from models.ensemble import EnsembleModel
from models.fast import PRECISIONS
from models.preprocess import AugmentMelSTFT

# heads whose output depends on the last feature map only through its average over frequency and
# time, so that chunks combine exactly (mlp: pooling first; fully convolutional: linear, then pooling)
POOLING_HEADS = ("mlp", "fully_convolutional", "linear", "concat")


def model_record(model: "LoadedModel") -> dict[str, Any]:
    """What identifies `model` in the outputs it writes (`formats.open_output(model=...)`), and a
    --resume compares: its `name`, the `checksum` of its weights, its `classes` (count and the
    sha256 of their names) and the `frontend` settings it runs on."""
    names = "\n".join(model.class_names).encode()
    settings = model.frontend.eval_settings() if hasattr(model.frontend, "eval_settings") else {}
    return {"name": model.name, "checksum": model.checksum, "classes": len(model.class_names),
            "classes_sha256": hashlib.sha256(names).hexdigest(),
            "frontend": {k: (float(v) if isinstance(v, float) else v) for k, v in settings.items()}}


@dataclass
class LoadedModel:
    """An eval-mode model with its frontend and class names; call it on (B, L) waveforms at
    `sample_rate` (the frontend's rate). `name` is what was resolved (a registry name, an
    ensemble, a file)."""
    model: nn.Module
    frontend: AugmentMelSTFT
    class_names: list[str]
    name: str
    device: torch.device
    class_ids: Optional[list[str]] = None  # AudioSet MIDs where the classes are AudioSet's
    multilabel: bool = True  # sigmoid per class; False: softmax over classes (single-label models)
    model_takes_waveforms: bool = False  # an ONNX graph with the frontend inside
    checksum: Optional[str] = None  # what the weights are (the resolver's `ModelRef.checksum`)

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
        chunks, holding one chunk at a time (docs/inference.md, "Long recordings"). Each model's last
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


def add_precision_arg(parser: argparse.ArgumentParser) -> None:
    """The inference commands' --precision flag (CPU compute precision of the fast path)."""
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="CPU precision: bf16 needs a CPU with native bfloat16 (AVX512-BF16 or AMX)")


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Class indices of the k highest probabilities, highest first (ties: lower index first)."""
    return np.argsort(-probabilities, kind="stable")[:k]


def format_tags(probabilities: np.ndarray, class_names: Sequence[str], k: int = 10) -> str:
    """The original inference.py's printed block: header, `<label>: <p:.3f>` lines, footer."""
    lines = ["************* Acoustic Event Detected: *****************"]
    lines += [f"{class_names[i]}: {probabilities[i]:.3f}" for i in top_k(probabilities, k)]
    lines.append("*" * 56)
    return "\n".join(lines)
