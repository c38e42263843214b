"""A real full disk (a small tmpfs, mounted where the test may; skipped elsewhere): training and
prepare_hdf5 end with one line naming the file and "no space left", exit status 1, nothing
half-written; prepare_hdf5 continues its kept file once there is room. Injected full disks:
test_training_reliability.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile as sf

from common.errors import run_cli
from common.files import atomic_write
from datasets.hdf5 import Mp3HDF5
from tests.conftest import REPO
from tests.datagen import make_custom
from tests.test_training_reliability import FAST, SCRATCH


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1.5 MiB tmpfs at tmp_path/disk (needs the right to mount: root on Linux)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` up to `leave` free bytes; returns the filler file."""
    import shutil
    filler = disk / "filler"
    filler.write_bytes(b"\0" * max(0, shutil.disk_usage(disk).free - leave))
    return filler


def _script(args: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith(("error", "Traceback"))]


def test_every_atomic_write_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """The path of inference --output, complexity --table, export_onnx and checkpoints."""
    _fill(small_disk, 0)
    target = small_disk / "results.json"

    def main() -> None:
        with atomic_write(target) as f:
            f.write("x" * 100_000)

    with pytest.raises(SystemExit) as exit_:
        run_cli(main)
    assert exit_.value.code == 1 and capsys.readouterr().err == f"error: {target}: no space left on device\n"
    assert [p.name for p in small_disk.iterdir()] == ["filler"]


def test_training_on_a_full_disk_is_one_line_and_the_last_commit_survives(tmp_path: Path, small_disk: Path) -> None:
    data = make_custom(tmp_path / "c", clips_per_class=3, seconds=0.5)
    out = small_disk / "run"  # last.pt (0.9 MB) fits, best.pt does not
    proc = _script(["ex_custom.py", "--dataset_dir", data, *SCRATCH, *FAST, "--out_dir", out, "--n_epochs", 1])
    assert proc.returncode == 1, proc.stderr
    assert _error_lines(proc.stderr) == [f"error: {out / 'best.pt'}: no space left on device"]
    assert sorted(p.name for p in out.iterdir()) == [".efficientat.lock", "last.pt"]  # no temporary file


def test_prepare_hdf5_stops_short_of_a_full_disk_and_continues_when_there_is_room(
        tmp_path: Path, small_disk: Path) -> None:
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        sf.write(audio / f"clip{i}.wav", (0.3 * rng.standard_normal(32000)).astype(np.float32), 32000)
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,labels\n" + "".join(f"clip{i}.wav,noise\n" for i in range(10)))
    (tmp_path / "classes.txt").write_text("noise\ntone\n")
    output = small_disk / "out.hdf"
    filler = _fill(small_disk, 150 * 1024)  # the 64 KiB margin and a few clips (1 s: 21 kB)
    args = ["-m", "datasets.prepare_hdf5", "--audio_dir", audio, "--csv", csv, "--output", output,
            "--classes", tmp_path / "classes.txt"]
    proc = _script(args)
    assert proc.returncode == 1 and "HDF5" not in proc.stderr, proc.stderr
    assert _error_lines(proc.stderr) == [f"error: {output}: no space left on device"]
    kept = list(small_disk.glob(".out.hdf.efficientat-*.tmp"))
    assert not output.exists() and len(kept) == 1 and "kept the " in proc.stderr
    filler.unlink()
    proc = _script(args)
    assert proc.returncode == 0, proc.stderr
    assert "continuing the " in proc.stderr and "wrote 10 clips" in proc.stdout
    assert Mp3HDF5(output).names() == [f"clip{i}.mp3" for i in range(10)]
    assert sorted(p.name for p in small_disk.iterdir()) == ["out.hdf"]


def test_windowed_probabilities_on_a_full_disk_is_the_same_one_line(tmp_path: Path, small_disk: Path,
                                                                    mn04_checkpoint: Path, labels_file: Path) -> None:
    """windowed_inference.py streams its rows to disk: a full disk there is the shared line, exit 1,
    and no partial file is left."""
    import numpy as np
    import soundfile as sf

    clip = tmp_path / "long.wav"
    sf.write(clip, (0.1 * np.random.default_rng(0).standard_normal(60 * 32000)).astype(np.float32), 32000)
    _fill(small_disk, 4096)
    out = small_disk / "p.csv"
    result = _script(["windowed_inference.py", "--model_name", "mn04_as", "--audio_path", clip, "--window_length", "2",
                      "--hop_length", "1", "--top_k", "0", "--probabilities", out])
    assert result.returncode == 1, result.stderr
    assert _error_lines(result.stderr) == [f"error: {out}: no space left on device"]
    assert [p.name for p in small_disk.iterdir()] == ["filler"]
