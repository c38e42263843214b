"""The HEAR 2021 embedding API for EfficientAT models (hear_efficientat.py exposes it by name).

Conventions (hearbenchmark.com, "Common API"): audio is a float32 tensor (n_sounds, n_samples) in
[-1, 1] at `model.sample_rate` (32 kHz); results are torch tensors on the model's device.

- Scene embedding of a sound: the model's pooled embedding of the whole sound (the global average
  of the last conv layer; 960 values for mn10_as), exactly what the tagger computes with its logits.
- Timestamp embeddings: the same pooled embedding of a short window (`timestamp_window_ms`, default
  160 ms) centred on each timestamp, the sound zero-padded by half a window on each side.
  Timestamps are 0, hop, 2 hop, ... up to the end of the sound (`timestamp_hop_ms`, default 50 ms),
  in milliseconds, so every timestamp is the centre of its window. Windowing the waveform rather
  than reading a time step off the last feature map (whose frames are 320 ms apart) gives the
  hop the HEAR event tasks need and keeps the timestamp embedding of the same kind as the scene
  embedding; a longer window adds context at the cost of temporal precision.

Each sound (and each window) is processed on its own in eval mode, so its embedding does not
depend on the other sounds in the batch.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from helpers.inference.resolve import ModelRef, resolve_model
from helpers.inference.tagging import LoadedModel
from models.config import ModelConfig
from models.preprocess import AugmentMelSTFT
from models.pretrained import DEFAULT_MODEL


class HearModel(nn.Module):
    """An eval-mode EfficientAT model with its frontend and the HEAR attributes."""

    def __init__(self, model: nn.Module, frontend: AugmentMelSTFT, name: str, timestamp_hop_ms: float,
                 timestamp_window_ms: float, sounds_per_batch: int = 16, windows_per_batch: int = 256) -> None:
        super().__init__()
        if timestamp_hop_ms <= 0 or timestamp_window_ms <= 0:
            raise ValueError("timestamp_hop_ms and timestamp_window_ms must be positive")
        self.model, self.frontend, self.name = model.eval(), frontend.eval(), name
        self.sample_rate = frontend.sr
        self.scene_embedding_size = self.timestamp_embedding_size = model.embedding_dim
        self.timestamp_hop_ms, self.timestamp_window_ms = timestamp_hop_ms, timestamp_window_ms
        self.sounds_per_batch, self.windows_per_batch = sounds_per_batch, windows_per_batch

    def tagger(self) -> LoadedModel:
        """A LoadedModel over this model on the device the module currently lives on."""
        return LoadedModel(self.model, self.frontend, [], self.name, next(self.model.parameters()).device)


def load_model(model_file_path: str | os.PathLike = "", model_name: str = DEFAULT_MODEL,
               timestamp_hop_ms: float = 50.0, timestamp_window_ms: float = 160.0) -> HearModel:
    """HEAR entry point: the released `model_name` (default: the shipped one; others download
    on first use); or, with `model_file_path`, a checkpoint of a training script (its own model and
    frontend settings), or `model_name`'s architecture with the weights of a state-dict file (or
    {"model": state dict}, any class count). Resolved by `helpers.inference.resolve`."""
    if model_file_path:  # a file, whatever its name
        loaded = resolve_model(ModelRef("checkpoint", path=Path(model_file_path)),
                               arch=ModelConfig(model_name, pretrained=True))
    else:
        loaded = resolve_model(model_name)
    return HearModel(loaded.model, loaded.frontend, model_name, timestamp_hop_ms, timestamp_window_ms).eval()


def _checked_audio(audio: torch.Tensor) -> torch.Tensor:
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
        raise ValueError("audio must be a torch tensor shaped (n_sounds, n_samples)")
    if audio.shape[1] < 2:
        raise ValueError(f"sounds must have at least 2 samples, got {audio.shape[1]}")
    return audio.float()


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """(n_sounds, scene_embedding_size) float32: each sound's pooled embedding."""
    audio = _checked_audio(audio)
    tagger = model.tagger()
    if not len(audio):
        return torch.zeros((0, model.scene_embedding_size), device=tagger.device)
    return torch.cat([tagger.embed(chunk) for chunk in audio.split(model.sounds_per_batch)])


def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (n_sounds, n_timestamps, timestamp_embedding_size), timestamps in ms
    (n_sounds, n_timestamps)): the pooled embedding of a window centred on each timestamp."""
    audio = _checked_audio(audio)
    tagger = model.tagger()
    hop = max(1, round(model.timestamp_hop_ms * model.sample_rate / 1000))
    window = max(2, round(model.timestamp_window_ms * model.sample_rate / 1000))
    n_timestamps = audio.shape[1] // hop + 1
    padded = nn.functional.pad(audio, (window // 2, window - window // 2))
    embeddings = []
    for sound in padded:
        windows = sound.unfold(0, window, hop)[:n_timestamps]  # (n_timestamps, window) view
        embeddings.append(torch.cat([tagger.embed(chunk)
                                     for chunk in windows.split(model.windows_per_batch)]))
    embeddings = torch.stack(embeddings) if embeddings else \
        torch.zeros((0, n_timestamps, model.timestamp_embedding_size), device=tagger.device)
    timestamps = torch.arange(n_timestamps, device=embeddings.device) * (hop * 1000 / model.sample_rate)
    return embeddings, timestamps.expand(len(audio), -1).contiguous()
