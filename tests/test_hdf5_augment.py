"""mp3 HDF5 containers (write, read, decode) and the waveform augmentation wrappers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from datasets.augment import (GainDataset, RollDataset, WavMixDataset, decimate, fit_length,
                              random_gain)
from datasets.items import IndexedClip
from datasets.hdf5 import (Mp3DecodeError, Mp3HDF5, Mp3HDF5Writer, decode_mp3, encode_mp3,
                           pack_targets, unpack_targets)
from common.errors import InputError


def _chirp(seconds: float = 0.5, sr: int = 32000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t)).astype(np.float32)


def test_mp3_roundtrip_keeps_length_and_waveform():
    x = _chirp()
    y = decode_mp3(np.frombuffer(encode_mp3(x), dtype=np.uint8))
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y[500:-500] - x[500:-500]).max() < 0.05  # no delay, within mp3 tolerance


def test_stereo_mp3_decodes_to_the_channel_average():
    import io

    import av
    left = _chirp()
    right = -0.5 * left
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp3") as out:
        stream = out.add_stream("mp3", rate=32000)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.stack([left, right]), format="fltp", layout="stereo")
        frame.sample_rate = 32000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    y = decode_mp3(buffer.getvalue())
    assert y.shape == left.shape  # one mono signal, not the two channels end to end
    assert np.abs(y[500:-500] - (left + right)[500:-500] / 2).max() < 0.05


def test_decode_errors():
    with pytest.raises(Mp3DecodeError):
        decode_mp3(b"")
    with pytest.raises(Mp3DecodeError):
        decode_mp3(np.frombuffer(b"\x00garbage" * 50, dtype=np.uint8))


def test_pack_unpack_big_endian():
    y = np.zeros((2, 527), dtype=np.float32)
    y[0, 0] = y[1, 526] = y[1, 8] = 1
    packed = pack_targets(y)
    assert packed.shape == (2, 66) and packed.dtype == np.uint8
    assert packed[0, 0] == 0b1000_0000 and packed[1, 1] == 0b1000_0000
    assert np.array_equal(unpack_targets(packed, 527), y)


def test_writer_reader_roundtrip(tmp_path):
    path = tmp_path / "x.hdf"
    clips = [_chirp(0.2), _chirp(0.3)]
    targets = pack_targets(np.eye(10)[[1, 7]])
    with Mp3HDF5Writer(path, target_width=2) as w:
        for i, (clip, t) in enumerate(zip(clips, targets)):
            w.append(f"Yclip{i}.mp3", encode_mp3(clip), t)
    assert [p.name for p in tmp_path.iterdir()] == ["x.hdf"]
    h = Mp3HDF5(path)
    assert len(h) == 2 and h.names() == ["Yclip0.mp3", "Yclip1.mp3"] and h.name(1) == "Yclip1.mp3"
    assert np.array_equal(h.targets(), targets)
    assert decode_mp3(h.mp3(1)).shape == (9600,)
    import pickle
    clone = pickle.loads(pickle.dumps(h))  # DataLoader workers get a copy without the handle
    assert clone.name(0) == "Yclip0.mp3"


def test_writer_removes_partial_file_on_error(tmp_path):
    path = tmp_path / "x.hdf"
    with pytest.raises(RuntimeError):
        with Mp3HDF5Writer(path, target_width=2) as w:
            w.append("a.mp3", encode_mp3(_chirp(0.1)), np.zeros(2))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_reader_errors(tmp_path):
    with pytest.raises(InputError, match="dataset file not found"):
        Mp3HDF5(tmp_path / "missing.hdf")
    (tmp_path / "junk.hdf").write_bytes(b"junk")
    with pytest.raises(InputError, match="junk.hdf: not a readable HDF5 file"):
        Mp3HDF5(tmp_path / "junk.hdf")
    import h5py
    with h5py.File(tmp_path / "other.hdf", "w") as f:
        f["audio_name"] = np.zeros(2, dtype="S20")
    with pytest.raises(InputError, match="no mp3, target dataset"):
        Mp3HDF5(tmp_path / "other.hdf")


def test_fit_length_decimate_gain():
    x = np.arange(10, dtype=np.float32)[None]
    assert np.array_equal(fit_length(x, 4), x[:, :4])
    assert np.array_equal(fit_length(x, 12)[0, 10:], [0, 0])
    torch.manual_seed(0)
    crops = {int(fit_length(x, 4, random_crop=True)[0, 0]) for _ in range(50)}
    assert crops == set(range(7))
    assert np.array_equal(decimate(x, 32000, 16000), x[:, ::2])
    assert np.array_equal(decimate(x, 32000, 8000), x[:, ::4])
    with pytest.raises(ValueError):
        decimate(x, 32000, 22050)
    torch.manual_seed(0)
    gains = {round(20 * np.log10(float(random_gain(np.ones(1), 3)[0]))) for _ in range(200)}
    assert gains == {-3, -2, -1, 0, 1, 2}
    assert random_gain(x, 0) is x


class _Items(Dataset):
    def __init__(self, n=6, length=100):
        self.n, self.length = n, length

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        wave = np.zeros((1, self.length), dtype=np.float32)
        wave[0, 0] = 1.0
        wave += i
        return IndexedClip(wave, f"name{i}", torch.eye(self.n)[i], i)


class _Labels(_Items):
    """Items whose target is an integer label."""

    def __getitem__(self, i):
        return super().__getitem__(i)._replace(target=i)


def test_roll_shifts_within_range():
    np.random.seed(0)
    shifts = set()
    for _ in range(300):
        w, name, y, idx = RollDataset(_Items(length=10000), shift=4000)[2]
        assert isinstance(w, torch.Tensor) and name == "name2" and idx == 2
        pos = int(torch.argmax(w[0]))
        shifts.add(pos if pos < 5000 else pos - 10000)
    assert min(shifts) >= -4000 and max(shifts) <= 4000 and len(shifts) > 250


def test_gain_wrapper():
    torch.manual_seed(1)
    w = GainDataset(_Items(), 6)[1][0]
    ratio = float(w[0, 5] / 1.0)
    assert round(20 * np.log10(ratio)) in range(-6, 6)


def test_wavmix_mixes_half_the_items_with_folded_beta_weights():
    torch.manual_seed(0)
    np.random.seed(0)
    data = WavMixDataset(_Items(), alpha=2.0, rate=0.5)
    mixed = 0
    for _ in range(400):
        w, name, y, idx = data[3]
        assert name == "name3" and idx == 3
        if abs(float(w.mean())) < 1e-5:  # mixed: the DC of the mixture was removed
            mixed += 1
            assert y.sum() == pytest.approx(1.0)
            if y[3] < 1:  # (the partner may be the item itself)
                assert 0.5 <= float(y[3]) < 1 and int(torch.argsort(y)[-2]) != 3
            # both clips have a unit spike at sample 0 on top of their DC, so after DC removal
            # the mixture's first sample is 1 - 1/100 whatever the weight
            assert float(w[0, 0]) == pytest.approx(1 - 1 / 100, abs=1e-5)
        else:
            assert torch.equal(y, torch.eye(6)[3]) and float(w[0, 1]) == 3.0  # DC kept
    assert 150 < mixed < 250


def test_wavmix_prepare_and_custom_mix():
    torch.manual_seed(0)
    data = WavMixDataset(_Labels(), rate=1.0,
                         prepare_target=lambda i: torch.nn.functional.one_hot(torch.tensor(i), 6).float(),
                         mix_target=lambda a, b, lam: {"target": torch.maximum(a.target, b.target)})
    y = data[0].target
    assert y[0] == 1 and y.sum() in (1.0, 2.0)
