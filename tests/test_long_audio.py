"""Long recordings are tagged and embedded chunk by chunk (bounded memory); a recording within one
chunk is tagged exactly as before, in one pass."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datasets.audio import load_audio
from helpers.inference.batching import read_or_chunk, run_on_files
from helpers.inference.tagging import LoadedModel
from models.dymn.model import get_model as get_dymn
from models.ensemble import EnsembleModel
from models.mn.model import get_model as get_mn
from models.preprocess import AugmentMelSTFT

SR = 32000


def _tagger(model: torch.nn.Module) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(model.eval(), AugmentMelSTFT().eval(), [f"c{i}" for i in range(model.num_classes)], "test",
                  torch.device("cpu"))


def _signal(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 440 * t) * (1 + np.sin(t)) + 0.05 * rng.standard_normal(len(t))
            ).astype(np.float32)


@pytest.mark.parametrize("build", [lambda: get_mn(width_mult=0.1), lambda: get_mn(width_mult=0.1, num_classes=7,
                                   head_type="fully_convolutional"), lambda: get_dymn(width_mult=0.4, T_max=1.0)])
def test_one_chunk_equals_one_pass(build) -> None:
    torch.manual_seed(0)
    tagger = _tagger(build())
    wave = _signal(2.0)
    logits, embedding = tagger.forward(torch.from_numpy(wave)[None])
    chunk_logits, chunk_embedding = tagger.forward_chunks([wave])
    torch.testing.assert_close(chunk_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk_embedding, embedding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(tagger.embed_chunks([wave], layer=5)),
                               tagger.embed(wave, layer=5)[0], rtol=1e-5, atol=1e-6)


def test_chunks_combine_to_nearly_the_whole_pass() -> None:
    """Chunks differ from one pass only where the model's view crosses a chunk boundary."""
    torch.manual_seed(0)
    tagger = _tagger(get_mn(width_mult=0.1))
    wave = _signal(12.0)
    whole = tagger.predict(wave)[0]
    chunked = tagger.predict_chunks([wave[:4 * SR], wave[4 * SR:8 * SR], wave[8 * SR:]])
    assert np.abs(chunked - whole).max() < 0.02
    torch.manual_seed(1)
    members = [get_mn(width_mult=0.1).eval(), get_mn(width_mult=0.1).eval()]
    ensemble = _tagger(EnsembleModel(members))
    np.testing.assert_allclose(ensemble.predict_chunks([wave[:4 * SR]]), ensemble.predict(wave[:4 * SR])[0],
                               atol=1e-6)


def test_files_within_a_chunk_are_read_whole_and_longer_ones_in_chunks(tmp_path: Path) -> None:
    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    sf.write(short, _signal(1.5, 1), SR)
    sf.write(long, _signal(4.6, 2), SR, subtype="FLOAT")
    waveform, chunks = read_or_chunk(short, SR, chunk_seconds=2.0)
    np.testing.assert_array_equal(waveform, load_audio(short))
    assert not list(chunks)
    waveform, chunks = read_or_chunk(long, SR, chunk_seconds=2.0)
    parts = list(chunks)
    assert waveform is None and [len(p) for p in parts] == [2 * SR, int(2.6 * SR)]  # the last 0.6 s joins
    np.testing.assert_array_equal(np.concatenate(parts), load_audio(long))

    torch.manual_seed(0)
    tagger = _tagger(get_mn(width_mult=0.1))
    calls = []

    def chunked(parts):
        calls.append(1)
        return tagger.predict_chunks(parts)

    results, errors = run_on_files([short, long, tmp_path / "missing.wav"], SR, tagger.predict, 4,
                                   chunked_fn=chunked, chunk_seconds=2.0)
    assert len(calls) == 1 and set(results) == {short, long} and list(errors) == [tmp_path / "missing.wav"]
    np.testing.assert_array_equal(results[short], tagger.predict(load_audio(short))[0])
    whole, _ = run_on_files([short], SR, tagger.predict, 4)
    np.testing.assert_array_equal(whole[short], results[short])
