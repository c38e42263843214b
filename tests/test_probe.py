"""The small-data recipes on generated data: the probe separates separable classes (single- and
multi-label), the fitted head becomes the model's final Linear exactly, the embedding cache is
reused and invalidated, layer-wise learning rates, probe-then-fine-tune keeps the best epoch,
`auto` picks as documented, and ex_custom.py's probe checkpoint tags through inference.py."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from datasets.files import AudioFileDataset
from common.errors import InputError
from helpers.training.distributed import setup_distributed
from helpers.training.precision import Precision
from helpers.training.probe import (AUTO_FINETUNE_FROM, AUTO_PROBE_BELOW, Embedder, FinetuneSchedule, choose_recipe,
                           crop_starts, file_clips, final_linear, fit_probe, layerwise_param_groups,
                           probe_finetune, set_classifier, stratified_folds)
from helpers.training.tasks import Task, classification_metrics, single_label_loss
from models.factory import model_config, model_from_config
from models.preprocess import AugmentMelSTFT
from tests.datagen import clip, make_custom, make_esc50, make_fsd50k
from tests.test_finetune_scripts import FAST, run, tag_test_clips

SR = 16000
TINY = model_config("mn01", num_classes=2, width_mult=0.1)  # from scratch, no download


def separable(n_per_class: int, n_classes: int, dim: int = 16, draw: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-clip features (2 crops each) of Gaussian blobs around well separated centres (the same
    for every `draw`), one-hot targets."""
    centres = np.random.default_rng(0).normal(0, 5, (n_classes, dim))
    rng = np.random.default_rng(draw + 1)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = [(centres[k] + rng.normal(0, 0.5, (2, dim))).astype(np.float32) for k in labels]
    return features, np.eye(n_classes, dtype=np.float32)[labels]


def test_probe_separates_linearly_separable_classes() -> None:
    train, y_train = separable(5, 4)
    test, y_test = separable(5, 4, draw=1)
    probe = fit_probe(train, y_train, multilabel=False, cs=(0.01, 1.0, 100.0))
    probs = probe.predict(test)
    assert (probs.argmax(1) == y_test.argmax(1)).all()
    assert np.allclose(probs.sum(1), 1.0) and set(probe.cv_loss) == {0.01, 1.0, 100.0}
    assert probe.C == min(probe.cv_loss, key=probe.cv_loss.get)


def test_probe_multilabel_one_vs_rest() -> None:
    features, onehot = separable(6, 3)
    targets = onehot.copy()
    targets[:, 2] = np.maximum(targets[:, 2], targets[:, 1])  # class 2 whenever class 1: two labels
    targets = np.concatenate([targets, np.zeros((len(targets), 1), np.float32)], 1)  # a class never seen
    probe = fit_probe(features, targets, multilabel=True, cs=(0.1, 10.0))
    probs = probe.predict(features)
    assert ((probs > 0.5) == (targets > 0.5)).all()
    assert probs[:, 3].max() < 0.2


def test_binary_single_label_and_folds() -> None:
    features, targets = separable(4, 2)
    probe = fit_probe(features, targets, multilabel=False, cs=(1.0,))
    assert probe.weight.shape == (2, 16) and (probe.predict(features).argmax(1) == targets.argmax(1)).all()
    folds = stratified_folds(np.eye(3)[[0, 0, 0, 1, 1, 2]], 3, seed=0)
    assert sorted(np.bincount(folds)) == [2, 2, 2]


def test_crop_starts() -> None:
    assert crop_starts(100, 200, 5) == [0]
    assert crop_starts(300, 100, 3) == [0, 100, 200]
    assert crop_starts(300, 100, 1) == [0]


def write_clips(folder: Path, n: int, seconds: float = 1.0) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"clip{i}.wav")
        sf.write(paths[-1], clip(i % 2, seconds, SR, rng), SR)
    return paths


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return model_from_config(TINY).eval()


def dataset(paths: list[Path]) -> AudioFileDataset:
    targets = np.eye(2, dtype=np.float32)[[i % 2 for i in range(len(paths))]]
    return AudioFileDataset(paths, targets, [p.name for p in paths], SR, SR)


def frontend(**overrides) -> AugmentMelSTFT:
    return AugmentMelSTFT(**{"sr": SR, "n_mels": 64, **overrides})


def test_embedding_cache_reused_and_invalidated(tmp_path: Path) -> None:
    paths = write_clips(tmp_path / "clips", 4)
    cache = tmp_path / "cache"
    first = Embedder(tiny_model(), frontend(), SR, cache_dir=cache)
    features = first(file_clips(dataset(paths)))
    assert first.computed == 4 and first.reused == 0 and features[0].shape == (1, final_linear(first.model)[1].in_features)
    again = Embedder(tiny_model(), frontend(), SR, cache_dir=cache)  # a new run: same model and settings
    assert all(np.array_equal(a, b) for a, b in zip(again(file_clips(dataset(paths))), features))
    assert again.computed == 0 and again.reused == 4
    # an edited clip is embedded again, the others are read back
    sf.write(paths[1], 0.5 * sf.read(paths[1])[0], SR)
    os.utime(paths[1], ns=(0, 123456789))
    edited = Embedder(tiny_model(), frontend(), SR, cache_dir=cache)
    edited(file_clips(dataset(paths)))
    assert (edited.computed, edited.reused) == (1, 3)
    # other preprocessing or window, or another backbone, makes a new cache folder
    for other in (Embedder(tiny_model(), frontend(hopsize=160), SR, cache_dir=cache),
                  Embedder(tiny_model(), frontend(), SR // 2, n_crops=2, cache_dir=cache)):
        other(file_clips(dataset(paths)))
        assert (other.computed, other.reused) == (4, 0)
    retrained = tiny_model()
    with torch.no_grad():
        retrained.features[0][0].weight.mul_(2)
    assert Embedder(retrained, frontend(), SR, cache_dir=cache).cache_dir != first.cache_dir
    head_only = tiny_model()
    with torch.no_grad():
        final_linear(head_only)[1].weight.zero_()
    assert Embedder(head_only, frontend(), SR, cache_dir=cache).cache_dir == first.cache_dir


def test_fitted_probe_is_the_models_final_linear(tmp_path: Path) -> None:
    paths = write_clips(tmp_path / "clips", 6, seconds=2.0)
    model = tiny_model()
    embedder = Embedder(model, frontend(), SR, n_crops=2)
    features = embedder(file_clips(dataset(paths)))
    assert all(f.shape[0] == 2 for f in features)  # 2-s clips, 1-s window: two crops
    probe = fit_probe(features, dataset(paths).targets.numpy(), multilabel=False, cs=(1.0,))
    set_classifier(model, probe)
    wave = torch.from_numpy(sf.read(paths[0], dtype="float32")[0][:SR])
    with torch.no_grad():
        logits = model.eval()(frontend().eval()(wave[None]).unsqueeze(1))[0]
    assert torch.allclose(logits[0], torch.from_numpy(probe.logits(features[0][0])), atol=1e-4)


def test_layerwise_param_groups_cover_every_parameter_once() -> None:
    model = tiny_model()
    groups = layerwise_param_groups(model, lr=1e-3, decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[0]["lr"] == 1e-3 and groups[0]["params"][0] is final_linear(model)[1].weight
    assert [g["lr"] for g in groups] == sorted((g["lr"] for g in groups), reverse=True)


def test_probe_finetune_keeps_the_best_epoch(tmp_path: Path) -> None:
    paths = write_clips(tmp_path / "clips", 8)
    model = tiny_model()
    data = dataset(paths)
    set_classifier(model, fit_probe(Embedder(model, frontend(), SR)(file_clips(data)), data.targets.numpy(),
                                    multilabel=False, cs=(1.0,)))
    task = Task("t", ["noise", "tone"], False, single_label_loss(0.0), classification_metrics, "accuracy", "acc", "p")
    best_epoch, history = probe_finetune(model, frontend(), data, file_clips(data), data.targets, task,
                                         FinetuneSchedule(epochs=2, batch_size=4), SR, 1, setup_distributed(False),
                                         Precision(None, torch.device("cpu")))
    assert [h["epoch"] for h in history] == [-1, 0, 1]
    best = max(history, key=lambda h: (h["accuracy"], -h["val_loss"]))
    assert best["epoch"] == best_epoch


def test_probe_needs_a_linear_head() -> None:
    with pytest.raises(InputError, match="Linear"):
        final_linear(model_from_config(model_config("mn01", 2, width_mult=0.1, head_type="fully_convolutional")))


def test_auto_picks_by_median_clips_per_class() -> None:
    def targets(*counts: int) -> np.ndarray:
        return np.eye(len(counts))[np.repeat(np.arange(len(counts)), counts)]
    assert choose_recipe(targets(3, 9, 40))[0] == "probe"  # median 9
    assert choose_recipe(targets(2, AUTO_PROBE_BELOW, 100))[0] == "probe_finetune"
    assert choose_recipe(targets(AUTO_FINETUNE_FROM, AUTO_FINETUNE_FROM))[0] == "finetune"
    assert choose_recipe(targets(3, 3), pretrained=False)[0] == "finetune"
    multilabel = np.array([[1, 1], [1, 0], [1, 0]])  # counts per label: 3 and 1
    recipe, reason = choose_recipe(multilabel)
    assert recipe == "probe" and "median 2 labelled training clips per class (min 1, max 3)" in reason


def test_custom_probe_checkpoint_tags_through_inference(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        caplog: pytest.LogCaptureFixture, mn04_checkpoint: Path) -> None:
    caplog.set_level(logging.INFO)
    data_dir = make_custom(tmp_path / "mine", clips_per_class=6, split=True)
    out, cache = tmp_path / "run", tmp_path / "embeddings"
    args = ["--dataset_dir", data_dir, "--pretrained_name", "mn04_as", "--clip_length", 1, "--out_dir", out,
            "--embedding_cache", cache, *FAST]
    printed = run("custom", args, capsys)  # auto: 4 training clips per class
    assert "recipe probe: median 4 labelled training clips per class" in caplog.text
    assert "accuracy 1.0000" in printed.split("test (")[1].splitlines()[0]
    cached = {p: p.stat().st_mtime_ns for p in cache.glob("*/*.npz")}
    assert len(cached) == 12  # train, val and test clips, embedded once
    run("custom", [*args, "--recipe", "probe", "--probe_folds", 2, "--overwrite"], capsys)  # other head settings
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/*.npz")} == cached  # all read back
    for result in tag_test_clips(out / "best.pt", data_dir, tmp_path):  # inference.py --checkpoint
        assert result["tags"][0]["label"] == Path(result["file"]).stem.split("_")[0]


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


def test_esc50_probe_recipe_and_its_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               mn04_checkpoint: Path) -> None:
    data_dir = make_esc50(tmp_path / "ESC-50")
    common = ["--dataset_dir", data_dir, "--fold", 2, "--embedding_cache", "", *FAST]
    printed = run("esc50", ["--pretrained_name", "mn04_as", "--recipe", "probe", "--out_dir", tmp_path / "run",
                            *common], capsys)
    assert "fold 2: accuracy 1.0000" in printed
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
