"""Sound event detection: window generation, segment averaging, event merging, windowed_inference.py."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import soundfile as sf

from datasets.audio import load_audio
from helpers.inference.sed import WindowPredictions, detect_events, num_windows, plot_activity, tag_windows, window_samples
from helpers.inference.windows import WindowEngine
from helpers.inference.resolve import resolve_model
from tests.conftest import REPO, shared_path


class EchoTagger:
    """A stand-in tagger whose 'probabilities' are the window's samples."""
    sample_rate = 32000
    model_takes_waveforms = False

    def predict(self, windows: np.ndarray) -> np.ndarray:
        return windows


def _blocks(signal: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    out, i, k = [], 0, 0
    while i < len(signal):
        out.append(signal[i:i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return out


@pytest.mark.parametrize("length", [1, 7, 10, 11, 13, 16, 40, 41])
@pytest.mark.parametrize("sizes", [[1], [3, 17], [100]])
def test_sliding_windows_cover_the_signal(length: int, sizes: list[int]) -> None:
    window, hop = 10, 3
    signal = np.arange(1, length + 1, dtype=np.float32)
    engine = WindowEngine(EchoTagger(), window, hop, batch_size=2)
    windows = [w for block in _blocks(signal, sizes) for _, w in engine.push(block)]
    windows += [w for _, w in engine.finish()]
    assert len(windows) == num_windows(length, window, hop)
    padded = np.pad(signal, (0, len(windows) * hop + window))
    for i, w in enumerate(windows):
        # a signal shorter than a window is that one window, unpadded (at least 2 samples)
        assert len(w) == (window if length >= window else max(length, 2))
        np.testing.assert_array_equal(w, padded[i * hop:i * hop + len(w)])
    # the windows reach the last sample; no window starts past it
    assert (len(windows) - 1) * hop + window >= length > (len(windows) - 1) * hop


def test_window_counts_and_validation() -> None:
    assert num_windows(0, 10, 5) == 0
    assert num_windows(3, 10, 5) == 1  # shorter than a window: one window of its own length
    assert num_windows(10, 10, 5) == 1
    assert num_windows(11, 10, 5) == 2
    assert num_windows(50 * 32000, 320000, 80000) == 17
    assert window_samples(10.0, 2.5, 32000) == (320000, 80000)
    assert window_samples(1.0, 2.0, 32000) == (32000, 64000)  # gaps between windows
    with pytest.raises(ValueError, match="one FFT frame of 1024 samples"):
        window_samples(0.01, 0.01, 32000, 1024)
    with pytest.raises(ValueError, match="hop_length"):
        window_samples(1.0, 0.0, 32000)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="must be finite numbers of seconds"):
            window_samples(bad, 2.5, 32000)


def _predictions(probs: list[list[float]], num_samples: int, window: int = 4, hop: int = 1) -> WindowPredictions:
    return WindowPredictions("a.wav", 1, window, hop, num_samples, np.array(probs, dtype=np.float32))


def test_a_recording_shorter_than_a_window_gets_its_own_tags(tmp_path: Path) -> None:
    import torch
    from helpers.inference.sed import tag_windows
    from helpers.inference.tagging import LoadedModel
    from models.mn.model import get_model
    from models.preprocess import AugmentMelSTFT
    torch.manual_seed(0)
    tagger = LoadedModel(get_model(width_mult=0.1).eval(), AugmentMelSTFT().eval(), [str(i) for i in range(527)],
                    "random", torch.device("cpu"))
    clip = (0.2 * np.sin(np.arange(3 * 32000) / 7)).astype(np.float32)
    sf.write(tmp_path / "short.wav", clip, 32000, subtype="FLOAT")
    pred = tag_windows(tagger, tmp_path / "short.wav", window_length=10.0, hop_length=2.5, progress=False)
    assert pred.probabilities.shape == (1, 527) and pred.ends.tolist() == [3.0]
    np.testing.assert_allclose(pred.probabilities[0], tagger.predict(clip)[0], atol=1e-6)


def test_segments_average_overlapping_windows() -> None:
    # 7 samples, windows of 4 every 2: starts 0, 2, 4 (the last padded); segments [0,2) [2,4) [4,6) [6,7)
    pred = _predictions([[0.0], [1.0], [0.5]], num_samples=7, window=4, hop=2)
    bounds, probs = pred.segments()
    np.testing.assert_allclose(bounds, [0, 2, 4, 6, 7])
    # segment 0: window 0 only; 1: windows 0, 1; 2: windows 1, 2; 3: window 2 (window 1 ends at 6)
    np.testing.assert_allclose(probs[:, 0], [0.0, 0.5, 0.75, 0.5])
    np.testing.assert_allclose(pred.starts, [0, 2, 4])
    np.testing.assert_allclose(pred.ends, [4, 6, 7])


def test_segments_weight_partial_overlaps() -> None:
    # window 5, hop 2: window 0 covers [0,5) = segments 0, 1 fully and half of segment 2
    pred = _predictions([[1.0], [0.0], [0.0]], num_samples=9, window=5, hop=2)
    _, probs = pred.segments()
    np.testing.assert_allclose(probs[:, 0], [1.0, 0.5, 1 / 5, 0.0, 0.0])


def test_events_merge_consecutive_segments_and_keep_the_peak() -> None:
    probs = [[0.1, 0.9], [0.6, 0.9], [0.7, 0.1], [0.2, 0.1], [0.9, 0.1], [0.1, 0.1]]
    pred = _predictions(probs, num_samples=6, window=1, hop=1)  # window = hop: segments = windows
    events = detect_events(pred, ["Dog", "Cat"], threshold=0.5)
    assert [(e.onset, e.offset, e.event_label, e.probability) for e in events] == [
        (0.0, 2.0, "Cat", 0.9), (1.0, 3.0, "Dog", 0.7), (4.0, 5.0, "Dog", 0.9)]
    assert all(e.filename == "a.wav" for e in events)
    assert detect_events(pred, ["Dog", "Cat"], threshold=0.95) == []


def test_ideal_detector_with_all_windows_agreeing_localizes_exactly() -> None:
    # an event in samples [8, 12) seen by every window that overlaps it (window 4, hop 1)
    n, window = 20, 4
    starts = np.arange(num_windows(n, window, 1))
    present = [[1.0 if s < 12 and s + window > 8 else 0.0] for s in starts]
    events = detect_events(_predictions(present, n, window, 1), ["Bark"], threshold=1.0)
    assert [(e.onset, e.offset) for e in events] == [(8.0, 12.0)]


@pytest.fixture(scope="module")
def tagger(mn04_checkpoint, labels_file):
    return resolve_model("mn04_as")


@pytest.fixture(scope="module")
def metro_in_silence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 10-s metro clip with 20 s of silence before and after (50 s, 32 kHz)."""
    clip = load_audio(shared_path("audio", "metro_station-paris.wav"))
    silence = np.zeros(20 * 32000, dtype=np.float32)
    path = tmp_path_factory.mktemp("sed") / "metro_in_silence.wav"
    sf.write(path, np.concatenate([silence, clip, silence]), 32000, subtype="FLOAT")
    return path


def test_train_event_found_where_the_train_is(tagger, metro_in_silence: Path) -> None:
    pred = tag_windows(tagger, metro_in_silence, 10.0, 2.5, batch_size=8, progress=False)
    assert pred.num_samples == 50 * 32000 and pred.probabilities.shape == (17, 527)
    train = tagger.class_names.index("Train")
    # the window holding exactly the clip gives the clip's own tags (mn04_as: Train 0.727)
    assert pred.starts[8] == 20.0 and pred.probabilities[8, train] == pytest.approx(0.727, abs=2e-3)
    assert pred.probabilities[:4, train].max() < 0.01 and pred.probabilities[-4:, train].max() < 0.01
    events = [e for e in detect_events(pred, tagger.class_names, threshold=0.3) if e.event_label == "Train"]
    assert len(events) == 1
    assert abs(events[0].onset - 20.0) <= 2.5 and abs(events[0].offset - 30.0) <= 2.5
    assert 0.3 <= events[0].probability <= 1.0


def test_plot_is_a_png(tagger, tmp_path: Path) -> None:
    pred = WindowPredictions("x.wav", 32000, 320000, 80000, 400000,
                             np.random.default_rng(0).random((3, 527), dtype=np.float32))
    out = tmp_path / "plot.png"
    plot_activity(pred, tagger.class_names, out, k=4, events=detect_events(pred, tagger.class_names, 0.9))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 100 and image.shape[1] > 500


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "windowed_inference.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_events_plot_and_probabilities(metro_in_silence: Path, tmp_path: Path, mn04_checkpoint: Path,
                                                   labels_file: Path) -> None:
    events_csv, plot, probs_npz = tmp_path / "ev.csv", tmp_path / "out" / "act.png", tmp_path / "p.npz"
    result = _run("--model", "mn04_as", "--audio_path", str(metro_in_silence), "--events", str(events_csv),
                  "--plot", str(plot), "--probabilities", str(probs_npz), "--batch_size", "5")
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split("\n\n")
    assert len(blocks) == 17
    lines = blocks[8].splitlines()
    assert lines[0] == "Window: 20.00 - 30.00" and len(lines) == 6
    assert lines[1] == "\tTrain: 0.73"
    assert all(line.startswith("\t") and ": " in line for line in lines[1:])
    with open(events_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["filename", "onset", "offset", "event_label", "probability"]
    train = [r for r in rows if r["event_label"] == "Train"]
    assert len(train) == 1 and train[0]["filename"] == str(metro_in_silence)
    assert abs(float(train[0]["onset"]) - 20) <= 2.5 and abs(float(train[0]["offset"]) - 30) <= 2.5
    assert plot.read_bytes()[:4] == b"\x89PNG"
    with np.load(probs_npz) as data:
        assert data["probabilities"].shape == (17, 527)
        np.testing.assert_allclose(data["starts"], np.arange(17) * 2.5)
        assert str(data["class_names"][0]) == "Speech"
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left behind


def test_cli_short_clip_and_json(tmp_path: Path, mn04_checkpoint: Path, labels_file: Path) -> None:
    clip = load_audio(REPO / "resources" / "demo_bells.wav")[:3 * 32000]
    path = tmp_path / "short.wav"
    sf.write(path, clip, 32000, subtype="FLOAT")
    events_json = tmp_path / "ev.json"
    result = _run("--model_name", "mn04_as", "--audio_path", str(path), "--window_length", "5",
                  "--hop_length", "1", "--threshold", "0.01", "--events", str(events_json), "--top_k", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Window: 0.00 - 3.00" and len([x for x in lines if x.startswith("Window")]) == 1
    data = json.loads(events_json.read_text())
    assert data["model"] == "mn04_as" and data["window_length"] == 5.0 and data["threshold"] == 0.01
    assert data["events"] and all(e["onset"] == 0.0 and e["offset"] == 3.0 for e in data["events"])
    assert set(data["events"][0]) == {"filename", "onset", "offset", "event_label", "probability"}


def test_cli_rejects_bad_input(tmp_path: Path, mn04_checkpoint: Path, labels_file: Path) -> None:
    missing = _run("--model", "mn04_as", "--audio_path", str(tmp_path / "nope.wav"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "nope.wav" in missing.stderr
    bad = _run("--model", "mn04_as", "--audio_path", str(tmp_path), "--threshold", "1.5", "--events", "x.txt")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "--threshold" in bad.stderr
    assert not list(tmp_path.iterdir())
