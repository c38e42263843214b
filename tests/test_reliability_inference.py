"""Reliability of the inference side (issue 22): bad decoder results, pipes, truncated and
out-of-range audio, interruption with nothing lost, ONNX files and their spectrogram settings,
argument checks of export_onnx.py / torch.hub (complexity.py's: test_complexity.py), safe teacher indices,
verified cache."""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from common.errors import AudioLoadError, DownloadError, InputError, run_cli
from datasets.audio import find_audio_files, load_audio
from tests.conftest import REPO

SR = 32000
NOT_AUDIO = b"\0" * 24  # what macOS leaves as ._clip.flac on a non-Mac disk, near enough


def _cli(module: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """(exit status, stderr) of a script's main run in-process through run_cli."""
    main = __import__(module).main
    try:
        code = run_cli(lambda: main(argv))
    except SystemExit as e:
        code = e.code
    return int(code or 0), capsys.readouterr().err


def _noise(path: Path, seconds: float = 1.0, scale: float = 0.1, rate: int = SR, subtype: str = "PCM_16") -> Path:
    rng = np.random.default_rng(len(path.name))
    sf.write(path, (rng.standard_normal(int(seconds * rate)) * scale).astype(np.float32), rate, subtype=subtype)
    return path


# --- the loader ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["._clip.flac", "zeros.flac", "zeros.wav", "zeros.mp3", "zeros.m4a", "zeros.ogg"])
def test_decoder_results_that_are_not_audio_are_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(NOT_AUDIO)
    with pytest.raises(AudioLoadError, match="not a readable audio file") as e:
        load_audio(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_folder_scan_skips_appledouble_files_and_repeats_with_a_count(tmp_path, caplog):
    good = _noise(tmp_path / "clip.flac")
    for name in ("._clip.flac", "._other.wav"):
        (tmp_path / name).write_bytes(NOT_AUDIO)
    with caplog.at_level(logging.WARNING):
        files = find_audio_files([tmp_path, good, f"{tmp_path}/./clip.flac"])
    assert files == [good]
    assert "skipped 2 macOS metadata file(s)" in caplog.text and "2 repeated path(s)" in caplog.text


def test_a_fifo_holding_flac_is_read_once(tmp_path):
    """libsndfile reads a pipe before failing on it; a second open (by FFmpeg) would block forever."""
    source = _noise(tmp_path / "clip.flac", 2.0)
    fifo = tmp_path / "pipe.flac"
    os.mkfifo(fifo)
    code = ("import sys; from datasets.audio import load_audio; "
            f"print(len(load_audio({str(fifo)!r}, 16000)))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    fifo.write_bytes(source.read_bytes())
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and int(out) == len(load_audio(source, 16000)) == 32000


def test_truncated_wav_and_out_of_range_float_audio_are_warned_about(tmp_path, caplog):
    full = _noise(tmp_path / "full.wav", 10.0)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(full.read_bytes()[:44 + 2 * 24000])  # header says 10 s, 0.75 s present
    loud = _noise(tmp_path / "loud.wav", scale=1000.0, subtype="FLOAT")  # int16 values in a float file
    with caplog.at_level(logging.WARNING):
        assert len(load_audio(full)) == 320000 and len(load_audio(_noise(tmp_path / "ok.wav"))) == SR
        assert not caplog.text
        assert len(load_audio(truncated)) == 24000
        load_audio(loud)
    assert "truncated.wav: truncated: the header announces 10.00 s of audio, the file holds 0.75 s" in caplog.text
    assert "loud.wav: samples reach" in caplog.text and "far outside [-1, 1]" in caplog.text


def test_too_short_counts_the_samples_the_user_gave(tmp_path):
    from helpers.inference.batching import read_or_chunk
    path = tmp_path / "two.wav"
    sf.write(path, np.array([0.1, -0.1], dtype=np.float32), 44100)
    with pytest.raises(AudioLoadError, match=r"too short to analyze \(2 sample\(s\) at 44100 Hz\)"):
        read_or_chunk(path, SR)


def test_rows_that_are_not_finite_become_errors(tmp_path):
    from helpers.inference.batching import run_on_files
    files = [_noise(tmp_path / f"{k}.wav") for k in range(3)]

    def fn(batch: torch.Tensor) -> np.ndarray:  # a model that overflows on the loud second clip
        return np.array([[np.nan] if abs(w).max() > 0.45 * 1e3 else [1.0] for w in batch.numpy()])
    _noise(files[1], scale=1e3, subtype="FLOAT")
    results, errors = run_on_files(files, SR, fn, batch_size=1)
    assert list(results) == [files[0], files[2]]
    assert list(errors) == [files[1]] and "the model's output is not finite" in errors[files[1]]


def test_training_skips_clips_that_are_not_audio(tmp_path):
    from datasets.files import AudioFileDataset
    files = [_noise(tmp_path / "a.wav"), tmp_path / "._a.flac", _noise(tmp_path / "b.wav")]
    files[1].write_bytes(NOT_AUDIO)
    data = AudioFileDataset(files, np.eye(3, dtype=np.float32), ["a", "bad", "b"], clip_samples=SR)
    assert [data[k].index for k in range(3)] == [0, 2, 2]  # the bad clip replaced by the next one
    assert data.take_bad_count() == 1


# --- inference.py / embeddings.py: interruption, outputs, flags ---------------------------------

@pytest.fixture
def clips(tmp_path) -> list[Path]:
    folder = tmp_path / "clips"
    folder.mkdir()
    return [_noise(folder / f"c{k:02d}.wav", 1.0 + k % 2) for k in range(24)]


def _start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_tagging_keeps_every_finished_result_and_resumes(tmp_path, clips, mn04_checkpoint,
                                                                     labels_file, signum):
    out = tmp_path / "tags.csv"
    args = ["--model_name", "mn04_as", "--audio_path", str(clips[0].parent), "--output", str(out),
            "--batch_size", "1", "--top_k", "2"]
    proc = _start("inference.py", *args)
    footers = 0
    while footers < 3:  # three files printed: stop it
        footers += proc.stdout.readline() == "*" * 56 + "\n"
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum and "Traceback" not in stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr.splitlines()[-1]
    done = {line.split(",")[0] for line in out.read_text().splitlines()[1:]}
    assert len(done) >= 3 and len(done) < len(clips)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    resumed = subprocess.run([sys.executable, "inference.py", *args, "--resume"], cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(done)} file(s) already in" in resumed.stderr
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 2 * len(clips) and {r.split(",")[0] for r in rows} == {str(c) for c in clips}


def test_interrupted_embedding_saves_what_was_done(tmp_path, mn04_checkpoint):
    folder = tmp_path / "many"  # enough clips that the run is still going when the signal comes, however fast
    folder.mkdir()
    for k in range(150):
        _noise(folder / f"c{k:03d}.wav", 4.0)
    out = tmp_path / "emb.npz"
    proc = _start("embeddings.py", "--model_name", "mn04_as", "--audio_path", str(folder),
                  "--output", str(out), "--batch_size", "1")
    seen = ""
    while not re.search(r"\| *([3-9]|[1-9]\d)/150", seen):  # three files read, so two embedded
        chunk = os.read(proc.stderr.fileno(), 256).decode()
        assert chunk, seen  # it ended before
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    stderr = seen + stderr
    assert proc.returncode == 143 and "Traceback" not in stderr
    done = int(re.search(r"interrupted by SIGTERM: (\d+) of 150 file\(s\) embedded, saved to", stderr).group(1))
    with np.load(out) as data:
        assert 2 <= data["embeddings"].shape[0] == len(data["filenames"]) == done < 150


def test_repeated_files_symlinked_output_and_nan_audio(tmp_path, mn04_checkpoint, labels_file):
    clip = _noise(tmp_path / "clip.wav")
    huge = _noise(tmp_path / "huge.wav", scale=1e19, subtype="FLOAT")
    target = tmp_path / "real.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    result = subprocess.run([sys.executable, "inference.py", "--model_name", "mn04_as", "--audio_path", str(clip),
                             str(clip), f"{tmp_path}/./clip.wav", str(huge), "--output", str(link)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # the huge file failed, the clip was tagged
    assert "2 repeated path(s) left out" in result.stderr and "wrote 1 result(s)" in result.stderr
    assert "huge.wav: the model's output is not finite" in result.stderr and "nan" not in result.stdout.lower()
    assert link.is_symlink() and os.readlink(link) == str(target)
    data = json.loads(target.read_text())
    assert [r["file"] for r in data["results"]] == [str(clip)] and data["errors"][0]["file"] == str(huge)


@pytest.mark.parametrize("extra, problem", [
    (["--all_classes"], "--all_classes is about the --output file"),
    (["--resume"], "--resume is about the --output file"),
    (["--ensemble", "mn04_as", "mn04_as", "--checkpoint", "x.pt"], "--checkpoint holds its own model"),
    (["--model_name", "mn04_as", "--ensemble", "mn04_as", "mn04_as"], "--ensemble names its models"),
])
def test_flags_that_would_be_ignored_are_refused(tmp_path, capsys, extra, problem):
    code, err = _cli("inference", ["--audio_path", str(tmp_path), *extra], capsys)
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("script", ["inference", "embeddings"])
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys, mn04_checkpoint, script):
    clip = _noise(tmp_path / "clip.wav")
    extra = ["--output", str(tmp_path / "e.npz")] if script == "embeddings" else []
    code, err = _cli(script, ["--model_name", "mn04_as", "--audio_path", str(clip), "--cuda", *extra], capsys)
    assert code == 2 and "PyTorch sees no CUDA GPU (--cuda: leave it out" in err and len(err.strip().splitlines()) == 1


# --- ONNX ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory, mn04_checkpoint) -> Path:
    from helpers.inference.onnx_export import export_onnx
    from helpers.inference.resolve import RuntimeConfig, resolve_model
    path = tmp_path_factory.mktemp("onnx") / "mn04.onnx"
    tagger = resolve_model("mn04_as", RuntimeConfig(fast=False))
    export_onnx(tagger.model, path, None, n_mels=128, settings=tagger.frontend.eval_settings())
    return path


@pytest.mark.parametrize("flags, problem", [
    (["--hop_size", "160"], "hopsize=320, not 160"),
    (["--window_size", "400"], "win_length=800, not 400"),
    (["--sample_rate", "16000"], "sr=32000, not 16000"),
    (["--model_name", "mn10_as_hop_5"], "hopsize=320, not 160"),
    (["--model_name", "mn10_as_mels_64"], "n_mels=128, not 64"),
])
def test_onnx_refuses_spectrogram_settings_contradicting_the_export(exported, tmp_path, capsys, labels_file,
                                                                    flags, problem):
    code, err = _cli("inference", ["--onnx", str(exported), "--audio_path", str(_noise(tmp_path / "c.wav")),
                                   *flags], capsys)
    assert code == 2 and problem in err and len(err.strip().splitlines()) == 1


def test_onnx_without_stored_settings_warns_and_checks_the_graph(exported, tmp_path, capsys, caplog, labels_file):
    import onnx
    model = onnx.load(str(exported))
    del model.metadata_props[:]
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    clip = str(_noise(tmp_path / "c.wav"))
    code, err = _cli("inference", ["--onnx", str(old), "--audio_path", clip, "--model_name", "mn10_as_mels_64"],
                     capsys)
    assert code == 2 and "takes spectrograms of 128 mel bands, not 64" in err
    caplog.clear()
    code, _ = _cli("inference", ["--onnx", str(old), "--audio_path", clip], capsys)
    assert code == 0 and "holds no spectrogram settings" in caplog.text


@pytest.mark.parametrize("make, problem", [
    (lambda d: d / "missing.onnx", "no such file"),
    (lambda d: d, "is a folder, not an ONNX model"),
    (lambda d: REPO / "resources" / "mn04_as_mAP_432.pt", "not an ONNX model"),
    (lambda d: (d / "notes.onnx", (d / "notes.onnx").write_text("hello\n"))[0], "not an ONNX model"),
])
def test_onnx_files_that_are_not_models_are_one_line(tmp_path, capsys, make, problem):
    path = make(tmp_path)
    code, err = _cli("inference", ["--onnx", str(path), "--audio_path", str(_noise(tmp_path / "c.wav"))], capsys)
    assert code == 2 and problem in err and str(path) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("opset", ["99", "5"])
def test_export_opset_out_of_range_is_one_line(tmp_path, capsys, opset):
    code, err = _cli("export_onnx", ["--model", "mn04_as", "--opset", opset, "--output", str(tmp_path / "m.onnx")],
                     capsys)
    assert code == 2 and f"--opset {opset} is not supported" in err and len(err.strip().splitlines()) == 1


# --- torch.hub, teacher index, checkpoint cache ------------------------------------------------------

@pytest.mark.parametrize("num_classes", [-5, 2.5, 0, True, "10"])
def test_hub_num_classes_must_be_a_positive_whole_number(num_classes):
    with pytest.raises(ValueError, match="num_classes must be a whole number of at least 1"):
        torch.hub.load(str(REPO), "mn04_as", source="local", pretrained=False, num_classes=num_classes)


def test_hub_unknown_name_gets_close_matches():
    with pytest.raises(ValueError, match="unknown model name 'mn04_sa'; did you mean mn04_as"):
        torch.hub.load(str(REPO), "mn04_sa", source="local", pretrained=False)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_teacher_index_runs_no_code_and_reads_json_and_csv(tmp_path):
    from datasets.name_index import read_name_index
    evil = tmp_path / "index.pkl"
    evil.write_bytes(pickle.dumps({"a": _Exploit()}))
    with pytest.raises(InputError, match="refused to load posix.system|refused to load os.system"):
        read_name_index(evil)
    assert not (tmp_path / "PWNED").exists() and not (REPO / "PWNED").exists()
    plain = tmp_path / "released.pkl"
    plain.write_bytes(pickle.dumps({"--4gqARaEJE": 0, "abc": 7}))
    (tmp_path / "index.json").write_text(json.dumps({"--4gqARaEJE": 0, "abc": 7}))
    (tmp_path / "index.csv").write_text("name,row\n--4gqARaEJE,0\nabc,7\n")
    for name in ("released.pkl", "index.json", "index.csv"):
        assert read_name_index(tmp_path / name) == {"--4gqARaEJE": 0, "abc": 7}
    (tmp_path / "text.pkl").write_text("not a pickle\n")
    with pytest.raises(InputError, match="text.pkl: not a name -> row mapping"):
        read_name_index(tmp_path / "text.pkl")


def test_a_changed_cached_checkpoint_of_a_known_name_is_refused(tmp_path, monkeypatch, mn04_checkpoint):
    import common.download as download
    from models.pretrained import checkpoint_path
    monkeypatch.setattr(download, "SHIPPED_DIR", tmp_path / "nothing_shipped")  # the cache copy, not resources/
    cache = tmp_path / "cache"
    cache.mkdir()
    copy = cache / mn04_checkpoint.name
    copy.write_bytes(mn04_checkpoint.read_bytes())
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(cache))
    reads = []
    monkeypatch.setattr(download, "sha256sum", lambda p, real=download.sha256sum: reads.append(p) or real(p))
    assert checkpoint_path("mn04_as", progress=False) == copy
    assert checkpoint_path("mn04_as", progress=False) == copy and len(reads) == 1  # remembered
    data = bytearray(copy.read_bytes())
    data[-100] ^= 0xFF  # same size, other content
    copy.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="not the released file"):
        checkpoint_path("mn04_as", progress=False)
