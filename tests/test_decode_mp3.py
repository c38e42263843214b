"""The mp3 row decoder: libsndfile's fast path gives PyAV's (FFmpeg's) samples at the same
alignment, pads/cuts like fit_length, and hands everything it cannot vouch for to PyAV."""
from __future__ import annotations

import numpy as np
import pytest

import datasets.hdf5 as hdf5
from datasets.augment import fit_length
from datasets.hdf5 import Mp3DecodeError, decode_mp3, encode_mp3

pytestmark = pytest.mark.skipif(not hdf5.SNDFILE_MP3, reason="libsndfile without mp3 support")


def _noise(rate: int, channels: int, seconds: float = 0.4) -> np.ndarray:
    x = 0.2 * np.random.default_rng(rate + channels).standard_normal((channels, int(rate * seconds)))
    return x[0] if channels == 1 else x


def _pyav_only(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(raw: bytes) -> None:
        raise AssertionError("PyAV decoded a file that libsndfile should have decoded")
    monkeypatch.setattr(hdf5, "_decode_pyav", fail)


@pytest.mark.parametrize("rate", [32000, 44100, 16000])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("xing_header", [True, False])
def test_same_samples_as_pyav(rate, channels, xing_header):
    raw = encode_mp3(_noise(rate, channels), rate, xing_header=xing_header)
    reference = hdf5._decode_pyav(raw)
    fast = decode_mp3(np.frombuffer(raw, dtype=np.uint8))
    assert fast.dtype == np.float32 and fast.shape == reference.shape
    assert np.abs(fast - reference).max() < 1e-4
    for length in (len(reference) // 3, len(reference) + 5000):  # cut, pad
        fitted = decode_mp3(raw, length)
        assert fitted.dtype == np.float32 and fitted.shape == (length,)
        assert np.abs(fitted - fit_length(reference, length)).max() < 1e-4


def test_files_with_exact_length_skip_pyav(monkeypatch):
    raws = [encode_mp3(_noise(32000, 1)), encode_mp3(_noise(44100, 2), 44100)]
    _pyav_only(monkeypatch)
    for raw in raws:
        decode_mp3(raw)
        assert decode_mp3(raw, 320000)[-1000:].tolist() == [0.0] * 1000


def test_truncated_file_is_pyavs_decode():
    raw = encode_mp3(_noise(32000, 1))
    cut = raw[:len(raw) // 2]
    np.testing.assert_array_equal(decode_mp3(cut), hdf5._decode_pyav(cut))
    np.testing.assert_array_equal(decode_mp3(cut, 16000), fit_length(hdf5._decode_pyav(cut), 16000))


def test_without_sndfile_mp3_pyav_decodes(monkeypatch):
    raw = encode_mp3(_noise(32000, 2))
    monkeypatch.setattr(hdf5, "SNDFILE_MP3", False)
    np.testing.assert_array_equal(decode_mp3(raw), hdf5._decode_pyav(raw))
    with pytest.raises(Mp3DecodeError):
        decode_mp3(b"\x00garbage" * 50)
