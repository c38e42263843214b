"""Fine-tuning datasets on tiny generated folders: layouts, splits, targets, the waveform cache and
the one-line errors for missing or malformed files."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datasets import custom, dcase20, esc50
from datasets.audio import load_audio
from datasets.cache import WaveformCache, file_signature
from common.errors import InputError
from tests.datagen import make_custom, make_dcase20, make_esc50


@pytest.fixture(scope="module")
def esc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_esc50(tmp_path_factory.mktemp("esc") / "ESC-50")


def test_esc50_folds_targets_and_lengths(esc_dir: Path) -> None:
    train, test, names = esc50.get_datasets(esc_dir, fold=3)
    assert (len(train), len(test)) == (8, 2)
    assert all(n.startswith("3-") for n in test.names) and not any(n.startswith("3-") for n in train.names)
    assert names[:2] == ["tone", "noise"] and names[2] == "class_2" and len(names) == 50
    wave, name, target, _ = test[1]
    assert wave.shape == (1, 5 * 32000) and wave.dtype == torch.float32
    assert target.shape == (50,) and target.sum() == 1 and int(target.argmax()) == 1
    # 1-s clip at 44.1 kHz: resampled to 32 kHz, then zero-padded to 5 s
    source = load_audio(test.files[1])
    np.testing.assert_array_equal(wave[0, :32000].numpy(), source)
    assert not wave[0, 32000:].any()


def test_esc50_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere/meta/esc50.csv: metadata file not found"):
        esc50.get_datasets(tmp_path / "nowhere")
    root = make_esc50(tmp_path / "esc")
    meta = root / "meta" / "esc50.csv"
    text = meta.read_text()
    meta.write_text(text.replace("fold,target", "fold,label"))
    with pytest.raises(InputError) as err:
        esc50.get_datasets(root)
    assert str(err.value).startswith(f"{meta}: missing column(s) target") and "\n" not in str(err.value)
    meta.write_text(text.replace(",1,0,tone", ",9,0,tone", 1))
    with pytest.raises(InputError, match=r"esc50.csv: line 2: fold must be an integer in 1..5, got '9'"):
        esc50.get_datasets(root)
    meta.write_text(text)
    (root / "audio_32k" / "2-1001-A-1.wav").unlink()
    with pytest.raises(InputError, match=r"esc50.csv: lists .*2-1001-A-1.wav, which does not exist"):
        esc50.get_datasets(root)
    with pytest.raises(InputError, match="fold must be in 1..5"):
        esc50.get_datasets(root, fold=6)


def test_dcase20_splits_encodings_and_devices(tmp_path: Path) -> None:
    root = make_dcase20(tmp_path / "tau")
    train, test, scenes = dcase20.get_datasets(root)
    assert scenes == ["airport", "park"]
    assert (len(train), len(test)) == (12, 6)
    assert test.device_names == ["a", "b", "s1"] and test.city_names == ["barcelona", "lyon"]
    for i, name in enumerate(test.names):
        scene, city, _, _, device = Path(name).stem.split("-")
        assert test.device_names[test.devices[i]] == device
        assert test.city_names[test.cities[i]] == city
        assert int(test[i][2].argmax()) == scenes.index(scene)
    assert test[0][0].shape == (1, 320000)
    split = root / "evaluation_setup" / "fold1_evaluate.csv"
    split.write_text(split.read_text() + "audio/unknown-x-0-0-a.wav\tairport\n")
    with pytest.raises(InputError, match=r"fold1_evaluate.csv: lists audio/unknown-x-0-0-a.wav, which is not in"):
        dcase20.get_datasets(root)
    (root / "meta.csv").write_text((root / "meta.csv").read_text().replace("\t", ","))
    with pytest.raises(InputError, match=r"meta.csv: missing column\(s\) filename, scene_label.*tab-separated"):
        dcase20.get_datasets(root)


def test_custom_single_label_holdout_is_stratified_and_seeded(tmp_path: Path) -> None:
    root = make_custom(tmp_path / "mine", clips_per_class=5)
    data = custom.get_datasets(root, clip_seconds=2.0, val_fraction=0.4, seed=1)
    assert data.class_names == ["noise", "tone"] and not data.multilabel and data.test is None
    assert (len(data.train), len(data.val)) == (6, 4)
    assert sorted(int(data.val.targets[i].argmax()) for i in range(4)) == [0, 0, 1, 1]
    assert data.val.names == custom.get_datasets(root, val_fraction=0.4, seed=1).val.names
    wave, name, target, _ = data.val[0]
    assert wave.shape == (1, 64000) and target.tolist() in ([1, 0], [0, 1])
    assert data.train.random_crop and not data.val.random_crop


def test_custom_multilabel_split_column_and_fold_column(tmp_path: Path) -> None:
    root = make_custom(tmp_path / "multi", clips_per_class=4, multilabel=True, split=True)
    data = custom.get_datasets(root)
    assert data.multilabel and data.class_names == ["noise", "tone"]
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)
    both = [i for i, n in enumerate(data.train.names) if "tone+noise" in n]
    assert both and all(data.train.targets[i].tolist() == [1, 1] for i in both)
    # multiple label columns and a fold column
    single = make_custom(tmp_path / "folds", clips_per_class=4)
    rows = (single / "labels.csv").read_text().splitlines()
    table = ["filename,label_a,label_b,fold"] + [
        f"{r.split(',')[0]},{r.split(',')[1]},{'extra' if i == 0 else ''},{i % 2 + 1}"
        for i, r in enumerate(rows[1:])]
    (single / "my.csv").write_text("\n".join(table) + "\n")
    data = custom.get_datasets(single, csv_path=single / "my.csv", fold=2)
    assert data.multilabel and data.class_names == ["extra", "noise", "tone"] and data.folds == [1, 2]
    assert len(data.val) == 4 and all(n in data.val.names for n in [r.split(",")[0] for r in table[2::2]])


def test_custom_errors(tmp_path: Path) -> None:
    root = make_custom(tmp_path / "bad", clips_per_class=3)
    csv_path = root / "labels.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("filename,label", "file,label"))
    with pytest.raises(InputError, match=r"labels.csv: missing column\(s\) filename \(found: file, label"):
        custom.get_datasets(root)
    csv_path.write_text(text.replace("filename,label", "filename,category"))
    with pytest.raises(InputError, match="labels.csv: no label column"):
        custom.get_datasets(root)
    csv_path.write_text(text + "clips/a/missing.wav,tone\n")
    with pytest.raises(InputError, match=r"labels.csv: lists .*missing.wav, which does not exist"):
        custom.get_datasets(root)
    csv_path.write_text(text.replace(",tone\n", ",\n", 1))
    with pytest.raises(InputError, match="line 2: a single-label dataset needs exactly one label per clip, got 0"):
        custom.get_datasets(root, multilabel=False)
    with pytest.raises(InputError, match="absent/labels.csv: metadata file not found"):
        custom.get_datasets(tmp_path / "absent")


@pytest.mark.parametrize("spelling", ["./{rel}", "{root}/{rel}", "{root}/../{name}/{rel}", "{dir}//./{fname}"])
def test_custom_rejects_one_clip_listed_twice_by_any_spelling(tmp_path: Path, spelling: str) -> None:
    root = make_custom(tmp_path / "dup", clips_per_class=3)
    csv_path = root / "labels.csv"
    lines = csv_path.read_text().splitlines()
    first = lines[2].split(",")[0]
    other = spelling.format(rel=first, root=root, name=root.name, dir=Path(first).parent, fname=Path(first).name)
    csv_path.write_text("\n".join(lines + [f"{other},noise"]) + "\n")  # the same file, other label
    with pytest.raises(InputError, match=rf"labels.csv: lines 3 and {len(lines) + 1} both list "):
        custom.get_datasets(root)


def test_custom_names_case_variants_backslash_paths_and_a_folder_given_as_csv(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_custom(tmp_path / "c", clips_per_class=3)
    csv_path = root / "labels.csv"
    text = csv_path.read_text()
    lines = text.splitlines()
    csv_path.write_text("\n".join(lines[:2] + [lines[2].replace(",tone", ",Tone").replace(",noise", ",Noise")]
                                  + lines[3:]) + "\n")
    with caplog.at_level(logging.WARNING, logger="datasets.custom"):
        data = custom.get_datasets(root)
    assert len(data.class_names) == 3
    assert "differ only in case; they are 2 different classes" in caplog.text
    nested = [line for line in lines[1:] if "/" in line.split(",")[0]][0]
    csv_path.write_text(lines[0] + "\n" + nested.replace("/", "\\") + "\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(InputError, match=r"labels.csv: lists .*, which does not exist: its path has Windows "
                                         r"backslashes; write paths with /"):
        custom.get_datasets(root)
    with pytest.raises(InputError, match=r"c: is a folder; give the table file in it"):
        custom.get_datasets(root, csv_path=root)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "cp1252"])
def test_custom_csv_in_common_encodings(tmp_path: Path, encoding: str, caplog: pytest.LogCaptureFixture) -> None:
    root = make_custom(tmp_path / "enc", clips_per_class=3)
    csv_path = root / "labels.csv"
    csv_path.write_bytes(csv_path.read_text().replace(",noise", ",bruit été").encode(encoding))
    with caplog.at_level(logging.WARNING, logger="datasets.files"):
        data = custom.get_datasets(root)
    assert data.class_names == ["bruit été", "tone"]
    assert ("read as Windows-1252" in caplog.text) == (encoding == "cp1252")
    csv_path.write_bytes(b"filename,label\nclips/a/tone_0.wav,\x81\x8d\n")  # undefined in Windows-1252 too
    with pytest.raises(InputError, match=r"labels.csv: not UTF-8 text \(byte 0x81 on line 2\); save it as UTF-8"):
        custom.get_datasets(root)


def test_custom_warns_about_classes_never_validated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_custom(tmp_path / "rare", clips_per_class=3)
    csv_path = root / "labels.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:-1] + [lines[-1].rsplit(",", 1)[0] + ",bird"]) + "\n")
    with caplog.at_level(logging.WARNING, logger="datasets.custom"):
        data = custom.get_datasets(root)
    assert data.class_names == ["bird", "noise", "tone"]
    assert "labels.csv: no validation clip of bird (1 clip): never validated" in caplog.text
    assert "never learned" not in caplog.text


def test_cache_skips_decoding_and_recovers_from_corrupt_files(esc_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    cache_root = tmp_path / "cache"
    train, _, _ = esc50.get_datasets(esc_dir, cache_path=cache_root)
    first = [train[i][0] for i in range(3)]
    files = sorted(cache_root.rglob("*.wav32"))
    assert len(files) == 3 and not list(cache_root.rglob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")
    monkeypatch.setattr("datasets.files.load_audio", no_decoding)
    train, _, _ = esc50.get_datasets(esc_dir, cache_path=cache_root)
    for i in range(3):
        np.testing.assert_array_equal(train[i][0], first[i])
    monkeypatch.undo()

    cache = train.cache
    corrupt = cache.path(file_signature(train.files[0]))
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="datasets.cache"):
        np.testing.assert_array_equal(train[0][0], first[0])
    assert "checksum mismatch" in caplog.text
    assert cache.load(file_signature(train.files[0])) is not None
    corrupt.write_bytes(corrupt.read_bytes()[:30])
    np.testing.assert_array_equal(train[0][0], first[0])


def test_cache_header_checks_rate_and_source_changes(tmp_path: Path) -> None:
    wave = np.linspace(-1, 1, 1000, dtype=np.float32)
    cache = WaveformCache(tmp_path, "x", 32000)
    cache.store("key", wave)
    np.testing.assert_array_equal(cache.load("key"), wave)
    other_rate = WaveformCache(tmp_path, "x", 16000)
    other_rate.folder = cache.folder  # same files, read with another rate
    assert other_rate.load("key") is None
    # an edited source file gets a new signature, so it is decoded again
    src = tmp_path / "a.wav"
    sf.write(src, wave, 32000)
    sig = file_signature(src)
    sf.write(src, wave[:500], 32000)
    assert file_signature(src) != sig


def test_waveform_cache_folder_that_cannot_be_written(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match="a_file/cache/x_r32000: --cache_path cannot be written"):
        WaveformCache(tmp_path / "a_file" / "cache", "x", 32000)
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(InputError, match="--cache_path cannot be written"):
            WaveformCache(read_only, "x", 32000)
    read_only.chmod(0o700)
    # a write failing during the run (disk full): decoded waveforms still come back, warned once
    cache = WaveformCache(tmp_path / "ok", "x", 32000)
    for key in ("k", "j"):
        cache.path(key).parent.write_text("in the way")  # the file's folder cannot be created
    wave = np.ones(8, np.float32)
    assert np.array_equal(cache.get("k", lambda: wave), wave) and np.array_equal(cache.get("j", lambda: wave), wave)
    assert caplog.text.count("waveform cache not written") == 1 and not cache.writable
