"""Scripts check every output path before their work starts (one line, exit 2, nothing written),
and survive a reader that stops early (`| head`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf

import complexity
import embeddings
import ex_audioset
import export_onnx
import inference
import windowed_inference
from common.errors import run_cli
from tests.conftest import REPO


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """(a short clip, a plain file to put paths under)."""
    sf.write(tmp_path / "clip.wav", np.zeros(3200, dtype=np.float32), 32000)
    (tmp_path / "file").write_text("x")
    return tmp_path / "clip.wav", tmp_path / "file"


@pytest.mark.parametrize("main, argv, message", [
    (inference.main, ["--audio_path", "{clip}", "--output", "{dir}/out.json"], "out.json: --output is a folder"),
    (inference.main, ["--audio_path", "{clip}", "--output", "{file}/out.csv"], "--output lies under"),
    (windowed_inference.main, ["--audio_path", "{clip}", "--events", "{file}/ev.csv"], "--events lies under"),
    (windowed_inference.main, ["--audio_path", "{clip}", "--plot", "{file}/a.png"], "--plot lies under"),
    (windowed_inference.main, ["--audio_path", "{clip}", "--probabilities", "{dir}/p.npz"],
     "--probabilities is a folder"),
    (windowed_inference.main, ["--audio_path", "{clip}", "--window_length", "inf"], "must be finite numbers"),
    (windowed_inference.main, ["--audio_path", "{clip}", "--window_length", "nan"], "must be finite numbers"),
    (embeddings.main, ["--audio_path", "{clip}", "--output", "{file}/e.npz"], "--output lies under"),
    (export_onnx.main, ["--output", "{file}/m.onnx"], "--output lies under"),
    (export_onnx.main, ["--output", "{dir}/m.onnx", "--tolerance=-1"], "--tolerance must be a positive number"),
    (ex_audioset.main, ["--dataset_dir", "{dir}", "--save_predictions", "{file}/p.npz"],
     "--save_predictions lies under"),
    (complexity.main, ["--table", "{file}/t.csv"], "--table lies under"),
])
def test_outputs_are_checked_before_any_work(main: Callable, argv: list[str], message: str, setup, tmp_path,
                                             capsys) -> None:
    clip, file = setup
    (tmp_path / "out.json").mkdir()
    (tmp_path / "p.npz").mkdir()
    argv = [a.format(clip=clip, file=file, dir=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.wav", "file", "out.json", "p.npz"]


def test_a_reader_that_stops_early_is_no_error(tmp_path: Path) -> None:
    """`python complexity.py ... | head -1`: no BrokenPipeError traceback, and the files are written."""
    proc = subprocess.Popen([sys.executable, "complexity.py", "--complexity_type", "memory", "--table",
                             str(tmp_path / "costs.csv")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the script prints
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait() == 0 and err == ""
    assert (tmp_path / "costs.csv").stat().st_size > 0
