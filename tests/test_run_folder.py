"""Training scripts: bad flags are one line (exit 2) before any work; a run folder holding a run is
never overwritten unless asked; a resumed run keeps its model, classes and optimizer settings."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import ex_audioset
import ex_custom
import ex_esc50
from common.errors import InputError, run_cli
from common.files import LOCK_NAME, unlock_folder
from helpers.training.checkpoints import check_resumable, prepare_run_folder
from models.checkpoint import RunRecord
from tests.datagen import make_esc50


def _run(main: Callable, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """(exit status, stderr) of a script's main through the CLI guard, in this process."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(argv))
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("main, flags, message", [
    (ex_esc50.main, ["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (ex_esc50.main, ["--lr=-1e-4"], "--lr must be a positive number, got -0.0001"),
    (ex_esc50.main, ["--lr", "nan"], "--lr must be a positive number, got nan"),
    (ex_esc50.main, ["--num_workers", "-1"], "--num_workers must be a number >= 0, got -1"),
    (ex_esc50.main, ["--n_epochs", "0"], "--n_epochs must be at least 1, got 0"),
    (ex_custom.main, ["--clip_length", "0"], "--clip_length must be a positive number, got 0.0"),
    (ex_audioset.main, ["--max_lr", "-1"], "--max_lr must be a positive number, got -1.0"),
    (ex_esc50.main, ["--resume", "--overwrite"],
     "--resume continues a run and --overwrite starts it over: give one of them"),
])
def test_bad_flags_are_one_line_before_any_work(main, flags, message, tmp_path, capsys) -> None:
    code, err = _run(main, ["--dataset_dir", str(tmp_path / "nowhere"), *flags], capsys)
    assert code == 2 and err == f"error: {message}\n"


@pytest.fixture(scope="module")
def esc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_esc50(tmp_path_factory.mktemp("esc") / "ESC-50", clips_per_fold=1, seconds=0.2)


def test_rerun_into_a_run_folder_stops_and_names_the_ways_on(esc_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    fold = out / "fold1"
    fold.mkdir(parents=True)
    (fold / "best.pt").write_bytes(b"earlier run")
    (fold / "metrics.jsonl").write_text('{"epoch": 0}\n')
    code, err = _run(ex_esc50.main, ["--dataset_dir", str(esc_dir), "--out_dir", str(out), "--model_name", "mn01",
                                     "--model_width", "0.1", "--logger", "none", "--num_workers", "0"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{fold} already holds a run (best.pt, metrics.jsonl): continue it with --resume" in err
    assert "--overwrite" in err and (fold / "best.pt").read_bytes() == b"earlier run"


@pytest.mark.parametrize("flags, message", [
    (["--pretrained_name", "mn04_as", "--head_type", "fully_convolutional"],
     "error: checkpoint 'mn04_as' needs head_type='mlp'"),
    (["--pretrained_name", "mn04_ass"], "error: unknown model name 'mn04_ass'; did you mean mn04_as"),
])
def test_model_conflicts_and_unknown_names_are_one_line(flags, message, esc_dir, tmp_path, capsys) -> None:
    code, err = _run(ex_esc50.main, ["--dataset_dir", str(esc_dir), "--out_dir", str(tmp_path / "r"), *flags,
                                     "--logger", "none", "--num_workers", "0"], capsys)
    assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1


def test_overwrite_deletes_only_the_earlier_runs_files_and_our_stale_temporaries(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    ours_stale, ours_live = f".last.pt.efficientat-{dead}.tmp", ".best.pt.efficientat-1.tmp"  # pid 1 lives
    foreign = ("mn10_esc50_epoch_3_acc_500.pt", ".notes.tmp", ".last.pt.x1y2.tmp", "notes.txt")
    for name in ("last.pt", "best.pt", "metrics.jsonl", ours_stale, ours_live, *foreign):
        (out / name).write_text("x")
    prepare_run_folder(out, resume="auto", overwrite=False, is_main=True)  # resuming: only the temporary goes
    assert not (out / ours_stale).exists() and (out / "last.pt").exists() and (out / ours_live).exists()
    prepare_run_folder(out, resume=None, overwrite=True, is_main=True)
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, ours_live, *foreign])
    unlock_folder(out)
    prepare_run_folder(tmp_path / "new", resume=None, overwrite=False, is_main=True)  # nothing to check
    unlock_folder(tmp_path / "new")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="--out_dir lies under .*file, which is a file"):
        prepare_run_folder(tmp_path / "file" / "run", resume=None, overwrite=False, is_main=True)


def test_resume_refuses_other_model_classes_or_optimizer_settings(tmp_path: Path) -> None:
    model = {"family": "mn", "width_mult": 0.4, "num_classes": 2}
    state = RunRecord({}, model, {}, ["a", "b"], config={"lr": 0.001, "n_epochs": 10})
    path = tmp_path / "last.pt"
    check_resumable(state, path, {"lr": 0.001, "n_epochs": 20}, model, ["a", "b"])  # more epochs: fine
    with pytest.raises(InputError, match=r"last.pt: the run was trained with --lr 0.001 \(now 0.002\)"):
        check_resumable(state, path, {"lr": 0.002, "n_epochs": 10}, model, ["a", "b"])
    with pytest.raises(InputError, match=r"needs the run's model, which had width_mult 0.4 \(now 1.0\)"):
        check_resumable(state, path, {"lr": 0.001}, {**model, "width_mult": 1.0}, ["a", "b"])
    with pytest.raises(InputError, match=r"needs the run's classes; not c$"):
        check_resumable(state, path, {"lr": 0.001}, model, ["a", "b", "c"])
    with pytest.raises(InputError, match=r"needs the run's classes; it had a, b; not A, B$"):  # renamed
        check_resumable(state, path, {"lr": 0.001}, {**model}, ["A", "B"])
    with pytest.raises(InputError, match=r"the 2 classes are the same but in another order"):
        check_resumable(state, path, {"lr": 0.001}, model, ["b", "a"])
    for flag, value in (("clip_length", 5.0), ("mixup_alpha", 0.0), ("batch_size", 8)):  # data and steps change
        state.config[flag] = {"clip_length": 10.0, "mixup_alpha": 0.3, "batch_size": 16}[flag]
        with pytest.raises(InputError, match=rf"trained with --{flag} .* \(now {value}\)"):
            check_resumable(state, path, {"lr": 0.001, flag: value}, model, ["a", "b"])


def test_check_args_ignores_flags_a_script_lacks() -> None:
    from helpers.training.args import check_args
    check_args({"batch_size": 4, "lr": 0.1})


def test_dcase_evaluation_leaves_out_an_unusable_clip(tmp_path, capsys, caplog) -> None:
    """An unreadable evaluation clip is left out of the accuracy and of the per-device figures."""
    import torch

    import ex_dcase20
    from models.checkpoint import save_checkpoint
    from models.factory import model_config, model_from_config
    from tests.datagen import make_dcase20
    root = make_dcase20(tmp_path / "tau", clips_per_device=1, seconds=0.2)
    test_rows = (root / "evaluation_setup" / "fold1_evaluate.csv").read_text().splitlines()[1:]
    (root / test_rows[0].split("\t")[0]).write_bytes(b"not audio " * 50)
    config = model_config("mn01", 2, False, 0.1, None, None, se_dims="c")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ft.pt", {"model": model_from_config(config).state_dict(), "model_config": config,
                                         "frontend_config": {}, "class_names": ["airport", "park"],
                                         "multilabel": False})
    code = run_cli(lambda: ex_dcase20.main(["--dataset_dir", str(root), "--checkpoint", str(tmp_path / "ft.pt"),
                                            "--num_workers", "0", "--batch_size", "2"]))
    out = capsys.readouterr().out.splitlines()
    assert code in (0, None) and out[0].startswith("accuracy ")
    assert [line.split(":")[0].strip() for line in out[1:]] == ["device a", "device b", "device s1"]
    assert "not a readable audio file" in caplog.text and "left out of the evaluation" in caplog.text
