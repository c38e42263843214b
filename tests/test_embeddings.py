"""Clip embeddings: Tagger.embed, helpers/inference/embeddings.py and embeddings.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datasets.audio import load_audio
from helpers.inference.embeddings import embed_files, load_embeddings, save_embeddings
from helpers.inference.resolve import resolve_model
from tests.conftest import REPO, shared_path


@pytest.fixture(scope="module")
def tagger(mn04_checkpoint, labels_file):
    return resolve_model("mn04_as")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with three 2-s clips (two parts of the demo clip, one 44.1 kHz tone) and a
    1.5-s clip, so batches of equal length and a different length both occur."""
    folder = tmp_path_factory.mktemp("clips")
    bells = load_audio(REPO / "resources" / "demo_bells.wav")
    sf.write(folder / "a.wav", bells[:64000], 32000, subtype="FLOAT")
    sf.write(folder / "b.wav", bells[100000:164000], 32000, subtype="FLOAT")
    t = np.arange(88200) / 44100
    sf.write(folder / "c.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 44100)
    sf.write(folder / "d.flac", bells[-48000:], 32000)
    return folder


def test_pooled_embedding_is_the_last_layer_average(tagger) -> None:
    x = torch.from_numpy(load_audio(shared_path("audio", "metro_station-paris.wav")))[None]
    pooled = tagger.embed(x)
    assert pooled.shape == (1, 384) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled, tagger.embed(x, layer=-1), rtol=0, atol=0)
    torch.testing.assert_close(pooled, tagger.embed(x, layer=16), rtol=0, atol=0)
    golden = np.load(shared_path("golden", "mn04_as_metro_embedding.npy")).reshape(1, -1)
    np.testing.assert_allclose(pooled.numpy(), golden, atol=1e-5)
    assert tagger.embed(x, layer=0).shape == (1, 8)  # stem: make_divisible(16 * 0.4) = 8 channels
    with pytest.raises(ValueError, match="layer must be in"):
        tagger.embed(x, layer=17)


def test_embed_files_batches_and_reports_errors(tagger, clips: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF garbage")
    files = sorted(clips.iterdir()) + [bad]
    done, matrix, errors = embed_files(tagger, files, batch_size=2)
    assert done == files[:4] and list(errors) == [bad] and "bad.wav" in errors[bad]
    assert matrix.shape == (4, 384) and matrix.dtype == np.float32
    for row, path in zip(matrix, done):  # same as one file at a time
        single = tagger.embed(torch.from_numpy(load_audio(path))[None]).numpy()[0]
        np.testing.assert_allclose(row, single, atol=1e-5)
    assert np.abs(matrix[0] - matrix[2]).max() > 0.1  # different sounds, different embeddings
    layer = embed_files(tagger, files[:2], layer=5)[1]
    assert layer.shape == (2, list(tagger.model.stages())[5].out_channels)

    out = tmp_path / "emb.npz"
    save_embeddings(out, done, matrix, "mn04_as", None, 32000)
    data = load_embeddings(out)
    assert data["filenames"] == [str(p) for p in done] and data["model"] == "mn04_as"
    assert data["layer"] == -1 and data["sample_rate"] == 32000
    np.testing.assert_array_equal(data["embeddings"], matrix)


def test_cli_writes_npz(clips: Path, tmp_path: Path, mn04_checkpoint: Path, labels_file: Path) -> None:
    out = tmp_path / "sub" / "clips.npz"
    result = subprocess.run([sys.executable, str(REPO / "embeddings.py"), "--model", "mn04_as", "--audio_path",
                             str(clips), "--output", str(out), "--layer", "12", "--batch_size", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote 4 embedding(s) of dimension" in result.stdout
    with np.load(out) as data:
        assert sorted(data.files) == ["embeddings", "filenames", "layer", "model", "model_record", "sample_rate"]
        assert [Path(n).name for n in data["filenames"]] == ["a.wav", "b.wav", "c.wav", "d.flac"]
        assert int(data["layer"]) == 12 and str(data["model"]) == "mn04_as"
        assert data["embeddings"].shape[0] == 4 and np.isfinite(data["embeddings"]).all()
    assert [p.name for p in out.parent.iterdir()] == ["clips.npz"]

    bad = subprocess.run([sys.executable, str(REPO / "embeddings.py"), "--audio_path", str(clips),
                          "--output", str(tmp_path / "x.txt")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "x.txt" in bad.stderr
