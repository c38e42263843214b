"""WindowEngine: windows of a stream in any block sizes, exact and shared; frames; bounded memory."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, shared_path
from datasets.audio import load_audio
from helpers.inference.resolve import resolve_model
from helpers.inference.tagging import LoadedModel
from helpers.inference.windows import WindowEngine, num_windows
from models.mn.model import get_model as get_mn
from models.preprocess import AugmentMelSTFT
from models.runtime import for_inference

SR = 32000


class StatsTagger:
    """A stand-in tagger whose 'probabilities' describe the window: (first sample, length, sum)."""
    sample_rate = SR
    class_names = ["first", "length", "sum"]
    model_takes_waveforms = False

    def predict(self, windows: np.ndarray) -> np.ndarray:
        return np.stack([windows[:, 0], np.full(len(windows), windows.shape[1]), windows.sum(1)], 1)


def _run(engine: WindowEngine, signal: np.ndarray, sizes: list[int]) -> list[tuple[int, np.ndarray]]:
    out, k, i = [], 0, 0
    while k < len(signal):
        out += engine.push(signal[k:k + sizes[i % len(sizes)]])
        k, i = k + sizes[i % len(sizes)], i + 1
    return out + engine.finish()


@pytest.mark.parametrize("length, window, hop, sizes", [
    (100, 30, 10, [1]), (100, 30, 10, [7, 64]), (90, 30, 10, [1000]),  # exactly 7 windows
    (25, 30, 10, [3]),  # shorter than one window: one window of its own length
    (100, 20, 35, [9]), (95, 20, 35, [9]),  # gaps between windows; the last sample in a gap
    (101, 30, 7, [13, 2])])
def test_exact_windows_cover_the_stream_in_any_blocks(length, window, hop, sizes) -> None:
    signal = np.arange(1, length + 1, dtype=np.float32)
    out = _run(WindowEngine(StatsTagger(), window, hop, "exact", batch_size=3), signal, sizes)
    assert [i for i, _ in out] == list(range(num_windows(length, window, hop)))
    for i, row in out:
        start = i * hop
        expected = signal[start:start + window]
        assert row[0] == start + 1 and row[1] == (window if length > window else length)
        assert row[2] == expected.sum()  # zero padding adds nothing
    assert num_windows(95, 20, 35) == 3 and num_windows(100, 20, 35) == 3 and num_windows(90, 30, 10) == 7


def test_exact_window_comes_out_with_its_last_sample() -> None:
    engine = WindowEngine(StatsTagger(), 30, 10, "exact", batch_size=8)
    assert engine.push(np.ones(29, np.float32)) == []
    assert [i for i, _ in engine.push(np.ones(1, np.float32))] == [0]
    assert [i for i, _ in engine.push(np.ones(20, np.float32))] == [1, 2]
    assert engine.num_samples == 50 and len(engine._samples.held) <= 30


def _small_mn_tagger(**kwargs) -> LoadedModel:
    torch.manual_seed(0)
    model = for_inference(get_mn(width_mult=0.1, **kwargs).eval())
    return LoadedModel(model, AugmentMelSTFT().eval(), [f"c{i}" for i in range(model.num_classes)], "test",
                  torch.device("cpu"))


def _signal(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 440 * t) * (t % 7 < 3) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def test_shared_result_does_not_depend_on_chunks_or_blocks() -> None:
    tagger = _small_mn_tagger()
    signal = _signal(47.3)
    results = []
    for chunk_frames, sizes in ((1000, [SR * 60]), (40, [12345, 999]), (25, [SR])):
        engine = WindowEngine(tagger, 4 * SR, int(0.7 * SR), "shared", frames=True)  # hop: 2.1875 frames
        engine.chunk = chunk_frames * engine._shared.frame
        out = _run(engine, signal, sizes)
        times, frames = engine.take_frames()
        assert [i for i, _ in out] == list(range(num_windows(len(signal), 4 * SR, int(0.7 * SR))))
        results.append((np.stack([p for _, p in out]), frames))
        np.testing.assert_allclose(times, np.arange(len(frames)) * 0.32)
        assert frames.shape == (int(np.ceil(((len(out) - 1) * 0.7 + 4) / 0.32)), tagger.model.num_classes)
    for windows, frames in results[1:]:
        np.testing.assert_allclose(windows, results[0][0], atol=2e-5)
        np.testing.assert_allclose(frames, results[0][1], atol=2e-5)


def test_frames_are_the_head_on_a_centred_moving_mean_of_frame_embeddings() -> None:
    """--frame_window: 0 gives each frame alone, the default the mean of 9 frames (~3 s) around it,
    clipped at the ends; both in any chunking."""
    from helpers.inference.shared_pass import SharedPass

    tagger = _small_mn_tagger()
    signal = _signal(13.1)  # 11 windows of 4 s: the last one zero-padded to 14 s
    emb = SharedPass(tagger, context=4 * SR).embeddings(np.pad(signal, (0, 14 * SR - len(signal))))  # one pass
    for frame_window, count in ((0, 1), (None, 9), (SR, 3)):
        engine = WindowEngine(tagger, 4 * SR, SR, "shared", frames=True, frame_window=frame_window)
        engine.chunk = 7 * engine._shared.frame
        _run(engine, signal, [SR // 3])
        frames = engine.take_frames()[1]
        assert len(frames) == len(emb) == 44
        half = count // 2
        mean = torch.stack([emb[max(0, j - half):j + half + 1].mean(0) for j in range(len(frames))])
        expected = tagger.probabilities(SharedPass(tagger, context=4 * SR).logits(mean))
        np.testing.assert_allclose(frames, expected, atol=2e-5)


def test_moving_frames_in_any_pieces() -> None:
    from helpers.inference.shared_pass import MovingFrames

    x = torch.randn(60, 3, dtype=torch.float64)
    for count, sizes in ((1, [60]), (5, [1]), (9, [7, 2, 20]), (31, [4])):
        moving, out, k = MovingFrames(count), [], 0
        while k < len(x):
            out.append(moving.push(x[k:k + sizes[len(out) % len(sizes)]]))
            k += sizes[(len(out) - 1) % len(sizes)]
        got = torch.cat(out + [moving.push(x[:0], final=True)])
        expected = torch.stack([x[max(0, j - count // 2):j + count // 2 + 1].mean(0) for j in range(len(x))])
        torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="odd"):
        MovingFrames(4)


def test_spectrogram_in_pieces_is_the_spectrogram_at_once() -> None:
    from helpers.inference.shared_pass import SharedPass

    tagger = _small_mn_tagger()
    shared = SharedPass(tagger, context=4 * SR)
    rng = np.random.default_rng(3)
    for length in (3 * SR, 320 * 50, 320 * 50 + 1, 320 * 123 + 77):
        audio = (0.1 * rng.standard_normal(length)).astype(np.float32)
        shared.SPECTROGRAM_PIECE = 50
        pieces = shared._spectrogram(audio)
        whole = tagger.spectrograms(torch.from_numpy(audio)[None])
        assert pieces.shape == whole.shape
        torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)


def test_stages_before_the_first_se_in_pieces_are_the_stages_at_once() -> None:
    from helpers.inference.shared_pass import SharedPass

    tagger = _small_mn_tagger()
    shared = SharedPass(tagger, context=4 * SR)
    assert 0 < shared.local < len(shared.stages)
    rng = np.random.default_rng(4)
    for frames in (300, 512, 1001):
        x = torch.from_numpy(rng.standard_normal((1, 1, 128, frames)).astype(np.float32))
        shared.LOCAL_PIECE = 10 ** 9
        whole = shared._local_stages(x)
        shared.LOCAL_PIECE = 64
        pieces = shared._local_stages(x)
        assert pieces.shape == whole.shape
        torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)


def test_sample_buffer_keeps_what_is_not_dropped() -> None:
    from helpers.inference.windows import SampleBuffer

    buffer, stream, rng = SampleBuffer(), np.arange(10_000, dtype=np.float32), np.random.default_rng(0)
    k = 0
    while k < len(stream):
        n = int(rng.integers(1, 700))
        buffer.append(stream[k:k + n])
        k = min(len(stream), k + n)
        buffer.drop(int(rng.integers(0, 500)))
        np.testing.assert_array_equal(buffer.held, stream[buffer.start:k])
    buffer.drop(10**9)
    assert len(buffer.held) == 0 and buffer.start == len(stream)


def test_shared_short_stream_is_the_exact_window() -> None:
    tagger = _small_mn_tagger()
    signal = _signal(2.5)
    shared = _run(WindowEngine(tagger, 10 * SR, SR, "shared"), signal, [SR])
    exact = _run(WindowEngine(tagger, 10 * SR, SR, "exact"), signal, [SR])
    assert len(shared) == len(exact) == 1
    np.testing.assert_allclose(shared[0][1], exact[0][1], atol=1e-6)


def test_dymn_and_se_over_time_refuse_the_shared_pass() -> None:
    from helpers.inference.windows import shared_support
    from models.dymn.model import get_model as get_dymn

    dymn = LoadedModel(get_dymn(width_mult=0.4).eval(), AugmentMelSTFT().eval(), ["c"] * 527, "d", torch.device("cpu"))
    assert "DyMN" in shared_support(dymn)
    assert "frequency or time" in shared_support(_small_mn_tagger(se_dims="ct"))
    with pytest.raises(ValueError, match="DyMN"):
        WindowEngine(dymn, 10 * SR, SR, "shared")


def test_shared_agrees_with_exact_on_a_steady_real_recording(mn04_checkpoint, labels_file) -> None:
    """The real checkpoint on the metro recording looped (steady sound): within the issue's bounds."""

    tagger = resolve_model("mn04_as")
    signal = np.tile(load_audio(shared_path("audio", "metro_station-paris.wav"), SR), 4)
    probs = {mode: np.stack([p for _, p in _run(WindowEngine(tagger, 10 * SR, 2 * SR, mode), signal, [SR * 7])])
             for mode in ("exact", "shared")}
    assert np.abs(probs["shared"] - probs["exact"]).mean() <= 0.02
    assert (probs["shared"].argmax(1) == probs["exact"].argmax(1)).mean() >= 0.95


RSS_SCRIPT = """
import sys, numpy as np, torch
from helpers.inference.tagging import LoadedModel
from helpers.inference.windows import WindowEngine
from models.mn.model import get_model
from models.runtime import for_inference
from models.preprocess import AugmentMelSTFT
torch.manual_seed(0)
tagger = LoadedModel(for_inference(get_model(width_mult=0.4).eval()), AugmentMelSTFT().eval(), ["c"] * 527, "t",
                torch.device("cpu"))
engine = WindowEngine(tagger, 320000, 320000, "exact", batch_size=16)
rng = np.random.default_rng(0)
for block in range(int(sys.argv[1])):  # 10-s blocks of generated audio, never kept
    engine.push((0.1 * rng.standard_normal(320000)).astype(np.float32))
    with open("/proc/self/status") as f:
        print([int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS")][0], flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_memory_stays_flat_over_a_long_recording(tmp_path: Path) -> None:
    """10 minutes of generated audio through mn04 in batches of 16 windows, RSS sampled after each
    10-s block: the second half of the run holds no more than the first."""
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "60"], cwd=repo, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    rss = [int(x) for x in done.stdout.split()]
    assert len(rss) == 60
    assert max(rss[30:]) <= max(rss[10:30]) + 30, rss


def _cli(*args: str) -> subprocess.CompletedProcess:
    repo = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, str(repo / "windowed_inference.py"), *args], cwd=repo,
                          capture_output=True, text=True, timeout=600)


def test_cli_shared_frames_npz_csv_and_plot(tmp_path: Path, mn04_checkpoint: Path, labels_file: Path) -> None:
    """The docs' command: --windows shared --frames to .npz (times, shape) and .csv, and --plot."""
    import soundfile as sf

    path = tmp_path / "field.wav"
    sf.write(path, np.tile(load_audio(REPO / "resources" / "demo_bells.wav", SR), 4)[:20 * SR], SR)  # 20 s
    npz, table, png = tmp_path / "frames.npz", tmp_path / "frames.csv", tmp_path / "frames.png"
    common = ["--model_name", "mn04_as", "--audio_path", str(path), "--window_length", "10", "--hop_length", "1",
              "--windows", "shared", "--frames", "--top_k", "0"]
    result = _cli(*common, "--probabilities", str(npz), "--plot", str(png))
    assert result.returncode == 0, result.stderr
    data = np.load(npz)
    n = int(np.ceil(20 / 0.32))  # frames up to the end of the last window (here the recording's end)
    assert data["frame_probabilities"].shape == (n, 527) and data["probabilities"].shape == (11, 527)
    np.testing.assert_allclose(data["frame_times"], np.arange(n) * 0.32, atol=1e-9)
    assert png.stat().st_size > 1000
    result = _cli(*common, "--probabilities", str(table))
    rows = table.read_text().splitlines()
    assert result.returncode == 0 and rows[0].startswith("filename,time,Speech") and len(rows) == n + 1
    assert rows[2].split(",")[1] == "0.320"
    result = _cli(*common, "--probabilities", str(table), "--frame_window", "-1")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --frame_window must be between 0 and 3600 seconds, got -1.0")


def test_cli_refuses_a_window_shorter_than_one_fft_frame(tmp_path: Path) -> None:
    result = _cli("--model_name", "mn04_as", "--audio_path", str(tmp_path), "--window_length", "0.01")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: window_length must be at least 0.032 s (one FFT frame of 1024 samples at 32000 Hz), got 0.01 s")
    assert not list(tmp_path.iterdir())
