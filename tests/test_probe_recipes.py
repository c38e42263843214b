"""The small-data recipes as the scripts run them, on generated clips with the released mn04_as:
the probe's head is refitted on training + validation clips and never sees the test split, one
clip per class runs, the embedding cache lives outside the working directory and is reused,
cleared and reported, `auto`'s choice, probe_finetune keeps the best epoch, a probe checkpoint tags
through inference.py, and an inner-layer probe checkpoint is refused there with one line."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common.errors import InputError
from helpers.training import recipes
from helpers.training.recipes import AUTO_FINETUNE_FROM, choose_recipe
from models.checkpoint import load_checkpoint
from tests.datagen import make_custom, make_esc50, make_fsd50k
from tests.test_finetune_scripts import FAST, REPO, run, tag_test_clips


def test_auto_picks_the_probe_below_50_clips_per_class_and_never_probe_finetune() -> None:
    def targets(*counts: int) -> np.ndarray:
        return np.eye(len(counts))[np.repeat(np.arange(len(counts)), counts)]
    for counts in ((1, 1), (3, 9, 40), (20, 30, 49), (2, 40, 100)):
        assert choose_recipe(targets(*counts))[0] == "probe"
    assert choose_recipe(targets(AUTO_FINETUNE_FROM, AUTO_FINETUNE_FROM))[0] == "finetune"
    assert choose_recipe(targets(3, 3), pretrained=False)[0] == "finetune"
    multilabel = np.array([[1, 1], [1, 0], [1, 0]])  # counts per label: 3 and 1
    recipe, reason = choose_recipe(multilabel)
    assert recipe == "probe" and "median 2 labelled training clips per class (min 1, max 3)" in reason


def test_refit_uses_validation_clips_never_test_and_tags_through_inference(
        tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, mn04_checkpoint: Path) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EFFICIENTAT_CACHE", str(tmp_path / "user_cache"))
    fits = []
    original = recipes.fit_probe

    def spy(features, targets, *args, **kwargs):
        fits.append((len(features), kwargs.get("c")))
        return original(features, targets, *args, **kwargs)

    monkeypatch.setattr(recipes, "fit_probe", spy)
    data_dir = make_custom(tmp_path / "mine", clips_per_class=6, split=True)  # train 4, val 1, test 1 per class
    out = tmp_path / "run"
    args = ["--dataset_dir", data_dir, "--pretrained_name", "mn04_as", "--clip_length", 1, "--out_dir", out, *FAST]
    printed = run("custom", args, capsys)  # auto, default cache folder
    assert "recipe probe: median 4 labelled training clips per class" in caplog.text
    probe = load_checkpoint(out / "best.pt")["probe"]
    # CV on the 8 training clips, whole and in 3 crops of half a clip (auto); refit on 8 + 2 validation
    assert fits == [(8, None), (8, None), (10, probe["C"])] and probe["window"] == 32000 and probe["crops"] == 1
    assert probe["fit_clips"] == 10 and probe["refit"] and probe["n_folds"] == 4 and probe["features"] == "concat"
    assert "validation (" in printed and "head fitted on the training clips" in printed
    assert "accuracy 1.0000" in printed.split("test (")[1].splitlines()[0]
    summary = printed.strip().splitlines()[-1]
    assert summary.startswith("recipe probe, concat features, whole clips chosen by CV over 3 crops of 0.5 s (CV log")
    assert "4-fold CV (CV accuracy" in summary
    assert "fitted on 10 clips (training + validation)" in summary and "auto" in summary
    def cached() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "user_cache" / "embeddings").glob("*/*.npz")}

    # train clips whole and cropped + val clips by the pretrained model, test clips by the model holding the probe
    first = cached()
    assert len(first) == 20 and not (tmp_path / "runs").exists()  # outside the working directory
    run("custom", [*args, "--recipe", "probe", "--probe_features", "embedding", "--probe_window", "clip",
                   "--overwrite"], capsys)
    assert "0 clips embedded, 10 read back" in caplog.text  # other head settings: all read back
    assert "whole clips (--probe_window clip)" in caplog.text
    assert all(cached()[p] == t for p, t in first.items())
    for result in tag_test_clips(out / "best.pt", data_dir, tmp_path):  # inference.py --checkpoint, linear head
        assert result["tags"][0]["label"] == Path(result["file"]).stem.split("_")[0]
    caplog.clear()
    files = len(cached())
    run("custom", [*args, "--overwrite", "--clear_cache"], capsys)
    assert f"cleared {files} files" in caplog.text and "18 clips embedded, 0 read back" in caplog.text


def test_one_clip_per_class_and_an_inner_layer_probe(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     caplog: pytest.LogCaptureFixture, mn04_checkpoint: Path) -> None:
    caplog.set_level(logging.INFO)
    data_dir = make_custom(tmp_path / "mine", clips_per_class=3, split=True)  # 1 train, 1 val, 1 test per class
    out = tmp_path / "run"
    printed = run("custom", ["--dataset_dir", data_dir, "--pretrained_name", "mn04_as", "--clip_length", 1,
                             "--out_dir", out, "--embedding_cache", "", "--probe_features", "layer:-2", *FAST], capsys)
    assert "C 1 fixed (some class has one clip: no cross-validation)" in caplog.text
    assert "layer:-2 features, whole clips (no CV to choose crops by), C 1 fixed" in printed and "test (" in printed
    proc = subprocess.run([sys.executable, "inference.py", "--checkpoint", str(out / "best.pt"), "--audio_path",
                           str(data_dir / "clips")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "reads features of an inner layer" in proc.stderr


def test_custom_multilabel_probe_finetune(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          caplog: pytest.LogCaptureFixture, mn04_checkpoint: Path) -> None:
    caplog.set_level(logging.INFO)
    data_dir = make_custom(tmp_path / "multi", clips_per_class=4, multilabel=True)
    printed = run("custom", ["--dataset_dir", data_dir, "--pretrained_name", "mn04_as", "--clip_length", 1,
                             "--recipe", "probe_finetune", "--probe_epochs", 1, "--val_fraction", 0.5,
                             "--out_dir", tmp_path / "run", "--embedding_cache", "", *FAST], capsys)
    assert "multi-label task, 2 classes" in printed and "recipe probe_finetune: as asked" in caplog.text
    assert "mAP 1.0000" in printed
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [-1, 0]
    assert not load_checkpoint(tmp_path / "run" / "best.pt")["probe"]["refit"]  # validation stops it early


def test_esc50_probe_recipe_and_its_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               mn04_checkpoint: Path) -> None:
    data_dir = make_esc50(tmp_path / "ESC-50")
    common = ["--dataset_dir", data_dir, "--fold", 2, "--embedding_cache", "", *FAST]
    printed = run("esc50", ["--pretrained_name", "mn04_as", "--recipe", "probe", "--out_dir", tmp_path / "run",
                            *common], capsys)
    assert "fold 2: accuracy 1.0000" in printed and "recipe probe, concat features" in printed
    assert not load_checkpoint(tmp_path / "run" / "fold2" / "best.pt")["probe"]["refit"]  # its val is the test fold
    evaluated = run("esc50", ["--checkpoint", tmp_path / "run" / "fold2" / "best.pt", *common], capsys)
    assert "fold 2: accuracy 1.0000" in evaluated


def test_probe_recipes_need_audio_files_and_pretrained_weights(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fsd = make_fsd50k(tmp_path / "FSD50K")
    with pytest.raises(InputError, match="supports --recipe finetune only"):
        run("fsd50k", ["--dataset_dir", fsd, "--train", "--pretrained_name", "mn04_as", "--recipe", "probe", *FAST],
            capsys)
    custom_dir = make_custom(tmp_path / "mine", clips_per_class=3)
    with pytest.raises(InputError, match="starts from released weights"):
        run("custom", ["--dataset_dir", custom_dir, "--model_name", "mn01_as", "--recipe", "probe", *FAST], capsys)
    with pytest.raises(SystemExit):
        run("custom", ["--dataset_dir", custom_dir, "--probe_features", "pooled", *FAST], capsys)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InputError, match="--embedding_cache is a file"):
        run("custom", ["--dataset_dir", custom_dir, "--pretrained_name", "mn04_as", "--recipe", "probe",
                       "--embedding_cache", tmp_path / "a_file", "--clear_cache", "--out_dir", tmp_path / "r", *FAST], capsys)
