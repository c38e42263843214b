"""ONNX export (helpers/inference/onnx_export.py, export_onnx.py) and onnxruntime parity."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from datasets.audio import load_audio
from helpers.inference.onnx_export import compare_with_torch, export_onnx, exportable_model, run_onnx
from models.dymn.dy_block import DynamicConv
from models.dymn.fast import BatchFreeDynamicConv
from models.dymn.model import get_model as get_dymn
from models.factory import create_frontend, create_model
from models.frontend_twins import DFTMelFrontend
from tests.conftest import REPO, shared_path


@pytest.fixture(scope="module")
def metro() -> np.ndarray:
    return load_audio(shared_path("audio", "metro_station-paris.wav"))


@pytest.mark.parametrize("settings", [{}, {"n_mels": 64, "hopsize": 480}, {"n_mels": 256, "hopsize": 160}])
def test_dft_frontend_matches_augment_mel_stft(metro: np.ndarray, settings: dict) -> None:
    frontend = create_frontend(**settings)
    x = torch.from_numpy(np.stack([metro[:160001], 0.01 * metro[-160001:]]))
    expected = frontend(x)
    got = DFTMelFrontend(frontend)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def _dimension_names(path: Path) -> list[list[str]]:
    graph = onnx.load(str(path)).graph
    return [[d.dim_param or str(d.dim_value) for d in i.type.tensor_type.shape.dim] for i in graph.input]


def test_cli_exports_mn04_with_frontend_and_checks(tmp_path: Path, mn04_checkpoint: Path, labels_file: Path) -> None:
    out = tmp_path / "models" / "mn04.onnx"
    result = subprocess.run([sys.executable, str(REPO / "export_onnx.py"), "--model", "mn04_as", "--with_frontend",
                             "--output", str(out), "--check", str(shared_path("audio", "metro_station-paris.wav"))],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "Train 0.727" in result.stdout
    assert _dimension_names(out) == [["batch", "samples"]]
    assert [p.name for p in out.parent.iterdir()] == ["mn04.onnx"]
    # a batch of three, of another length, through onnxruntime
    x = np.stack([np.zeros(50000, np.float32), np.ones(50000, np.float32) * 0.1,
                  np.random.default_rng(0).standard_normal(50000).astype(np.float32)])
    logits, embedding = run_onnx(out, x)
    assert logits.shape == (3, 527) and embedding.shape == (3, 384)
    bad = subprocess.run([sys.executable, str(REPO / "export_onnx.py"), "--model", "mn04", "--output", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "mn04_as" in bad.stderr


def test_mn04_without_frontend_matches_pytorch(metro: np.ndarray, tmp_path: Path, mn04_checkpoint: Path) -> None:
    model, frontend = create_model("mn04_as").eval(), create_frontend("mn04_as")
    out = tmp_path / "mn04_spec.onnx"
    export_onnx(model, out, None)
    assert _dimension_names(out) == [["batch", "1", "128", "frames"]]
    diffs, logits = compare_with_torch(out, model, np.stack([metro, 0.5 * metro[::-1]]), frontend, False)
    assert diffs["logits"] < 1e-4 and diffs["embedding"] < 1e-4
    assert 1 / (1 + np.exp(-logits[0, 329])) == pytest.approx(0.727, abs=1e-3)  # Train


@pytest.fixture(scope="module")
def random_dymn04() -> torch.nn.Module:
    """A randomly initialized dymn04 with non-trivial BatchNorm statistics and output scale."""
    torch.manual_seed(0)
    model = get_dymn(width_mult=0.4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    torch.nn.init.normal_(model.classifier[-1].weight, std=0.5)
    return model.eval()


def test_batch_free_dynamic_conv_matches_dymn(random_dymn04: torch.nn.Module) -> None:
    spec = create_frontend()(0.1 * torch.randn(3, 48000, generator=torch.Generator().manual_seed(1))).unsqueeze(1)
    exportable = exportable_model(random_dymn04)
    dynamic = sum(isinstance(m, DynamicConv) for m in random_dymn04.modules())
    assert dynamic == 44  # expansion (not in block 1), depthwise and projection convs
    assert sum(isinstance(m, BatchFreeDynamicConv) for m in exportable.modules()) == dynamic
    with torch.no_grad():
        (a_logits, a_emb), (b_logits, b_emb) = random_dymn04(spec), exportable(spec)
    assert a_logits.abs().max() > 0.1
    torch.testing.assert_close(b_logits, a_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b_emb, a_emb, atol=1e-5, rtol=1e-5)


def test_dymn_exports_with_dynamic_batch(random_dymn04: torch.nn.Module, metro: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "dymn04.onnx"
    frontend = create_frontend()
    export_onnx(random_dymn04, out, frontend)
    for batch, length in ((2, 64000), (3, 100001)):
        waveforms = np.stack([metro[i * 1000:i * 1000 + length] * (1 - 0.3 * i) for i in range(batch)])
        diffs, logits = compare_with_torch(out, random_dymn04, waveforms, frontend, True)
        assert logits.shape == (batch, 527)
        assert diffs["logits"] < 1e-4 and diffs["embedding"] < 1e-4
