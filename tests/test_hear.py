"""The HEAR 2021 API (hear_efficientat.py / helpers/inference/hear.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import hear_efficientat as hear
from datasets.audio import load_audio
from models.dymn.fast import FastDynamicConv
from models.dymn.model import get_model as get_dymn
from tests.conftest import REPO


@pytest.fixture(scope="module")
def model(mn04_checkpoint: Path) -> hear.HearModel:
    return hear.load_model(model_name="mn04_as")


@pytest.fixture(scope="module")
def audio() -> torch.Tensor:
    """Three 1.5-s sounds: two parts of the demo clip (bells) and noise."""
    bells = torch.from_numpy(load_audio(REPO / "resources" / "demo_bells.wav"))
    noise = 0.1 * torch.randn(48000, generator=torch.Generator().manual_seed(0))
    return torch.stack([bells[:48000], bells[100000:148000], noise])


def test_model_attributes(model: hear.HearModel) -> None:
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.sample_rate == 32000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 384
    assert model.timestamp_hop_ms == 50.0


def test_scene_embeddings(model: hear.HearModel, audio: torch.Tensor) -> None:
    scene = hear.get_scene_embeddings(audio, model)
    assert isinstance(scene, torch.Tensor) and scene.shape == (3, 384) and scene.dtype == torch.float32
    # the model's own pooled embedding of each sound
    expected = torch.cat([model.model(model.frontend(s[None]).unsqueeze(1))[1] for s in audio]).detach()
    torch.testing.assert_close(scene, expected, atol=1e-5, rtol=1e-5)
    # a sound's embedding does not depend on the rest of its batch
    torch.testing.assert_close(hear.get_scene_embeddings(audio[1:2], model), scene[1:2], atol=1e-5, rtol=1e-5)
    other_batch = torch.stack([audio[1], torch.zeros(48000), -audio[0]])
    torch.testing.assert_close(hear.get_scene_embeddings(other_batch, model)[0], scene[1], atol=1e-5, rtol=1e-5)


def test_timestamp_embeddings(model: hear.HearModel, audio: torch.Tensor) -> None:
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    n = 48000 // 1600 + 1  # 50-ms hop at 32 kHz, timestamps 0 .. 1500 ms
    assert embeddings.shape == (3, n, 384) and timestamps.shape == (3, n)
    torch.testing.assert_close(timestamps[2], torch.arange(n) * 50.0)
    assert timestamps[0, -1] == 1500.0
    # timestamp j is the centre of a 160-ms window: check one against a hand-cut window
    j, half = 10, 2560
    window = audio[1, j * 1600 - half:j * 1600 + half]
    expected = model.model(model.frontend(window[None]).unsqueeze(1))[1].detach()[0]
    torch.testing.assert_close(embeddings[1, j], expected, atol=1e-5, rtol=1e-5)
    # the first window is zero-padded on the left
    first = torch.cat([torch.zeros(half), audio[0, :half]])
    torch.testing.assert_close(embeddings[0, 0], model.model(model.frontend(first[None]).unsqueeze(1))[1].detach()[0],
                               atol=1e-5, rtol=1e-5)
    # independent of the batch
    single, single_ts = hear.get_timestamp_embeddings(audio[2:3], model)
    torch.testing.assert_close(single, embeddings[2:3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single_ts, timestamps[2:3])
    assert (embeddings[0] - embeddings[2]).abs().max() > 0.1


def test_configurable_hop_and_window(audio: torch.Tensor, mn04_checkpoint: Path) -> None:
    model = hear.load_model(model_name="mn04_as", timestamp_hop_ms=250.0, timestamp_window_ms=500.0)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio[:1], model)
    assert timestamps.tolist() == [[0.0, 250.0, 500.0, 750.0, 1000.0, 1250.0, 1500.0]]
    assert embeddings.shape == (1, 7, 384)
    with pytest.raises(ValueError, match="positive"):
        hear.load_model(model_name="mn04_as", timestamp_hop_ms=0)


def test_load_model_from_weights_file(model: hear.HearModel, audio: torch.Tensor, mn04_checkpoint: Path,
                                      tmp_path: Path) -> None:
    from_file = hear.load_model(str(mn04_checkpoint), model_name="mn04_as")
    torch.testing.assert_close(hear.get_scene_embeddings(audio, from_file), hear.get_scene_embeddings(audio, model))
    # a fine-tuned checkpoint with another class count, stored as {"model": state_dict}
    state = torch.load(mn04_checkpoint, weights_only=True)
    for key in ("classifier.5.weight", "classifier.5.bias"):
        state[key] = state[key][:10]
    torch.save({"model": state}, tmp_path / "ft.pt")
    finetuned = hear.load_model(tmp_path / "ft.pt", model_name="mn04_as")
    assert finetuned.model.num_classes == 10
    torch.testing.assert_close(hear.get_scene_embeddings(audio, finetuned), hear.get_scene_embeddings(audio, model))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        hear.load_model(tmp_path / "junk.pt", model_name="mn04_as")
    with pytest.raises(ValueError, match="does not fit"):
        hear.load_model(str(mn04_checkpoint), model_name="mn10_as")


def test_dymn_weights_file_runs_at_temperature_one(tmp_path: Path) -> None:
    torch.save(get_dymn(width_mult=0.4).state_dict(), tmp_path / "dymn.pt")  # temperature 30 at init
    model = hear.load_model(tmp_path / "dymn.pt", model_name="dymn04_as", timestamp_hop_ms=100.0)
    assert {m.temperature for m in model.modules() if isinstance(m, FastDynamicConv)} == {1.0}
    embeddings, timestamps = hear.get_timestamp_embeddings(0.1 * torch.randn(2, 16000), model)
    assert embeddings.shape == (2, 6, 384) and timestamps[0, -1] == 500.0


def test_rejects_badly_shaped_audio(model: hear.HearModel) -> None:
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(torch.zeros(32000), model)
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_timestamp_embeddings(np.zeros((1, 32000), dtype=np.float32), model)
