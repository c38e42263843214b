"""Streamed audio loading (datasets/audio.stream_audio) against whole-file loading."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import soxr

from datasets.audio import AudioLoadError, audio_duration, load_audio, stream_audio
from tests.conftest import shared_path


def _tone(seconds: float, rate: int, channels: int = 2) -> np.ndarray:
    """(channels, n) float32: a chirp plus noise, different per channel."""
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    rows = [0.4 * np.sin(2 * np.pi * (200 + 300 * c) * t * (1 + t)) + 0.05 * rng.standard_normal(len(t))
            for c in range(channels)]
    return np.stack(rows).astype(np.float32)


def write_mp3(path: Path, wave: np.ndarray, rate: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mp3", rate=rate)
        stream.layout = "stereo"
        for i in range(0, wave.shape[1], 1152):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, i:i + 1152]), format="fltp",
                                               layout="stereo")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.fixture(scope="module")
def wav_44k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "tone_44k.wav"
    sf.write(path, _tone(7.3, 44100).T, 44100, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def mp3_44k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "tone_44k.mp3"
    write_mp3(path, _tone(6.1, 44100), 44100)
    return path


@pytest.mark.parametrize("block_seconds", [0.05, 1.0, 2.5, 60.0])
def test_streamed_wav_equals_whole_file_and_one_shot_soxr(wav_44k: Path, block_seconds: float) -> None:
    blocks = list(stream_audio(wav_44k, 32000, block_seconds=block_seconds))
    streamed = np.concatenate(blocks)
    whole = load_audio(wav_44k, 32000)
    data, rate = sf.read(wav_44k, dtype="float32")
    reference = soxr.resample(data.mean(axis=1), rate, 32000, quality="HQ")
    assert streamed.dtype == np.float32 and len(streamed) == round(7.3 * 32000)
    np.testing.assert_array_equal(streamed, whole)
    np.testing.assert_allclose(streamed, reference, atol=1e-6)
    # blocks stay near the requested size: memory does not grow with the file
    assert max(len(b) for b in blocks) <= block_seconds * 32000 + 2048
    if block_seconds <= 1.0:
        assert len(blocks) >= int(7.3 / block_seconds)


def test_streamed_mp3_equals_whole_file(mp3_44k: Path) -> None:
    blocks = list(stream_audio(mp3_44k, 32000, block_seconds=0.5))
    whole = load_audio(mp3_44k, 32000)
    assert len(blocks) >= 10
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    assert abs(len(whole) - 6.1 * 32000) < 0.1 * 32000
    # decoded audio is the tone, not noise: correlate with the source mono mix
    source = soxr.resample(_tone(6.1, 44100).mean(axis=0), 44100, 32000)
    n = min(len(source), len(whole))
    lag = int(np.argmax(np.correlate(whole[:32000], source[:32000], mode="full"))) - 31999
    a, b = (whole[lag:n], source[:n - lag]) if lag >= 0 else (whole[:n + lag], source[-lag:n])
    assert np.corrcoef(a, b)[0, 1] > 0.95


def test_streamed_native_rate_is_unchanged(tmp_path: Path) -> None:
    wave = _tone(2.0, 32000, channels=1)[0]
    path = tmp_path / "mono32k.flac"
    sf.write(path, wave, 32000, subtype="PCM_24")
    streamed = np.concatenate(list(stream_audio(path, 32000, block_seconds=0.3)))
    np.testing.assert_allclose(streamed, wave, atol=2 ** -22)


def test_metro_clip_loads_exactly_as_golden() -> None:
    clip = shared_path("audio", "metro_station-paris.wav")
    golden = np.load(shared_path("golden", "metro_32k.npy")).ravel()
    np.testing.assert_array_equal(load_audio(clip), golden)
    np.testing.assert_array_equal(np.concatenate(list(stream_audio(clip, block_seconds=0.7))), golden)
    assert audio_duration(clip) == pytest.approx(10.0)


def test_duration_from_header(wav_44k: Path, mp3_44k: Path) -> None:
    assert audio_duration(wav_44k) == pytest.approx(7.3, abs=1e-4)
    assert audio_duration(mp3_44k) == pytest.approx(6.1, abs=0.1)


def test_stream_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(AudioLoadError, match="missing.wav: no such file"):
        stream_audio(tmp_path / "missing.wav")
    empty = tmp_path / "empty.wav"
    empty.touch()
    with pytest.raises(AudioLoadError, match="empty.wav: file is empty"):
        stream_audio(empty)
    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(b"this is not audio" * 100)
    with pytest.raises(AudioLoadError, match="garbage.mp3"):
        list(stream_audio(garbage))
    with pytest.raises(ValueError, match="block_seconds"):
        stream_audio(garbage, block_seconds=0)
