"""int8 ONNX models (helpers/onnx_export.quantize_onnx) and their agreement check."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

from helpers.inference.onnx_export import agreement, export_onnx, quantize_onnx, run_onnx
from models.mn.model import get_model as get_mn
from models.preprocess import AugmentMelSTFT
from tests.conftest import REPO


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, AugmentMelSTFT, Path]:
    torch.manual_seed(0)
    model, frontend = get_mn(width_mult=0.1, num_classes=12).eval(), AugmentMelSTFT().eval()
    path = tmp_path_factory.mktemp("onnx") / "mn01.onnx"
    export_onnx(model, path, frontend)
    return model, frontend, path


def clips(n: int, seconds: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(0.1 * rng.standard_normal(int(32000 * seconds))).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("calibrated", [True, False])
def test_quantized_model_runs_and_agrees(exported, tmp_path: Path, calibrated: bool) -> None:
    model, frontend, path = exported
    out = tmp_path / "int8.onnx"
    method = quantize_onnx(path, out, [c[None] for c in clips(2)] if calibrated else None)
    assert method == ("static" if calibrated else "dynamic")
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("QuantizeLinear" in ops) if calibrated else ("DynamicQuantizeLinear" in ops)
    logits, embedding = run_onnx(out, np.stack(clips(3, 0.7)))  # other batch size and length
    assert logits.shape == (3, 12) and embedding.shape == (3, model.embedding_dim)
    share, largest = agreement(out, model, frontend, True, clips(2))
    assert 0.0 <= share <= 1.0 and 0.0 <= largest < 0.5


def test_float_model_agrees_fully(exported) -> None:
    model, frontend, path = exported
    share, largest = agreement(path, model, frontend, True, clips(2))
    assert share == 1.0 and largest < 1e-5


def test_frontend_and_stem_stay_float(exported, tmp_path: Path) -> None:
    _, _, path = exported
    out = tmp_path / "int8.onnx"
    quantize_onnx(path, out, [c[None] for c in clips(1)])
    graph = onnx.load(str(out)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    kept = [n for n in graph.node if n.op_type in ("Conv", "MatMul")
            and n.name.startswith(("/frontend/", "/model/features.0/"))]
    assert len(kept) == 4 and not any(set(n.input[:2]) & dequantized for n in kept)  # data and weights
    assert any(set(n.input) & dequantized for n in graph.node if n.op_type == "Conv")


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_cli_quantizes_and_inference_tags_with_the_onnx_model(tmp_path: Path) -> None:
    demo = REPO / "resources" / "demo_bells.wav"
    noise = tmp_path / "calibration" / "noise.wav"  # a second, different calibration clip
    noise.parent.mkdir()
    sf.write(noise, (0.1 * np.random.default_rng(0).standard_normal(5 * 32000)).astype(np.float32), 32000)
    out = tmp_path / "mn04_int8.onnx"
    result = _script("export_onnx.py", "--model", "mn04_as", "--with_frontend", "--quantize", "int8",
                     "--calibration", str(demo), str(noise), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "static, calibrated on 2 clip(s)" in result.stdout and "top-5 agreement" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration", "mn04_int8.onnx"]
    tagged = _script("inference.py", "--onnx", str(out), "--audio_path", str(demo), "--top_k", "4")
    assert tagged.returncode == 0, tagged.stderr
    assert {line.split(":")[0] for line in tagged.stdout.splitlines()[1:3]} == {"Clang", "Ding"}


def test_cli_flag_combinations_are_refused(tmp_path: Path) -> None:
    bad = _script("export_onnx.py", "--model", "mn04_as", "--quantize", "int8", "--check", "x.wav")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "--calibration" in bad.stderr
    bad = _script("inference.py", "--onnx", "m.onnx", "--precision", "bf16", "--audio_path", "x.wav")
    assert bad.returncode == 2 and "--onnx" in bad.stderr
