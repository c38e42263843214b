"""The fine-tuning scripts end to end on tiny generated datasets: training runs, checkpoints that
rebuild the model with its class names, metrics equal to scikit-learn's on the same predictions,
and one-line input errors (exit code 2) before any training."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from datasets import custom, esc50, fsd50k, openmic
from common.errors import run_cli
from helpers.training.evaluation import mel
from models.checkpoint import load_finetuned
from models.preprocess import AugmentMelSTFT
from tests.datagen import make_custom, make_dcase20, make_esc50, make_fsd50k, make_openmic

REPO = Path(__file__).resolve().parent.parent
FAST = ["--num_workers", "0", "--logger", "none", "--batch_size", "4", "--warm_up_len", "0"]
SCRATCH = ["--model_name", "mn01_as", "--model_width", "0.1"]  # from scratch, tiny


def run(script: str, args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ex_<script>.main in this process; returns what it printed."""
    importlib.import_module(f"ex_{script}").main([str(a) for a in args])
    return capsys.readouterr().out


def predictions(checkpoint: Path, dataset) -> tuple[np.ndarray, np.ndarray, list[str], bool]:
    """Logits and targets of a saved checkpoint over a dataset, computed here independently."""
    model, frontend_kwargs, class_names, multilabel = load_finetuned(checkpoint)
    frontend = AugmentMelSTFT(**frontend_kwargs).eval()
    items = [dataset[i] for i in range(len(dataset))]
    with torch.no_grad():
        logits = model(mel(frontend, torch.stack([it.waveform for it in items])))[0]
    return logits.numpy(), torch.stack([it.target for it in items]).numpy(), class_names, multilabel


def tag_test_clips(checkpoint: Path, data_dir: Path, tmp_path: Path) -> list[dict]:
    """inference.py --checkpoint's JSON results (top 2) for the custom layout's test clips
    (make_custom(split=True): tone_0 and noise_0)."""
    clips = [data_dir / "clips" / "a" / f"{kind}_0.wav" for kind in ("tone", "noise")]
    tags = tmp_path / "tags.json"
    proc = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(checkpoint),
                           "--audio_path", *map(str, clips), "--top_k", "2", "--output", str(tags)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(tags.read_text())["results"]


def last_logged(out_dir: Path) -> dict:
    return json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_custom_tones_vs_noise_reaches_full_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     mn04_checkpoint: Path) -> None:
    data_dir = make_custom(tmp_path / "mine", clips_per_class=6, split=True)
    out = tmp_path / "run"
    printed = run("custom", ["--dataset_dir", data_dir, "--recipe", "finetune", "--pretrained_name", "mn04_as", "--lr", "3e-3",
                             "--n_epochs", 3, "--clip_length", 1, "--out_dir", out, *FAST], capsys)
    assert "single-label task, 2 classes: noise, tone" in printed
    assert "validation (" in printed and "accuracy 1.0000" in printed.split("validation (")[1].splitlines()[0]
    assert "accuracy 1.0000" in printed.split("test (")[1].splitlines()[0]
    # the checkpoint rebuilds the model with its class names and frontend, without the command line
    data = custom.get_datasets(data_dir, clip_seconds=1)
    logits, targets, class_names, multilabel = predictions(out / "best.pt", data.test)
    assert class_names == ["noise", "tone"] and not multilabel
    assert accuracy_score(targets.argmax(1), logits.argmax(1)) == 1.0
    assert [class_names[k] for k in logits.argmax(1)] == [Path(n).stem.split("_")[0] for n in data.test.names]
    # inference.py --checkpoint tags new files with the checkpoint's own classes (softmax: single-label)
    for result in tag_test_clips(out / "best.pt", data_dir, tmp_path):
        top = result["tags"]
        assert top[0]["label"] == Path(result["file"]).stem.split("_")[0] and top[0]["mid"] == ""
        assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)


def test_custom_multilabel_mean_ap_equals_sklearn(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = make_custom(tmp_path / "multi", clips_per_class=4, multilabel=True)
    out = tmp_path / "run"
    printed = run("custom", ["--dataset_dir", data_dir, *SCRATCH, "--n_epochs", 1, "--clip_length", 1,
                             "--val_fraction", 0.5, "--out_dir", out, *FAST], capsys)
    assert "multi-label task, 2 classes" in printed
    data = custom.get_datasets(data_dir, val_fraction=0.5, seed=42, clip_seconds=1)
    logits, targets, class_names, multilabel = predictions(out / "best.pt", data.val)
    assert multilabel and class_names == ["noise", "tone"]
    expected = np.mean([average_precision_score(targets[:, c], logits[:, c]) for c in range(2)])
    assert last_logged(out)["mAP"] == pytest.approx(expected, abs=1e-6)
    assert f"mAP {expected:.4f}" in printed


def test_esc50_trains_saves_and_evaluates_its_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = make_esc50(tmp_path / "ESC-50")
    out = tmp_path / "run"
    printed = run("esc50", ["--dataset_dir", data_dir, *SCRATCH, "--n_epochs", 2, "--fold", 2,
                            "--out_dir", out, *FAST], capsys)
    fold_dir = out / "fold2"
    assert sorted(p.name for p in fold_dir.glob("*.pt"))[:2] == ["best.pt", "last.pt"]
    assert len(list(fold_dir.glob("mn01_esc50_epoch_1_acc_*.pt"))) == 1  # only the latest epoch kept
    _, test_set, _ = esc50.get_datasets(data_dir, fold=2)
    logits, targets, class_names, multilabel = predictions(fold_dir / "last.pt", test_set)
    assert class_names[:2] == ["tone", "noise"] and len(class_names) == 50 and not multilabel
    accuracy = accuracy_score(targets.argmax(1), logits.argmax(1))
    assert f"fold 2: accuracy {accuracy:.4f}" in printed
    assert last_logged(fold_dir)["accuracy"] == pytest.approx(accuracy)
    evaluated = run("esc50", ["--dataset_dir", data_dir, "--checkpoint", fold_dir / "last.pt", "--fold", 2, *FAST],
                    capsys)
    assert f"fold 2: accuracy {accuracy:.4f}" in evaluated


def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = make_esc50(tmp_path / "ESC-50", seconds=0.5)
    common = ["--dataset_dir", data_dir, *SCRATCH, "--fold", 1, *FAST]
    run("esc50", [*common, "--n_epochs", 2, "--out_dir", tmp_path / "whole"], capsys)
    run("esc50", [*common, "--n_epochs", 1, "--out_dir", tmp_path / "parts"], capsys)
    printed = run("esc50", [*common, "--n_epochs", 2, "--out_dir", tmp_path / "parts", "--resume"], capsys)
    whole = torch.load(tmp_path / "whole" / "fold1" / "last.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "fold1" / "last.pt", weights_only=True)
    assert whole["epoch"] == parts["epoch"] == 1
    assert all(torch.equal(whole["model"][k], parts["model"][k]) for k in whole["model"])
    assert whole["metrics"] == parts["metrics"] and f"accuracy {whole['metrics']['accuracy']:.4f}" in printed


def test_dymn_from_scratch_checkpoint_keeps_its_temperature(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = make_esc50(tmp_path / "ESC-50", seconds=0.5)
    out = tmp_path / "run"
    run("esc50", ["--dataset_dir", data_dir, "--model_name", "dymn04_as", "--model_width", 0.2, "--n_epochs", 2,
                  "--out_dir", out, *FAST], capsys)
    model, _, _, _ = load_finetuned(out / "fold1" / "last.pt")
    assert type(model).__name__ == "DyMN"
    assert {m.temperature for m in model.modules() if hasattr(m, "temperature")} == {29.0}  # T_max 30, epoch 1
    _, test_set, _ = esc50.get_datasets(data_dir, fold=1)
    logits, targets, _, _ = predictions(out / "fold1" / "last.pt", test_set)
    assert last_logged(out / "fold1")["val_loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets))), rel=1e-5)


def test_esc50_all_folds_reports_mean_and_std(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = make_esc50(tmp_path / "ESC-50", clips_per_fold=2, seconds=0.5)
    printed = run("esc50", ["--dataset_dir", data_dir, *SCRATCH, "--n_epochs", 1, "--all_folds",
                            "--no_wavmix", "--mixup_alpha", 0, "--out_dir", tmp_path / "run", *FAST], capsys)
    accs = [float(line.split("accuracy ")[1].split()[0]) for line in printed.splitlines() if line.startswith("fold ")]
    assert len(accs) == 5 and all((tmp_path / "run" / f"fold{k}" / "last.pt").is_file() for k in range(1, 6))
    assert f"accuracy over 5 folds: {np.mean(accs):.4f} +- {np.std(accs, ddof=1):.4f}" in printed


def test_dcase20_reports_per_device_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = make_dcase20(tmp_path / "TAU", seconds=0.5)
    out = tmp_path / "run"
    printed = run("dcase20", ["--dataset_dir", data_dir, *SCRATCH, "--n_epochs", 1, "--mixstyle_p", 1,
                              "--cache_path", tmp_path / "cache", "--out_dir", out, *FAST], capsys)
    logged = last_logged(out)
    assert {"accuracy", "accuracy_a", "accuracy_b", "accuracy_s1", "val_loss"} <= set(logged)
    # each device holds one clip per scene in the evaluation split: overall = mean of the devices
    assert logged["accuracy"] == pytest.approx(np.mean([logged[f"accuracy_{d}"] for d in ("a", "b", "s1")]))
    assert f"  device s1: {logged['accuracy_s1']:.4f}" in printed
    assert len(list((tmp_path / "cache").rglob("*.wav32"))) == 18  # every clip decoded once


def test_fsd50k_selects_on_validation_and_reports_eval_map(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = make_fsd50k(tmp_path / "FSD50K")
    out = tmp_path / "run"
    printed = run("fsd50k", ["--dataset_dir", data_dir, "--train", *SCRATCH, "--n_epochs", 2, "--out_dir", out,
                             *FAST], capsys)
    best = torch.load(out / "best.pt", weights_only=True)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert best["metrics"]["mAP"] == max(h["mAP"] for h in history)
    assert f"Results on FSD50K evaluation split for loaded model: {out / 'best.pt'}" in printed
    _, _, eval_set, _ = fsd50k.get_datasets(data_dir)
    logits, targets, class_names, _ = predictions(out / "best.pt", eval_set)
    positive = targets.any(axis=0)  # classes without positives have no AP and are left out
    expected_map = np.mean([average_precision_score(targets[:, c], logits[:, c]) for c in np.flatnonzero(positive)])
    expected_roc = np.mean([roc_auc_score(targets[:, c], logits[:, c])
                            for c in np.flatnonzero(positive & ~targets.all(axis=0))])
    assert f"  mAP: {expected_map:.3f}\n  ROC: {expected_roc:.3f}" in printed
    assert len(class_names) == 200


def test_openmic_masked_metrics_and_evaluation_without_train(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_dir = make_openmic(tmp_path / "openmic")
    out = tmp_path / "run"
    run("openmic", ["--dataset_dir", data_dir, "--train", *SCRATCH, "--n_epochs", 1, "--out_dir", out, *FAST],
        capsys)
    printed = run("openmic", ["--dataset_dir", data_dir, "--checkpoint", out / "last.pt", *FAST], capsys)
    _, test_set, _ = openmic.get_datasets(data_dir)
    logits, targets, class_names, multilabel = predictions(out / "last.pt", test_set)
    assert multilabel and class_names[:3] == ["accordion", "banjo", "bass"]
    mask = torch.stack([test_set[i].mask for i in range(len(test_set))]).numpy()
    probs, relevance = 1 / (1 + np.exp(-logits)), targets > 0.5
    observed = [c for c in range(20) if (mask[:, c] > 0).any() and relevance[mask[:, c] > 0, c].any()]
    assert {0, 1} <= set(observed) and 2 not in observed  # instrument 2 is never observed
    ap = [average_precision_score(relevance[:, c], probs[:, c], sample_weight=mask[:, c]) for c in observed]
    roc = [roc_auc_score(relevance[:, c], probs[:, c], sample_weight=mask[:, c]) for c in observed
           if not relevance[mask[:, c] > 0, c].all()]
    assert f"  mAP: {np.mean(ap):.3f}\n  ROC: {np.mean(roc):.3f}" in printed
    assert last_logged(out)["mAP"] == pytest.approx(np.mean(ap), abs=1e-6)


@pytest.mark.parametrize("script, layout, problem, message", [
    ("esc50", "esc50", "missing_dir", "no dataset folder given: pass --dataset_dir or set $EFFICIENTAT_ESC50_DIR"),
    ("esc50", "esc50", "wrong_columns", "esc50.csv: missing column(s) target"),
    ("esc50", "esc50", "missing_file", "esc50.csv: lists"),
    ("dcase20", "dcase20", "wrong_columns", "meta.csv: missing column(s) scene_label"),
    ("dcase20", "dcase20", "missing_file", "meta.csv: lists"),
    ("custom", "custom", "wrong_columns", "labels.csv: missing column(s) filename"),
    ("custom", "custom", "missing_file", "labels.csv: lists"),
    ("fsd50k", "fsd50k", "missing_file", "FSD50K.val_mp3.hdf: dataset file not found"),
    ("openmic", "openmic", "missing_dir", "no dataset folder given: pass --dataset_dir or set "
                                          "$EFFICIENTAT_OPENMIC_DIR"),
])
def test_input_errors_are_one_line_before_training(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch, script: str, layout: str,
                                                   problem: str, message: str) -> None:
    makers = {"esc50": (make_esc50, "meta/esc50.csv", "target", "audio_32k"),
              "dcase20": (make_dcase20, "meta.csv", "scene_label", "audio"),
              "custom": (make_custom, "labels.csv", "filename", "clips/a"),
              "fsd50k": (make_fsd50k, None, None, None), "openmic": (make_openmic, None, None, None)}
    make, meta, column, audio = makers[layout]
    root = make(tmp_path / "data", seconds=0.2) if layout != "custom" else make(tmp_path / "data", clips_per_class=2,
                                                                                  seconds=0.2)
    if problem == "wrong_columns":
        (root / meta).write_text((root / meta).read_text().replace(column, "renamed", 1))
    elif problem == "missing_file" and meta:
        next((root / audio).iterdir()).unlink()
    elif problem == "missing_file":
        (root / fsd50k.FILES["val"]).unlink()
    monkeypatch.delenv(f"EFFICIENTAT_{layout.upper()}_DIR", raising=False)

    def train_must_not_start(*args, **kwargs):
        raise AssertionError("training started despite bad input")
    monkeypatch.setattr(f"ex_{script}.fine_tune", train_must_not_start, raising=False)
    importlib.import_module(f"ex_{script}")
    argv = [] if problem == "missing_dir" else ["--dataset_dir", str(root)]
    monkeypatch.setattr(sys, "argv", [f"ex_{script}.py", *argv, *FAST])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(importlib.import_module(f"ex_{script}").main)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_exit_code_two_in_a_fresh_process(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "ex_custom.py", "--dataset_dir", str(tmp_path / "absent")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'absent'}: dataset folder does not exist"
    assert not proc.stdout
