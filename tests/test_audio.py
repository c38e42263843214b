"""The audio loader: formats, rates, channels, bit depths, and one-line errors."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from datasets.audio import AudioLoadError, find_audio_files, load_audio, stream_audio
from tests.conftest import REPO, shared_path


def tone(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_mp3(path: Path, samples: np.ndarray, rate: int) -> None:
    """Encode mono float samples as mp3 with PyAV."""
    with av.open(str(path), "w", format="mp3") as out:
        stream = out.add_stream("mp3", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def test_metro_clip_matches_the_golden_waveform():
    waveform = load_audio(shared_path("audio", "metro_station-paris.wav"))
    expected = np.load(shared_path("golden", "metro_32k.npy"))
    assert waveform.dtype == np.float32 and waveform.shape == (320000,)
    np.testing.assert_allclose(waveform, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 32000, 44100, 48000, 96000])
def test_sample_rates_are_converted_to_32k(tmp_path, rate):
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, tone(rate, 0.5, 1000.0), rate)
    waveform = load_audio(path)
    assert waveform.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(waveform))
    assert np.argmax(spectrum) * 32000 / len(waveform) == pytest.approx(1000.0, abs=4)


@pytest.mark.parametrize("subtype, tol", [("PCM_16", 1e-4), ("PCM_24", 1e-6), ("FLOAT", 0), ("PCM_U8", 1e-2)])
def test_bit_depths(tmp_path, subtype, tol):
    path = tmp_path / "x.wav"
    samples = tone(32000, 0.25)
    sf.write(path, samples, 32000, subtype=subtype)
    np.testing.assert_allclose(load_audio(path), samples, atol=tol)


def test_channels_are_averaged(tmp_path):
    left, right = tone(32000, 0.5, 440.0), tone(32000, 0.5, 660.0)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right, np.zeros_like(left)], axis=1), 32000, subtype="PCM_24")
    np.testing.assert_allclose(load_audio(path), (left + right) / 3, atol=1e-5)


def test_compressed_formats_through_pyav(tmp_path):
    samples = tone(44100, 1.0, 1000.0)
    write_mp3(tmp_path / "x.mp3", samples, 44100)
    waveform = load_audio(tmp_path / "x.mp3")
    assert abs(len(waveform) - 32000) < 32000 * 0.1  # encoder padding adds a little
    assert np.argmax(np.abs(np.fft.rfft(waveform))) * 32000 / len(waveform) == pytest.approx(1000, abs=5)
    sf.write(tmp_path / "x.ogg", samples, 44100)
    assert len(load_audio(tmp_path / "x.ogg")) == 32000


def test_short_clips_load(tmp_path):
    sf.write(tmp_path / "short.wav", tone(32000, 0.05), 32000)
    assert load_audio(tmp_path / "short.wav").shape == (1600,)


@pytest.mark.parametrize("make, problem", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b""), "file is empty"),
    (lambda p: p.write_bytes(b"this is not audio at all, just text " * 20), "not a readable audio file"),
    (lambda p: sf.write(p, np.zeros(0, dtype=np.float32), 32000), "contains no audio samples"),
])
def test_bad_files_give_one_line_errors(tmp_path, make, problem):
    path = tmp_path / "clip.wav"
    make(path)
    with pytest.raises(AudioLoadError) as err:
        load_audio(path)
    assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_non_audio_with_compressed_extension(tmp_path):
    path = tmp_path / "clip.mp3"
    path.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(AudioLoadError, match="clip.mp3"):
        load_audio(path)


def test_find_audio_files(tmp_path):
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "b.wav", tone(32000, 0.1), 32000)
    sf.write(tmp_path / "sub" / "a.flac", tone(32000, 0.1), 32000)
    (tmp_path / "notes.txt").write_text("x")
    assert find_audio_files([tmp_path]) == [tmp_path / "b.wav", tmp_path / "sub" / "a.flac"]
    assert find_audio_files([tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]  # explicit files kept
    (tmp_path / "empty").mkdir()
    with pytest.raises(AudioLoadError, match="folder contains no audio files"):
        find_audio_files([tmp_path / "empty"])
    with pytest.raises(AudioLoadError, match="no such file or folder"):
        find_audio_files([tmp_path / "nope"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_rejected_naming_the_file(tmp_path, bad):
    samples = tone(16000, 1.0)
    samples[12000] = bad
    path = tmp_path / "clip.wav"
    sf.write(path, samples, 16000, subtype="FLOAT")
    with pytest.raises(AudioLoadError, match=r"clip.wav: contains non-finite samples .* at 0\.750 s"):
        load_audio(path)
    with pytest.raises(AudioLoadError, match="non-finite"):
        list(stream_audio(path, block_seconds=0.1))


def test_pipes_are_read_not_reported_empty(tmp_path):
    """/dev/stdin and named pipes have size 0: they are read, not called empty files."""
    path = tmp_path / "clip.wav"
    sf.write(path, tone(32000, 0.5), 32000)
    code = ("import sys; from datasets.audio import audio_duration, load_audio; "
            "print(audio_duration('/dev/stdin'), load_audio('/dev/stdin').shape)")
    result = subprocess.run([sys.executable, "-c", code], input=path.read_bytes(), capture_output=True,
                            cwd=REPO)
    assert result.returncode == 0 and result.stdout.split() == [b"None", b"(16000,)"], result.stderr
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(path.read_bytes()))
    writer.start()
    np.testing.assert_array_equal(load_audio(fifo), load_audio(path))
    writer.join()
