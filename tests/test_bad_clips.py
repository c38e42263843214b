"""Clips a dataset cannot use (unreadable files, corrupt HDF5 data, NaN or infinite samples) are
logged once, counted, and replaced by the next usable clip (training) or masked (evaluation)."""
from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf
import torch

import datasets.mp3clips
from datasets.audioset import NUM_CLASSES, AudioSetDataset
from datasets.files import AudioFileDataset
from datasets.hdf5 import Mp3HDF5, Mp3HDF5Writer, encode_mp3, pack_targets
from datasets.mp3clips import Mp3ClipDataset

ROWS = 70


def _corrupt_mp3_refs(path: Path, rows: range) -> None:
    """Overwrite the global-heap index of `rows` in the mp3 dataset's chunks (64 references of 16
    bytes: size, heap address, index): HDF5 can no longer find their bytes."""
    with h5py.File(path, "r") as f:
        offsets = {row: f["mp3"].id.get_chunk_info(row // 64).byte_offset + 16 * (row % 64) + 12 for row in rows}
    with open(path, "r+b") as out:
        for offset in offsets.values():
            out.seek(offset)
            out.write(b"\x5a" * 4)


def _corrupt_chunk(path: Path, key: str, chunk: int) -> None:
    """Overwrite the first half of chunk `chunk` of dataset `key` in the file."""
    with h5py.File(path, "r") as f:
        info = f[key].id.get_chunk_info(chunk)
    with open(path, "r+b") as out:
        out.seek(info.byte_offset)
        out.write(b"\x5a" * (info.size // 2))


@pytest.fixture
def hdf5_file(tmp_path: Path) -> Path:
    path = tmp_path / "clips.hdf"
    mp3 = encode_mp3(np.full(1600, 0.1, dtype=np.float32))
    with Mp3HDF5Writer(path, target_width=66) as writer:
        for i in range(ROWS):
            y = np.zeros(NUM_CLASSES)
            y[i % 3] = 1
            writer.append(f"Y{i:08d}.mp3", mp3, pack_targets(y))
    return path


def test_corrupt_hdf5_rows_are_skipped_and_counted(hdf5_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    _corrupt_mp3_refs(hdf5_file, range(64, ROWS))
    train = AudioSetDataset([hdf5_file], clip_length=0.1)
    with caplog.at_level(logging.WARNING):
        waveform, name, _, index = train[66]
    assert (name, index) == ("00000000", 0)  # rows 66..69 unusable: wrapped around to row 0
    assert train.take_bad_count() == 4 and train.bad_indices().tolist() == [66, 67, 68, 69]
    assert f"{hdf5_file}: row 66 (Y00000066.mp3) cannot be read (HDF5 error reading mp3" in caplog.text
    evaluation = AudioSetDataset([hdf5_file], clip_length=0.1, bad_rows="mask")
    waveform, name, target, index = evaluation[65]
    assert index == -1 and name == "00000065" and not waveform.any() and target[65 % 3] == 1
    assert evaluation[3][3] == 3

    clips = Mp3ClipDataset(Mp3HDF5(hdf5_file), lambda row: row, clip_samples=3200, bad_rows="mask")
    assert clips[64][3] == -1 and clips[63][3] == 63 and clips.take_bad_count() == 1


def test_corrupt_targets_and_names_fail_their_checksum(hdf5_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    _corrupt_chunk(hdf5_file, "target", 0)
    _corrupt_chunk(hdf5_file, "audio_name", 0)
    data = AudioSetDataset([hdf5_file], clip_length=0.1, bad_rows="mask")
    with caplog.at_level(logging.WARNING):
        assert not data.packed_targets().any() and data.names() == [""] * ROWS  # read as empty, not as garbage
        waveform, name, target, index = data[5]
    assert index == -1 and name == "" and not target.any()
    assert f"{hdf5_file}: {ROWS} row(s) of target cannot be read (corrupt file)" in caplog.text
    assert f"{hdf5_file}: row 5 (name unreadable) cannot be read (HDF5 error reading target" in caplog.text


def test_non_finite_mp3_rows_are_skipped(hdf5_file: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    real = datasets.mp3clips.decode_mp3
    calls = []

    def decode(data: np.ndarray) -> np.ndarray:
        calls.append(len(calls))
        waveform = real(data)
        if len(calls) == 1:
            waveform[100] = np.inf
        return waveform

    monkeypatch.setattr(datasets.mp3clips, "decode_mp3", decode)
    clips = Mp3ClipDataset(Mp3HDF5(hdf5_file), lambda row: row, clip_samples=3200)
    with caplog.at_level(logging.WARNING):
        assert clips[7][3] == 8 and torch.isfinite(clips[7][0]).all()
    assert clips.take_bad_count() == 1
    assert f"{hdf5_file}: row 7: contains non-finite samples (NaN or infinity), the first at 0.003 s; skipped" \
        in caplog.text


def test_file_dataset_skips_unreadable_and_non_finite_files(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    files = [tmp_path / f"{k}.wav" for k in ("good", "nan", "junk", "other")]
    tone = (0.1 * np.sin(np.arange(3200) / 5)).astype(np.float32)
    sf.write(files[0], tone, 32000)
    sf.write(files[1], np.where(np.arange(3200) == 1600, np.nan, tone).astype(np.float32), 32000, subtype="FLOAT")
    files[2].write_bytes(b"not audio " * 100)
    sf.write(files[3], -tone, 32000)
    targets = np.eye(4, dtype=np.float32)
    names = [f.name for f in files]
    train = AudioFileDataset(files, targets, names, clip_samples=3200)
    with caplog.at_level(logging.WARNING):
        waveform, name, target, index = train[1]
        assert (name, index, int(target.argmax())) == ("other.wav", 3, 3)
        assert train[1][3] == 3
    assert train.take_bad_count() == 4 and train.bad_indices().tolist() == [1, 2]
    assert caplog.text.count("nan.wav: contains non-finite samples") == 1
    assert caplog.text.count("junk.wav: not a readable audio file") == 1
    evaluation = AudioFileDataset(files, targets, names, clip_samples=3200, bad_clips="mask")
    waveform, name, target, index = evaluation[2]
    assert (name, index, waveform.shape) == ("junk.wav", -1, (1, 3200)) and not waveform.any()
    batch = next(iter(torch.utils.data.DataLoader(evaluation, batch_size=4)))
    assert batch[3].tolist() == [0, -1, -1, 3]
