"""AudioSet HDF5 pipeline, teacher logits, data preparation and ex_audioset.py (errors, training,
resume, two-process torchrun run, evaluation parity) on tiny generated files."""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import ex_audioset
from datasets.audio import load_audio
from datasets.audioset import (BALANCED_FILE, EVAL_FILE, NUM_CLASSES, UNBALANCED_FILE,
                               AudioSetDataset, TeacherPredictions, normalize_name, sample_weights)
from datasets.hdf5 import Mp3HDF5, Mp3HDF5Writer, decode_mp3, encode_mp3, pack_targets, unpack_targets
from datasets.prepare_hdf5 import main as prepare_main
from common.errors import InputError, run_cli
from helpers.training.metrics import multilabel_metrics
from helpers.training.data import DistributedWeightedSampler
from models.checkpoint import load_checkpoint
from tests.conftest import REPO
from tests.test_training_helpers import one_thread  # noqa: F401  (autouse fixture)


SR = 32000
CLASS_FREQS = {0: 440.0, 1: 1200.0, 2: 3000.0, 3: 6000.0}


def _clip(labels: list[int], seed: int, seconds: float = 1.0) -> np.ndarray:
    """A learnable clip: one tone per positive class plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.01 * rng.standard_normal(len(t))
    for c in labels:
        x += 0.2 * np.sin(2 * np.pi * CLASS_FREQS[c] * t + rng.uniform(0, 6))
    return x.astype(np.float32)


def _labels(i: int) -> list[int]:
    return [[0], [1], [2], [3], [0, 2], [1, 3]][i % 6]


def _write(path: Path, names: list[str], seed: int, bad_rows: tuple[int, ...] = ()) -> dict:
    clips = {}
    with Mp3HDF5Writer(path, target_width=66) as w:
        for i, name in enumerate(names):
            y = np.zeros(NUM_CLASSES)
            y[_labels(i)] = 1
            x = _clip(_labels(i), seed + i)
            mp3 = b"\xff\xfb garbage, not an mp3" * 20 if i in bad_rows else encode_mp3(x)
            w.append(name, mp3, pack_targets(y))
            clips[normalize_name(name)] = (x, y)
    return clips


@pytest.fixture(scope="module")
def audioset_dir(tmp_path_factory) -> Path:
    """balanced (12 clips), unbalanced (12, row 4 undecodable), eval (12) files and teacher
    logits whose rows are shuffled relative to the files."""
    d = tmp_path_factory.mktemp("audioset")
    bal = [f"Ybal{i:08d}.mp3" for i in range(12)]
    unbal = [f"{i % 3:02d}/Yunb{i:08d}.mp3" for i in range(12)]
    clips = _write(d / BALANCED_FILE, bal, 0)
    clips.update(_write(d / UNBALANCED_FILE, unbal, 100, bad_rows=(4,)))
    _write(d / EVAL_FILE, [f"Yevl{i:08d}.mp3" for i in range(12)], 200)
    names = list(clips) + ["extra000001"]
    order = np.random.default_rng(0).permutation(len(names))
    logits = np.full((len(names), NUM_CLASSES), -4.0, dtype=np.float32)
    for row, k in enumerate(order):
        if names[k] in clips:
            logits[row, clips[names[k]][1] > 0] = 4.0
    np.save(d / "teacher.npy", logits)
    with open(d / "index.pkl", "wb") as f:
        pickle.dump({names[k]: row for row, k in enumerate(order)}, f)
    return d


# ---------------------------------------------------------------- dataset


def test_items_shapes_names_targets_and_decoding(audioset_dir):
    ds = AudioSetDataset([audioset_dir / BALANCED_FILE, audioset_dir / UNBALANCED_FILE], clip_length=2.0)
    assert len(ds) == 24
    w, name, y, idx = ds[13]
    assert w.shape == (1, 64000) and w.dtype == torch.float32 and idx == 13
    assert name == "unb00000001" and normalize_name("01/Yunb00000001.mp3") == name
    assert y.dtype == torch.float32 and y.shape == (527,) and torch.equal(torch.nonzero(y)[:, 0], torch.tensor([1]))
    source = _clip(_labels(1), 101)
    assert torch.all(w[0, 32000:] == 0)  # zero-padded to the clip length
    assert np.abs(w[0, 500:31500].numpy() - source[500:31500]).max() < 0.05
    half = AudioSetDataset([audioset_dir / BALANCED_FILE], resample_rate=16000, clip_length=0.5)
    w16 = half[0][0]
    assert w16.shape == (1, 8000) and torch.equal(w16, ds[0][0][:, :16000:2])
    assert ds.names()[:2] == ["bal00000000", "bal00000001"] and ds.name(12) == "unb00000000"
    with pytest.raises(ValueError, match="resample_rate"):
        AudioSetDataset([audioset_dir / BALANCED_FILE], resample_rate=22050)


def test_bad_row_replaced_logged_once_and_counted(audioset_dir, caplog):
    ds = AudioSetDataset([audioset_dir / UNBALANCED_FILE], clip_length=0.5)
    with caplog.at_level(logging.WARNING, logger="datasets.audioset"):
        first, second = ds[4], ds[4]
    assert first[1] == second[1] == "unb00000005" and first[3] == 5  # the next decodable row
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "row 4 (01/Yunb00000004.mp3) is not a decodable mp3" in messages[0]
    assert ds.take_bad_count() == 2 and ds.take_bad_count() == 0
    masked = AudioSetDataset([audioset_dir / UNBALANCED_FILE], clip_length=0.5, bad_rows="mask")
    w, name, y, idx = masked[4]
    assert idx == -1 and name == "unb00000004" and torch.all(w == 0) and w.shape == (1, 16000)
    assert masked.bad_indices().tolist() == [4]


def test_bad_rows_are_counted_across_workers(audioset_dir):
    ds = AudioSetDataset([audioset_dir / UNBALANCED_FILE], clip_length=0.25)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    names = [n for batch in loader for n in batch.name]
    assert "unb00000004" not in names and len(names) == 12
    assert ds.take_bad_count() == 1 and ds.bad_indices().tolist() == [4]


def test_sample_weights_formula():
    rng = np.random.default_rng(0)
    y = (rng.random((50, NUM_CLASSES)) < 0.01).astype(np.float32)
    y[3] = 0
    w = sample_weights(pack_targets(y), chunk=7)
    y = y.astype(np.float64)
    expected = y @ (1000.0 / (y.sum(0) + 100.0))
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert w[3] == 0


def test_distributed_weighted_sampler():
    weights = np.array([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    single = DistributedWeightedSampler(weights, 7, seed=3)
    single.set_epoch(2)
    drawn = list(single)
    assert len(drawn) == 7 == len(set(drawn)) and 0 not in drawn
    again = DistributedWeightedSampler(weights, 7, seed=3)
    again.set_epoch(2)
    assert list(again) == drawn
    again.set_epoch(3)
    assert list(again) != drawn
    ranks = [DistributedWeightedSampler(weights, 7, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    parts = [list(s) for s in ranks]
    assert len(parts[0]) == len(parts[1]) == 4
    assert set(parts[0] + parts[1]) == set(drawn)  # the same draw, split (one index repeated)
    with pytest.raises(InputError, match="cannot draw 10 distinct clips"):
        DistributedWeightedSampler(weights, 10)
    # frequent draws follow the weights
    counts = np.zeros(10)
    s = DistributedWeightedSampler(weights, 1, seed=0)
    for e in range(3000):
        s.set_epoch(e)
        counts[list(s)] += 1
    np.testing.assert_allclose(counts / 3000, weights / weights.sum(), atol=0.03)


def test_teacher_alignment_by_name(audioset_dir):
    teacher = TeacherPredictions(audioset_dir / "teacher.npy", audioset_dir / "index.pkl", temperature=2.0)
    probs, known = teacher.lookup(["bal00000004", "nobody", "unb00000001"])
    assert known.tolist() == [True, False, True]
    expected = np.full(NUM_CLASSES, 1 / (1 + np.exp(2.0)))  # sigmoid(-4 / 2)
    expected[[0, 2]] = 1 / (1 + np.exp(-2.0))
    np.testing.assert_allclose(probs[0].numpy(), expected, rtol=1e-6)
    assert torch.all(probs[1] == 0) and probs[2, 1] > 0.8
    assert teacher.missing(["bal00000000", "zzz"]) == ["zzz"]


def test_teacher_file_errors(tmp_path, audioset_dir):
    np.save(tmp_path / "bad.npy", np.zeros((5, 10), dtype=np.float32))
    with pytest.raises(InputError, match=r"bad.npy: teacher logits have shape \(5, 10\), expected \(clips, 527\)"):
        TeacherPredictions(tmp_path / "bad.npy", audioset_dir / "index.pkl")
    np.save(tmp_path / "short.npy", np.zeros((3, 527), dtype=np.float32))
    with pytest.raises(InputError, match="do not fit the 3 rows"):
        TeacherPredictions(tmp_path / "short.npy", audioset_dir / "index.pkl")
    with pytest.raises(InputError, match="teacher file not found"):
        TeacherPredictions(tmp_path / "none.npy", audioset_dir / "index.pkl")


# ---------------------------------------------------------------- data preparation


def test_prepare_hdf5_roundtrip_segments_and_simple(tmp_path, labels_file, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    sources = {"Yaaaaaaaaaaa": ([0], 32000), "bbbbbbbbbbb_30000": ([1, 2], 44100), "Yccccccccccc": ([3], 16000)}
    for stem, (labels, rate) in sources.items():
        t = np.arange(rate) / rate
        x = sum(0.2 * np.sin(2 * np.pi * CLASS_FREQS[c] * t) for c in labels)
        sf.write(audio / f"{stem}.wav", x.astype(np.float32), rate)
    table = [line.split(",")[1] for line in labels_file.read_text().splitlines()[1:4]]
    seg = tmp_path / "segments.csv"
    seg.write_text("# Segments csv created Sun Mar  5 10:54:31 2017\n"
                   "# num_ytids=4, num_segs=4, num_unique_labels=3, num_positive_labels=5\n"
                   "# YTID, start_seconds, end_seconds, positive_labels\n"
                   f'aaaaaaaaaaa, 0.000, 10.000, "{table[0]}"\n'
                   f'bbbbbbbbbbb, 30.000, 40.000, "{table[1]},{table[2]}"\n'
                   f'missingmiss, 0.000, 10.000, "{table[0]}"\n'
                   f'ccccccccccc, 0.000, 10.000, "3"\n')
    out = tmp_path / "seg.hdf"
    prepare_main(["--audio_dir", str(audio), "--csv", str(seg), "--output", str(out)])
    assert "wrote 3 clips (527 classes)" in capsys.readouterr().out
    h = Mp3HDF5(out)
    assert h.names() == ["Yaaaaaaaaaaa.mp3", "Ybbbbbbbbbbb.mp3", "Yccccccccccc.mp3"]
    targets = unpack_targets(h.targets(), 527)
    assert [np.flatnonzero(t).tolist() for t in targets] == [[0], [1, 2], [3]]
    for row, stem in enumerate(sources):
        source = load_audio(audio / f"{stem}.wav", SR)
        decoded = decode_mp3(h.mp3(row))
        assert decoded.shape == source.shape
        assert np.abs(decoded[200:-200] - source[200:-200]).max() < 0.05

    simple = tmp_path / "simple.csv"
    simple.write_text('filename,labels\nYaaaaaaaaaaa.wav,"Speech;Music"\nYccccccccccc.wav,3\n')
    out2 = tmp_path / "simple.hdf"
    prepare_main(["--audio_dir", str(audio), "--csv", str(simple), "--output", str(out2)])
    h2 = Mp3HDF5(out2)
    assert h2.names() == ["Yaaaaaaaaaaa.mp3", "Yccccccccccc.mp3"]
    assert np.flatnonzero(unpack_targets(h2.targets(), 527)[0]).tolist() == [0, 137]

    simple.write_text("filename,labels\nnothere.wav,Speech\n")
    with pytest.raises(InputError, match="line 2: audio file .*nothere.wav not found"):
        prepare_main(["--audio_dir", str(audio), "--csv", str(simple), "--output", str(tmp_path / "x.hdf")])
    simple.write_text("filename,labels\nYaaaaaaaaaaa.wav,Not a class\n")
    with pytest.raises(InputError, match="line 2: unknown label 'Not a class'"):
        prepare_main(["--audio_dir", str(audio), "--csv", str(simple), "--output", str(tmp_path / "x.hdf")])
    assert not (tmp_path / "x.hdf").exists()


def test_prepare_hdf5_by_path_encodings_and_wrong_columns(tmp_path):
    """`python datasets/prepare_hdf5.py` works like `-m`; Windows-1252 CSVs are read; a header
    that fits neither format is one line naming both."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", _clip([0], 0, 0.2), SR)
    classes = tmp_path / "classes.txt"
    classes.write_text("café\nbells\n", encoding="utf-8")
    simple = tmp_path / "simple.csv"
    simple.write_bytes("filename,labels\na.wav,café\n".encode("cp1252"))

    def prepare(csv_path: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "datasets/prepare_hdf5.py", "--audio_dir", str(audio), "--csv",
                               str(csv_path), "--output", str(tmp_path / "out.hdf"), "--classes", str(classes)],
                              cwd=REPO, capture_output=True, text=True)

    proc = prepare(simple)
    assert proc.returncode == 0 and "wrote 1 clips (2 classes)" in proc.stdout, proc.stderr
    assert "read as Windows-1252" in proc.stderr
    assert unpack_targets(Mp3HDF5(tmp_path / "out.hdf").targets(), 2).tolist() == [[1.0, 0.0]]
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("file,label\na.wav,bells\n")
    proc = prepare(wrong)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "wrong.csv, line 1: expected an AudioSet segments row 'YTID, start_seconds, end_seconds" in proc.stderr
    assert "got 'file,label'" in proc.stderr and "needs the columns 'filename,labels'" in proc.stderr


# ---------------------------------------------------------------- ex_audioset.py


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """ex_audioset.main through the CLI guard, in this process: (exit code, stdout, stderr)."""
    code = 0
    try:
        run_cli(lambda: ex_audioset.main(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _train_args(d: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["--train", "--dataset_dir", str(d), "--out_dir", str(out), "--logger", "none",
            "--model_name", "mn01", "--model_width", "0.1", "--n_epochs", str(epochs),
            "--epoch_len", "16", "--batch_size", "4", "--num_workers", "0", "--clip_length", "1",
            "--max_lr", "0.003", "--warm_up_len", "1", "--ramp_down_start", "50", "--seed", "5",
            "--teacher_preds", str(d / "teacher.npy"), "--fname_to_index", str(d / "index.pkl"),
            "--roll", "--wavmix", "--gain_augment", "3", *extra]


def test_cli_errors_are_one_line_exit_2(audioset_dir, tmp_path, capsys):
    proc = subprocess.run([sys.executable, "ex_audioset.py", "--dataset_dir", str(tmp_path / "no")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'no'}: dataset folder does not exist"

    code, _, err = _run(["--dataset_dir", str(tmp_path)], capsys)
    assert code == 2 and err.strip().endswith(f"{tmp_path / EVAL_FILE}: dataset file not found")
    assert len(err.strip().splitlines()) == 1

    code, _, err = _run(["--dataset_dir", str(audioset_dir), "--model_name", "mn04_ass"], capsys)
    assert code == 2 and "unknown model name 'mn04_ass'; did you mean mn04_as" in err

    np.save(tmp_path / "wrong.npy", np.zeros((4, 100), dtype=np.float32))
    args = _train_args(audioset_dir, tmp_path / "run", 1)
    args[args.index("--teacher_preds") + 1] = str(tmp_path / "wrong.npy")
    code, _, err = _run(args, capsys)
    assert code == 2 and "wrong.npy: teacher logits have shape (4, 100), expected (clips, 527)" in err

    partial = {"bal00000000": 0}
    with open(tmp_path / "partial.pkl", "wb") as f:
        pickle.dump(partial, f)
    args = _train_args(audioset_dir, tmp_path / "run", 1)
    args[args.index("--fname_to_index") + 1] = str(tmp_path / "partial.pkl")
    code, _, err = _run(args, capsys)
    assert code == 2 and "23 of 24 training clips (e.g. 'bal00000001') are not in" in err
    assert "--missing_teacher mask" in err and len(err.strip().splitlines()) == 1


def test_evaluation_where_no_clip_is_readable_is_one_line(tmp_path, capsys):
    from models.checkpoint import RunRecord, save_run_record
    from models.factory import model_config, model_from_config
    _write(tmp_path / EVAL_FILE, [f"Yevl{i:08d}.mp3" for i in range(3)], 0, bad_rows=(0, 1, 2))
    config = model_config("mn01", NUM_CLASSES, False, 0.1, None, None, se_dims="c")
    save_run_record(tmp_path / "ft.pt", RunRecord(model_from_config(config).state_dict(), config, {}, []))
    code, out, err = _run(["--dataset_dir", str(tmp_path), "--checkpoint", str(tmp_path / "ft.pt"),
                           "--num_workers", "0"], capsys)
    assert code == 2 and "mAP" not in out
    assert err.strip().splitlines()[-1] == "error: none of the 3 evaluation clips could be read (see the warnings above)"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_timing(entry: dict) -> dict:
    """A metrics.jsonl line without the wall-clock / CPU seconds, which differ between runs."""
    return {k: v for k, v in entry.items() if not k.endswith("_seconds")}


def test_training_lowers_loss_and_resume_matches_uninterrupted(audioset_dir, tmp_path, capsys, labels_file):
    full, part = tmp_path / "full", tmp_path / "part"
    code, out, _ = _run(_train_args(audioset_dir, full, 2), capsys)
    assert code == 0 and "  mAP: " in out and "  ROC: " in out and "  d': " in out
    log = _log(full)
    assert [e["epoch"] for e in log] == [0, 1]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert set(log[0]) >= {"train_loss", "label_loss", "distillation_loss", "learning_rate", "mAP",
                           "ROC", "val_loss", "bad_rows"}
    assert len(list(full.glob("mn01_as_epoch_1_mAP_*.pt"))) == 1 and not list(full.glob("*epoch_0*"))

    assert _run(_train_args(audioset_dir, part, 1), capsys)[0] == 0
    code, out, _ = _run(_train_args(audioset_dir, part, 2, "--resume"), capsys)
    assert code == 0 and "resumed from" in out
    a, b = _weights(full / "last.pt"), _weights(part / "last.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _without_timing(_log(part)[1]) == _without_timing(log[1])
    state = load_checkpoint(part / "last.pt")
    assert state["epoch"] == 1 and state["class_names"][0] == "Speech"
    assert state["model_config"]["width_mult"] == 0.1


def test_dymn_training_updates_temperature(audioset_dir, tmp_path, capsys, labels_file):
    out = tmp_path / "dymn"
    args = _train_args(audioset_dir, out, 2, "--kd_lambda", "0", "--balanced_only", "--epoch_len", "8")
    args[args.index("--model_name") + 1] = "dymn04"
    args[args.index("--model_width") + 1] = "0.4"
    assert _run(args, capsys)[0] == 0
    state = load_checkpoint(out / "last.pt")
    assert state["model_config"]["family"] == "dymn" and state["model_config"]["T_max"] == 30.0
    from models.factory import model_from_config
    model = model_from_config(state["model_config"], load_pretrained=False, epoch=state["epoch"])
    assert {m.temperature for m in model.modules() if hasattr(m, "temperature")} == {29.0}
    assert "distillation_loss" not in _log(out)[0]


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_single_process_evaluation(audioset_dir, tmp_path, capsys, labels_file,
                                                               mn04_checkpoint):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # start from mn04_as: its outputs rank the clips without near-ties, so the metrics are stable
    args = _train_args(audioset_dir, out, 2, "--epoch_len", "15", "--pretrained", "--max_lr", "0.001")
    args[args.index("--model_name") + 1] = "mn04_as"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port", str(_free_port()),
                           "ex_audioset.py", *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("  mAP: ") == 2  # only rank 0 prints
    log = _log(out)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    state = load_checkpoint(out / "last.pt")
    # evaluation gathered from both ranks (6 + 6 eval clips) = one process on rank 0's weights,
    # which also shows that rank 1 held the same weights
    saved = tmp_path / "pred.npz"
    code, text, _ = _run(["--dataset_dir", str(audioset_dir), "--checkpoint", str(out / "last.pt"),
                          "--num_workers", "0", "--batch_size", "5", "--clip_length", "1",
                          "--save_predictions", str(saved)], capsys)
    assert code == 0
    assert f"  mAP: {state['metrics']['mAP']:.3f}" in text and f"  ROC: {state['metrics']['ROC']:.3f}" in text
    pred = np.load(saved)
    assert len(pred["logits"]) == 12
    m = multilabel_metrics(pred["targets"], pred["logits"])
    assert m["mAP"] == pytest.approx(state["metrics"]["mAP"], abs=1e-6)
    assert m["ROC"] == pytest.approx(state["metrics"]["ROC"], abs=1e-6)


def test_evaluation_parity_with_sklearn_and_direct_inference(tmp_path, capsys, labels_file, mn04_checkpoint):
    from sklearn.metrics import average_precision_score, roc_auc_score
    from helpers.inference.resolve import resolve_model

    audio = tmp_path / "audio"
    audio.mkdir()
    os.symlink(REPO / "resources" / "demo_bells.wav", audio / "bells.wav")
    labels = {"bells.wav": "Clang;Ding;Music", "tone0.wav": "Music",
              "tone1.wav": "Music;Vehicle", "tone2.wav": "Train", "noise.wav": "Speech"}
    for k, name in enumerate(["tone0.wav", "tone1.wav", "tone2.wav", "noise.wav"]):
        sf.write(audio / name, _clip([k % 4], k, seconds=10.0) if name != "noise.wav"
                 else 0.1 * np.random.default_rng(9).standard_normal(SR * 4).astype(np.float32), SR)
    rows = "".join(f'{f},"{names}"\n' for f, names in labels.items())
    (tmp_path / "eval.csv").write_text("filename,labels\n" + rows)
    data = tmp_path / "as"
    prepare_main(["--audio_dir", str(audio), "--csv", str(tmp_path / "eval.csv"),
                  "--output", str(data / EVAL_FILE)])
    capsys.readouterr()
    code, out, _ = _run(["--model_name=mn04_as", f"--dataset_dir={data}", "--num_workers", "0",
                         "--batch_size", "2", "--save_predictions", str(tmp_path / "p.npz")], capsys)
    assert code == 0 and out.startswith("Results on AudioSet test split for loaded model: mn04_as")

    # the same clips through inference.py's tagger (same model, same frontend)
    h = Mp3HDF5(data / EVAL_FILE)
    waves = torch.stack([torch.from_numpy(np.pad(w, (0, max(0, 320000 - len(w))))[:320000])
                         for w in (decode_mp3(h.mp3(i)) for i in range(len(h)))])
    logits = resolve_model("mn04_as").forward(waves)[0].numpy()
    pred = np.load(tmp_path / "p.npz")
    np.testing.assert_allclose(pred["logits"], logits, rtol=1e-5, atol=1e-5)
    assert list(pred["names"]) == ["bells", "tone0", "tone1", "tone2", "noise"]
    targets = unpack_targets(h.targets(), 527)
    assert np.array_equal(pred["targets"], targets)
    cols = np.flatnonzero(targets.sum(0) > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = average_precision_score(targets[:, cols], logits[:, cols], average=None).mean()
        roc = roc_auc_score(targets[:, cols], logits[:, cols], average=None).mean()
    assert f"  mAP: {ap:.3f}\n" in out and f"  ROC: {roc:.3f}\n" in out
    assert "classes have positive clips" in out
    from common.labels import class_names
    top_two = {class_names()[int(i)] for i in np.argsort(-logits[0])[:2]}
    assert top_two == {"Clang", "Ding"}  # the bells clip survived mp3 (padded to 10 s)
