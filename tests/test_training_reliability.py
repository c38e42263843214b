"""Training-side reliability: runs never mix or lose each other's files (folder lock, our own
temporary names, only this run's files deleted), an epoch's commit is finished by a resume, a
full disk and a diverged run end with one line, and what resume and evaluation refuse."""
from __future__ import annotations

import errno
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

import ex_custom
import ex_esc50
from common.errors import run_cli
from common.files import LOCK_NAME, atomic_write, lock_folder, stale_temporaries, temp_path, unlock_folder
from helpers.training import loop
from helpers.training.args import available_cores, finetune_parser
from helpers.training.run_log import json_line
from models.checkpoint import load_checkpoint, read_run_record, save_checkpoint
from tests.conftest import REPO
from tests.datagen import make_custom, make_esc50
from tests.test_training_helpers import one_thread  # noqa: F401  (autouse fixture)

FAST = ["--num_workers", "0", "--logger", "none", "--batch_size", "4", "--warm_up_len", "0",
        "--recipe", "finetune", "--clip_length", "0.5"]
SCRATCH = ["--model_name", "mn01_as", "--model_width", "0.1"]


def _cli(main: Callable, argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """(exit status, stdout, stderr without progress bars) of a script's main through run_cli."""
    code = 0
    try:
        code = run_cli(lambda: main([str(a) for a in argv])) or 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    err = [line for line in captured.err.replace("\r", "\n").splitlines() if line.strip() and "it/s" not in line
           and "s/it" not in line and "?it" not in line]
    return code, captured.out, "\n".join(err)


@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_custom(tmp_path_factory.mktemp("custom") / "c", clips_per_class=3, seconds=0.5)


def _train(custom_dir: Path, out: Path, capsys: pytest.CaptureFixture, *extra) -> tuple[int, str, str]:
    return _cli(ex_custom.main, ["--dataset_dir", custom_dir, *SCRATCH, *FAST, "--out_dir", out, *extra], capsys)


def _strict_json_lines(path: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON (a bare NaN or Infinity fails)."""
    def reject(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")
    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


# ---------------------------------------------------------------- temporary files and the folder lock

def test_temporary_files_are_recognisably_ours_and_stale_only_when_their_writer_died(tmp_path: Path) -> None:
    first, second = temp_path(tmp_path / "x.csv"), temp_path(tmp_path / "x.csv")
    assert first.name == f".x.csv.efficientat-{__import__('os').getpid()}.tmp" and second != first
    dead = tmp_path / f".x.csv.efficientat-{_dead_pid()}.tmp"
    for name in (".notes.tmp", ".x.csv.1a2b3c.tmp", ".x.csv.efficientat-1.tmp", dead.name):
        (tmp_path / name).write_text("x")
    assert stale_temporaries(tmp_path) == [dead]  # not ours, a living writer's (pid 1), this process's
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "x.csv") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "x.csv").exists() and len(list(tmp_path.glob(".x.csv.efficientat-*"))) == 4


def test_a_second_run_into_a_locked_folder_names_the_holder_and_a_killed_holder_frees_it(
        custom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common.files import lock_folder; "
                               f"lock_folder({str(out)!r}); print('locked', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = _train(custom_dir, out, capsys, "--n_epochs", 1)
        assert code == 2 and err == (f"error: {out.resolve()}: another training run is writing into this folder "
                                     f"(pid {holder.pid}); wait for it to end or use another folder")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    lock_folder(out)  # the OS released the killed holder's lock
    unlock_folder(out)


def test_a_run_deletes_only_the_epoch_weights_it_wrote(custom_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    earlier = ("mn01_custom_epoch_7_acc_900.pt", "notes.txt", ".notes.tmp")  # another run's final weights
    for name in earlier:
        (out / name).write_text("keep me")
    code, _, _ = _train(custom_dir, out, capsys, "--n_epochs", 2)
    assert code == 0
    assert all((out / name).read_text() == "keep me" for name in earlier)
    assert [p.name for p in out.glob("mn01_custom_epoch_[01]_*.pt")] == [read_run_record(out / "last.pt").epoch_weights]


# ---------------------------------------------------------------- the epoch's commit and resume

def test_a_commit_cut_short_after_last_pt_is_finished_by_resume(custom_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    commit = loop._commit_epoch

    def killed_after_last_pt(out_dir: Path, record, logger) -> None:
        if record.epoch == 1:
            loop.save_run_record(out_dir / "last.pt", record)
            raise KeyboardInterrupt  # a kill: best.pt, the epoch weights and the metrics line not written
        commit(out_dir, record, logger)

    monkeypatch.setattr(loop, "_commit_epoch", killed_after_last_pt)
    monkeypatch.setattr(loop, "_better", lambda *args: True)  # every epoch is the best: best.pt is due
    with pytest.raises(KeyboardInterrupt):
        _train(custom_dir, out, capsys, "--n_epochs", 2)
    monkeypatch.undo()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "stale": true}\n{"epoch": 2, "train_loss"')  # a later line and a torn one
    code, printed, _ = _train(custom_dir, out, capsys, "--n_epochs", 2, "--resume")
    assert code == 0
    last = read_run_record(out / "last.pt")
    assert read_run_record(out / "best.pt").epoch == last.best["epoch"] == 1
    assert [e["epoch"] for e in _strict_json_lines(out / "metrics.jsonl")] == [0, 1]
    assert _strict_json_lines(out / "metrics.jsonl")[1] == json.loads(json_line({"epoch": 1, **last.log}))
    assert [p.name for p in out.glob("mn01_custom_epoch_*.pt")] == [last.epoch_weights]
    assert f"validation ({out / 'best.pt'}): accuracy {last.metrics['accuracy']:.4f}" in printed


def test_resume_without_best_pt_continues_and_a_finished_run_in_another_folder_is_explained(
        custom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    assert _train(custom_dir, out, capsys, "--n_epochs", 2)[0] == 0
    code, _, err = _train(custom_dir, tmp_path / "new", capsys, "--n_epochs", 2, "--resume", out / "last.pt")
    assert code == 2 and err == (f"error: {out / 'last.pt'}: that run has finished its 2 epochs, and its models are "
                                 f"in {out}, not --out_dir {tmp_path / 'new'}; raise --n_epochs to train it further")
    best_epoch = read_run_record(out / "best.pt").epoch
    (out / "best.pt").unlink()
    with caplog.at_level(logging.WARNING):
        code, printed, _ = _train(custom_dir, out, capsys, "--n_epochs", 2, "--resume")
    assert code == 0 and read_run_record(out / "best.pt").epoch in (best_epoch, 1)
    assert best_epoch == 1 or "best.pt of epoch 0 is missing: it now holds the last epoch, 1" in caplog.text
    assert "validation (" in printed


@pytest.mark.parametrize("flag, value", [("--clip_length", 0.25), ("--mixup_alpha", 0), ("--batch_size", 2)])
def test_resume_refuses_other_data_settings(custom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            flag: str, value: float) -> None:
    out = tmp_path / "run"
    assert _train(custom_dir, out, capsys, "--n_epochs", 1)[0] == 0
    code, _, err = _train(custom_dir, out, capsys, "--n_epochs", 2, "--resume", flag, value)
    assert code == 2 and f"the run was trained with {flag} " in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- divergence

@pytest.mark.parametrize("multilabel", [False, True])
def test_a_diverged_run_stops_with_one_line_and_keeps_only_finite_checkpoints(
        tmp_path: Path, capsys: pytest.CaptureFixture, multilabel: bool) -> None:
    data = make_custom(tmp_path / "c", clips_per_class=3, seconds=0.5, multilabel=multilabel)
    out = tmp_path / "run"
    code, _, err = _cli(ex_custom.main, ["--dataset_dir", data, *SCRATCH, *FAST, "--out_dir", out,
                                         "--n_epochs", 3, "--lr", 1e6], capsys)
    assert code == 2 and err.startswith("error: training diverged: ") and "try a lower --lr" in err
    assert len(err.splitlines()) == 1
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            assert all(torch.isfinite(v).all() for v in load_checkpoint(out / name)["model"].values()
                       if v.is_floating_point())
    if (out / "metrics.jsonl").exists():
        assert all(math.isfinite(e["val_loss"]) for e in _strict_json_lines(out / "metrics.jsonl"))


def test_non_finite_values_are_logged_as_json_null_and_never_win() -> None:
    assert json_line({"epoch": 0, "loss": float("nan"), "x": [float("inf"), 1.0]}) == \
        '{"epoch": 0, "loss": null, "x": [null, 1.0]}\n'
    best = {"accuracy": 0.5, "val_loss": 1.0}
    assert not loop._better({"accuracy": float("nan"), "val_loss": 0.1}, best, "accuracy")
    assert loop._better({"accuracy": 0.5, "val_loss": 0.5}, best, "accuracy")
    assert not loop._better({"accuracy": 0.5, "val_loss": float("nan")}, best, "accuracy")


# ---------------------------------------------------------------- precision

def test_reduced_precision_final_validation_equals_the_logged_epoch(
        tmp_path: Path, capsys: pytest.CaptureFixture, mn04_checkpoint: Path) -> None:
    """bf16 autocast: the evaluation of best.pt runs the same modules as the epoch's evaluation
    (fast copies fold batch norms, which autocast rounds otherwise)."""
    data = make_custom(tmp_path / "c", clips_per_class=3, seconds=0.5)
    out = tmp_path / "run"
    code, printed, _ = _cli(ex_custom.main, ["--dataset_dir", data, "--pretrained_name", "mn04_as", *FAST,
                                             "--out_dir", out, "--n_epochs", 1, "--precision", "bf16"], capsys)
    assert code == 0
    logged = _strict_json_lines(out / "metrics.jsonl")[-1]
    final = [line for line in printed.splitlines() if line.startswith("validation (")]
    assert final and f"accuracy {logged['accuracy']:.4f}, val_loss {logged['val_loss']:.4f}" in final[-1]


# ---------------------------------------------------------------- flags

def test_bad_flag_values_are_one_line_without_the_usage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _cli(ex_esc50.main, ["--dataset_dir", make_esc50(tmp_path / "e"), "--fold", 6], capsys)
    assert code == 2 and err == "error: argument --fold: invalid choice: 6 (choose from 1, 2, 3, 4, 5) (see --help)"
    code, _, err = _cli(__import__("ex_audioset").main, ["--max_lr", -1], capsys)
    assert code == 2 and err == "error: --max_lr must be a positive number, got -1.0"
    from datasets.prepare_hdf5 import main as prepare_main
    code, _, err = _cli(prepare_main, ["--audio_dir", tmp_path, "--csv", tmp_path / "x.csv", "--output",
                                       tmp_path / "x.hdf", "--num_workers", -1], capsys)
    assert code == 2 and err == "error: --num_workers must be at least 1, got -1"
    args = finetune_parser("x", "X", 4, 1e-4, "X_DIR").parse_args([])
    assert args.num_workers == available_cores()


# ---------------------------------------------------------------- full disk

def test_a_full_disk_is_one_line_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected ENOSPC (the real one: test_disk_full.py): a torch checkpoint, whose writer would
    say "unexpected pos", and an OSError without a file name."""
    import builtins
    real_open = builtins.open

    class FullFile:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: FullFile(real_open(*a, **k)))
    target = tmp_path / "last.pt"
    code, _, err = _cli(lambda argv: save_checkpoint(target, {"w": torch.zeros(1000)}), [], capsys)
    monkeypatch.undo()
    assert code == 1 and err == f"error: {target}: no space left on device"
    assert list(tmp_path.iterdir()) == []
    code, _, err = _cli(lambda argv: (_ for _ in ()).throw(OSError(errno.EDQUOT, "quota")), [], capsys)
    assert code == 1 and err == "error: disk quota exceeded"


# ---------------------------------------------------------------- prepare_hdf5 interrupted

def test_a_killed_prepare_hdf5_is_continued_by_the_next_run(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                           capsys: pytest.CaptureFixture) -> None:
    import numpy as np
    import soundfile as sf

    from datasets.hdf5 import Mp3HDF5
    from datasets.prepare_hdf5 import main as prepare_main
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(6):
        sf.write(audio / f"clip{i}.wav", np.sin(np.arange(8000) * (i + 1) / 50).astype(np.float32) * 0.3, 32000)
    (tmp_path / "labels.csv").write_text("filename,labels\n" + "".join(f"clip{i}.wav,{i % 2}\n" for i in range(6)))
    (tmp_path / "classes.txt").write_text("a\nb\n")
    args = ["--audio_dir", audio, "--csv", tmp_path / "labels.csv", "--output", tmp_path / "out.hdf",
            "--classes", tmp_path / "classes.txt"]
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; import datasets.prepare_hdf5 as p, datasets.hdf5_partial as h\n"
        "h.COMMIT_EVERY = 1; encode = p._encode; calls = []\n"
        "def dying(source):\n"
        "    calls.append(source)\n"
        "    if len(calls) == 4: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return encode(source)\n"
        "p._encode = dying; p.main(sys.argv[1:])"), *map(str, args)], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -9 and not (tmp_path / "out.hdf").exists()
    assert len(list(tmp_path.glob(".out.hdf.efficientat-*.tmp"))) == 1
    with caplog.at_level(logging.WARNING):
        prepare_main([str(a) for a in args])
    assert "continuing the 3 clips an interrupted run wrote" in caplog.text
    assert "wrote 6 clips" in capsys.readouterr().out
    assert Mp3HDF5(tmp_path / "out.hdf").names() == [f"clip{i}.mp3" for i in range(6)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio", "classes.txt", "labels.csv", "out.hdf"]


def test_all_folds_resume_finishes_a_fold_without_best_pt_and_starts_one_never_begun(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_custom(tmp_path / "c", clips_per_class=4, seconds=0.5)
    lines = (data / "labels.csv").read_text().splitlines()
    (data / "labels.csv").write_text("\n".join([lines[0] + ",fold"] + [f"{line},{k % 2 + 1}"
                                                                       for k, line in enumerate(lines[1:])]) + "\n")
    out = tmp_path / "run"
    argv = ["--dataset_dir", data, *SCRATCH, *FAST, "--out_dir", out, "--n_epochs", 1, "--all_folds"]
    assert _cli(ex_custom.main, argv, capsys)[0] == 0
    (out / "fold1" / "best.pt").unlink()  # killed between last.pt and best.pt
    for path in (out / "fold2").iterdir():  # killed before fold 2 committed anything
        path.unlink()
    code, printed, _ = _cli(ex_custom.main, [*argv, "--resume"], capsys)
    assert code == 0 and "accuracy over 2 folds" in printed
    assert read_run_record(out / "fold1" / "best.pt").epoch == read_run_record(out / "fold2" / "best.pt").epoch == 0
