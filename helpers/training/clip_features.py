"""Clip features for the linear probe, from a frozen model, cached on disk (`EmbeddingCache`).

A clip is embedded whole, without padding, after dropping exact digital silence at its edges (the
zero padding of fixed-length datasets is not sound, and averaging over it dilutes the features).
Clips longer than `window` are cut into `n_crops` evenly spaced windows: each window is a training
row, and predictions are averaged over a clip's windows at test time.

Per window the extractor keeps the time-frequency average of every stage's output (`stages`,
concatenated) and the head's `pre_logits` features (`model.forward_head(x, pre_logits=True)`),
so that `--probe_features` chooses among them without embedding again:

- `embedding`: the pooled last feature map (the model's embedding output);
- `hidden`: the released MLP head's hidden layer (its `pre_logits`);
- `concat`: both, concatenated;
- `layer:N`: the pooled output of stage N (0 = the stem, -1 = the last stage).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from common.errors import InputError
from datasets.cache import file_signature
from datasets.files import AudioFileDataset
from helpers.training.embedding_cache import EmbeddingCache
from models.preprocess import AugmentMelSTFT
from models.runtime import for_inference

FEATURE_VERSION = "stages+pre_logits-v2"  # part of the cache key: bump when the extraction changes
FEATURE_KINDS = ("embedding", "hidden", "concat", "layer:N")


@dataclass(frozen=True)
class ClipSource:
    """One clip to embed: `key` identifies its content (cache file name), `load()` returns its
    whole mono waveform at the frontend's rate."""
    key: str
    load: Callable[[], np.ndarray]


def file_clips(dataset: AudioFileDataset) -> list[ClipSource]:
    """The clips of a file dataset, whole (not cut to the dataset's clip length), keyed by file
    signature (path, size, mtime) and sample rate."""
    return [ClipSource(f"{file_signature(path)}|{dataset.sample_rate}", partial(dataset.waveform, i))
            for i, path in enumerate(dataset.files)]


def check_feature_kind(kind: str) -> str:
    """`kind` if it names features (see the module docstring), else InputError."""
    if kind in FEATURE_KINDS[:3]:
        return kind
    if kind.startswith("layer:"):
        try:
            int(kind[6:])
            return kind
        except ValueError:
            pass
    raise InputError(f"--probe_features {kind!r}: choose embedding, hidden, concat or layer:N (N a stage index)")


def select_features(stored: dict[str, np.ndarray], kind: str) -> np.ndarray:
    """(windows, D) features of `kind` from one clip's stored arrays."""
    bounds = np.concatenate([[0], np.cumsum(stored["sizes"])])
    if kind.startswith("layer:"):
        index = int(kind[6:])
        if not -len(stored["sizes"]) <= index < len(stored["sizes"]):
            raise InputError(f"--probe_features {kind}: the model has stages 0 to {len(stored['sizes']) - 1}")
        index %= len(stored["sizes"])
        return stored["stages"][:, bounds[index]:bounds[index + 1]]
    embedding = stored["stages"][:, bounds[-2]:]
    if kind == "embedding":
        return embedding
    if kind in ("hidden", "head"):  # "head": the pre_logits of a model holding a probe as its head
        return stored["pre_logits"]
    return np.concatenate([embedding, stored["pre_logits"]], axis=1)


def trim_silence(waveform: np.ndarray) -> np.ndarray:
    """`waveform` without the exact zeros at its start and end (at least 2 samples kept)."""
    loud = np.flatnonzero(waveform)
    if len(loud) == 0:
        return waveform[:2]
    end = max(loud[-1] + 1, loud[0] + 2)
    return waveform[loud[0]:end]


def crop_starts(num_samples: int, window: int, n_crops: int) -> list[int]:
    """Start samples of up to `n_crops` evenly spaced windows (first and last flush with the clip's
    ends; one window at 0 for clips no longer than `window`)."""
    if num_samples <= window or n_crops <= 1:
        return [0]
    return sorted({int(round(s)) for s in np.linspace(0, num_samples - window, n_crops)})


def extractor_key(model: nn.Module, frontend: AugmentMelSTFT, window: int, n_crops: int) -> str:
    """Hash of what a clip's features depend on besides the clip: the model's weights except the
    final classifier layer, the frontend's eval settings, the window and the crop count."""
    skip = {id(p) for p in model.get_classifier().parameters()}
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in skip:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    settings = (FEATURE_VERSION, sorted(frontend.eval_settings().items()), window, n_crops)
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:20]


class Embedder:
    """Stored features (see the module docstring) of a frozen model for `ClipSource`s, read from or
    written to `cache` (`EmbeddingCache`, keyed by `extractor_key`). `lengths` holds each clip's
    trimmed length in samples by key; `computed` / `reused` count the clips embedded / read back."""

    def __init__(self, model: nn.Module, frontend: AugmentMelSTFT, window: int, n_crops: int = 1,
                 cache_root=None, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.frontend = frontend.to(self.device).eval()
        self.window, self.n_crops = int(window), int(n_crops)
        self.cache = EmbeddingCache(cache_root, extractor_key(model, frontend, self.window, self.n_crops))
        self.model = for_inference(model)
        self.model.to(self.device)
        self.lengths: dict[str, int] = {}
        self.computed = self.reused = 0

    @torch.no_grad()
    def embed(self, waveform: np.ndarray) -> dict[str, np.ndarray]:
        """The stored arrays of one whole waveform: `stages`, `sizes`, `pre_logits`, `num_samples`."""
        waveform = trim_silence(waveform)
        n = min(len(waveform), self.window)
        wave = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        crops = torch.stack([wave[s:s + n] for s in crop_starts(len(waveform), self.window, self.n_crops)])
        fmaps = self.model.forward_features(self.frontend(crops.to(self.device)).unsqueeze(1), return_fmaps=True)
        pooled = [f.float().mean(dim=(2, 3)) for f in fmaps]
        return {"stages": torch.cat(pooled, 1).cpu().numpy(), "sizes": np.array([p.shape[1] for p in pooled]),
                "pre_logits": self.model.forward_head(fmaps[-1], pre_logits=True).float().cpu().numpy(),
                "num_samples": np.array(len(waveform))}

    def stored(self, clips: Sequence[ClipSource]) -> list[dict[str, np.ndarray]]:
        """The stored arrays of every clip, from the cache or computed (and cached)."""
        out = []
        for clip in clips:
            arrays = self.cache.load(clip.key)
            if arrays is None:
                arrays = self.embed(clip.load())
                self.cache.store(clip.key, arrays)
                self.computed += 1
            else:
                self.reused += 1
            self.lengths[clip.key] = int(arrays["num_samples"])
            out.append(arrays)
        return out

    def __call__(self, clips: Sequence[ClipSource], kind: str) -> list[np.ndarray]:
        """One (windows, D) float32 array of `kind` features per clip."""
        return [select_features(arrays, kind).astype(np.float32) for arrays in self.stored(clips)]
