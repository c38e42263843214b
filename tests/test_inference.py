"""inference.py end to end: the original's printed tags, batching, outputs, errors, exit codes."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from helpers.inference.resolve import resolve_model
from helpers.inference.tagging import format_tags
from models.config import FrontendConfig
from models.mn.model import get_model as get_mn
from models.pretrained import get_entry
from tests.conftest import REPO, shared_path

EXPECTED_MN04 = [("Train", .727), ("Rail transport", .578), ("Railroad car, train wagon", .560),
                 ("Subway, metro, underground", .493), ("Vehicle", .240), ("Clickety-clack", .153),
                 ("Speech", .077), ("Train wheels squealing", .051), ("Music", .037),
                 ("Outside, urban or manmade", .025)]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "inference.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=300)


def parse_tags(stdout: str) -> list[tuple[str, float]]:
    lines = [l for l in stdout.splitlines() if ": " in l and not l.startswith("*")]
    return [(l.rsplit(": ", 1)[0], float(l.rsplit(": ", 1)[1])) for l in lines]


@pytest.fixture(scope="module")
def metro() -> str:
    return str(shared_path("audio", "metro_station-paris.wav"))


def test_metro_clip_gives_the_original_tags(metro, mn04_checkpoint, labels_file):
    result = run("--model_name", "mn04_as", "--audio_path", metro)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "************* Acoustic Event Detected: *****************" and lines[-1] == "*" * 56
    tags = parse_tags(result.stdout)
    assert [name for name, _ in tags] == [name for name, _ in EXPECTED_MN04]
    for (_, p), (_, expected) in zip(tags, EXPECTED_MN04):
        assert abs(p - expected) <= 0.002


def test_many_files_batched_with_outputs_and_a_bad_file(tmp_path, metro, mn04_checkpoint, labels_file):
    clips = tmp_path / "clips"
    clips.mkdir()
    waveform, rate = sf.read(metro, dtype="float32")
    sf.write(clips / "a_metro.wav", waveform, rate, subtype="PCM_24")
    sf.write(clips / "b_metro_stereo_48k.flac", np.stack([waveform[:441000 // 2]] * 2, 1), 48000)
    sf.write(clips / "c_short.wav", waveform[:20000], rate)  # under a second
    (clips / "d_broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    out = tmp_path / "res" / "tags.json"
    result = run("--model_name", "mn04_as", "--audio_path", str(clips), metro, "--top_k", "3",
                 "--output", str(out), "--batch_size", "2")
    assert result.returncode == 1  # some failed, the others tagged
    assert "d_broken.wav" in result.stderr and "not a readable audio file" in result.stderr
    data = json.loads(out.read_text())
    assert [r["file"] for r in data["results"]] == [str(clips / n) for n in
                                                    ("a_metro.wav", "b_metro_stereo_48k.flac", "c_short.wav")] + [metro]
    assert [e["file"] for e in data["errors"]] == [str(clips / "d_broken.wav")]
    first, last = data["results"][0]["tags"], data["results"][-1]["tags"]
    assert first == last and len(first) == 3  # same audio, batched or not
    assert first[0]["label"] == "Train" and first[0]["mid"] == "/m/07jdr" and first[0]["rank"] == 1
    assert abs(first[0]["probability"] - 0.727) <= 0.002
    assert [p.name for p in out.parent.iterdir()] == ["tags.json"]  # no temp files left


def test_csv_output_with_all_classes(tmp_path, metro, mn04_checkpoint, labels_file):
    out = tmp_path / "tags.csv"
    result = run("--model_name", "mn04_as", "--audio_path", metro, "--output", str(out), "--all_classes")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 527 and rows[0]["label"] == "Train" and rows[0]["rank"] == "1"
    probs = [float(r["probability"]) for r in rows]
    assert probs == sorted(probs, reverse=True)


@pytest.mark.parametrize("make, args, problem", [
    (None, ["--audio_path", "{tmp}/missing.wav"], "no such file or folder"),
    ("empty", ["--audio_path", "{tmp}/clip.wav"], "file is empty"),
    ("text", ["--audio_path", "{tmp}/clip.wav"], "not a readable audio file"),
    ("zero", ["--audio_path", "{tmp}/clip.wav"], "contains no audio samples"),
    ("dir", ["--audio_path", "{tmp}/folder"], "folder contains no audio files"),
    ("zero", ["--audio_path", "{tmp}/clip.wav", "--model_name", "mn04_sa"], "did you mean mn04_as"),
    ("zero", ["--audio_path", "{tmp}/clip.wav", "--output", "{tmp}/out.txt"], "must end in .csv, .json or .parquet"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, mn04_checkpoint, labels_file, make, args, problem):
    clip = tmp_path / "clip.wav"
    if make == "empty":
        clip.write_bytes(b"")
    elif make == "text":
        clip.write_text("hello, I am not a wav file\n" * 10)
    elif make == "zero":
        sf.write(clip, np.zeros(0, dtype=np.float32), 32000)
    elif make == "dir":
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "readme.txt").write_text("x")
    before = sorted(tmp_path.rglob("*"))
    args = [a.format(tmp=tmp_path) for a in args]
    if "--model_name" not in args:
        args = ["--model_name", "mn04_as", *args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.json")]
    result = run(*args)
    assert result.returncode == 2
    assert problem in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == "" and sorted(tmp_path.rglob("*")) == before


def test_registry_frontend_settings_and_explicit_flags(tmp_path, monkeypatch, labels_file):
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path))
    (tmp_path / labels_file.name).write_bytes(labels_file.read_bytes())
    torch.save(get_mn(width_mult=1.0).state_dict(), tmp_path / get_entry("mn10_as_mels_64").filename)
    assert resolve_model("mn10_as_mels_64").frontend.n_mels == 64  # no flag needed
    assert resolve_model("mn10_as_mels_64", frontend=FrontendConfig(n_mels=64)).frontend.n_mels == 64  # the same value is fine
    clip = tmp_path / "noise.wav"
    sf.write(clip, np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32), 16000)
    result = run("--model_name", "mn10_as_mels_64", "--audio_path", str(clip), "--top_k", "4",
                 env={**os.environ, "EFFICIENTAT_MODEL_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert len(parse_tags(result.stdout)) == 4


@pytest.mark.parametrize("name, settings, message", [
    ("mn04_as", {"n_mels": 64}, "mn04_as was trained with n_mels=128, not 64"),
    ("mn04_as", {"hopsize": 160, "sr": 32000}, "mn04_as was trained with hopsize=320, not 160: leave"),
    ("mn10_as_hop_15", {"hopsize": 320}, "mn10_as_hop_15 was trained with hopsize=480, not 320"),
])
def test_frontend_settings_contradicting_the_model_are_errors(name, settings, message):
    """Checked before any checkpoint is loaded or downloaded."""
    with pytest.raises(ValueError, match=message):
        resolve_model(name, frontend=FrontendConfig(**settings))


def test_frontend_flag_contradicting_the_model_is_one_line(tmp_path):
    clip = tmp_path / "noise.wav"
    sf.write(clip, np.zeros(16000, dtype=np.float32), 16000)
    result = run("--model_name", "mn04_as", "--audio_path", str(clip), "--n_mels", "64")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("error: mn04_as was trained with n_mels=128, not 64: leave the spectrogram "
                                     "settings to the model (another spectrogram gives meaningless tags)")


def test_format_tags():
    probs = np.array([0.1, 0.9, 0.5], dtype=np.float32)
    assert format_tags(probs, ["a", "b", "c"], 2).splitlines()[1:3] == ["b: 0.900", "c: 0.500"]
