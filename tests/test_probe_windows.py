"""The probe's window setting (`--probe_window`): the candidates of each mode, crops only for clips
longer than the window, and `auto`'s choice by cross-validation on the training clips (crops where
they cross-validate better, whole clips where they do not, where no clip is long enough or where
no CV is possible), on generated features behind a stand-in embedder."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from common.errors import InputError
from helpers.training import recipes
from helpers.training.config import RecipeConfig
from helpers.training.linear_probe import fit_probe
from helpers.training.probe_windows import (WindowSetting, better_by_cv, candidate_settings, check_probe_window,
                                            crops_apply)
from tests.test_probe import SR, dataset, write_clips


def test_candidates_of_each_mode() -> None:
    assert candidate_settings("auto", 4 * SR, 3, SR) == [WindowSetting(4 * SR, 1, True), WindowSetting(2 * SR, 3)]
    assert candidate_settings("auto", 4 * SR, 1, SR) == [WindowSetting(4 * SR, 1, True)]  # no crops to try
    assert candidate_settings("clip", 4 * SR, 3, SR) == [WindowSetting(4 * SR, 1, True)]
    assert candidate_settings("1.5", 4 * SR, 5, SR) == [WindowSetting(24000, 5)]
    assert WindowSetting(2 * SR, 3).describe(SR) == "3 crops of 2 s"
    assert WindowSetting(4 * SR, 1, True).describe(SR) == "whole clips"
    assert check_probe_window("2.5") == "2.5" and check_probe_window("auto") == "auto"
    for bad in ("0", "-1", "half"):
        with pytest.raises(InputError, match="--probe_window"):
            check_probe_window(bad)


def test_crops_only_for_clips_longer_than_the_window() -> None:
    half = WindowSetting(SR, 3)
    assert not crops_apply(half, [SR, SR // 2])  # no clip longer than the window: the crops are whole clips
    assert crops_apply(half, [SR // 2, SR + 1])
    assert not crops_apply(WindowSetting(SR, 1), [4 * SR])


def blobs(n_per_class: int, noise: float, crops: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-clip (crops, 8) features around two class centres, with `noise`."""
    centres = np.random.default_rng(0).normal(0, 1, (2, 8))
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n_per_class)
    return [centres[k] + rng.normal(0, noise, (crops, 8)) for k in labels], np.eye(2)[labels]


def test_better_by_cv_needs_a_lower_loss_beyond_the_tie() -> None:
    features, targets = blobs(6, 1.5, 1, seed=1)
    whole = fit_probe(features, targets, False)
    assert not better_by_cv(whole, whole)  # tied: whole clips
    # averaged over three less noisy crops per clip: a clearly lower CV loss
    crops = fit_probe(blobs(6, 0.3, 3, seed=1)[0], targets, False)
    assert better_by_cv(whole, crops) and not better_by_cv(crops, whole)
    fixed = fit_probe(features, targets, False, c=1.0)  # no CV made: never crops
    assert not better_by_cv(fixed, crops) and not better_by_cv(whole, fixed)


class StubEmbedder:
    """Stands in for `Embedder`: the given per-clip features of its setting, every clip `length`
    samples long after trimming."""

    def __init__(self, setting: WindowSetting, features: list[np.ndarray], length: int) -> None:
        self.window, self.n_crops, self.features = setting.window, setting.crops, features
        self.lengths = {str(i): length for i in range(len(features))}

    def __call__(self, clips, kind: str) -> list[np.ndarray]:
        return self.features[:len(clips)]


def choose(tmp_path: Path, n_clips: int, whole_noise: float, crop_noise: float,
           length: int = SR) -> tuple[str, np.ndarray, list[WindowSetting]]:
    """`_train_probe` with --probe_window auto on `n_clips` 1-s clips (two classes alternating):
    (how the window was chosen, the chosen features' first clip, the settings embedded)."""
    train = dataset(write_clips(tmp_path / "clips", n_clips))
    labels = train.targets.numpy().argmax(1)
    centres = np.random.default_rng(0).normal(0, 1, (2, 8))
    made: list[WindowSetting] = []

    def make_embedder(setting: WindowSetting) -> StubEmbedder:
        made.append(setting)
        rng = np.random.default_rng(1)
        noise = whole_noise if setting.crops == 1 else crop_noise
        return StubEmbedder(setting, [centres[k] + rng.normal(0, noise, (setting.crops, 8)) for k in labels], length)

    task = SimpleNamespace(multilabel=False)
    _, features, _, windows, _ = recipes._train_probe(RecipeConfig(), 0, task, train, make_embedder)
    return windows, features[0], made


def test_auto_chooses_crops_where_they_cross_validate_better(tmp_path: Path) -> None:
    windows, features, made = choose(tmp_path, 12, whole_noise=1.5, crop_noise=0.3)
    assert windows.startswith("3 crops of 0.5 s chosen by CV (CV log loss") and features.shape == (3, 8)
    assert made == [WindowSetting(SR, 1, True), WindowSetting(SR // 2, 3)]


def test_auto_keeps_whole_clips_where_crops_do_not_help(tmp_path: Path) -> None:
    windows, features, _ = choose(tmp_path, 12, whole_noise=0.3, crop_noise=1.5)
    assert windows.startswith("whole clips chosen by CV over 3 crops of 0.5 s") and features.shape == (1, 8)


@pytest.mark.parametrize("n_clips, length, expected", [
    (12, SR // 2, "whole clips (no clip longer than 3 crops of 0.5 s)"),  # clips no longer than the window
    (3, SR, "whole clips (no CV to choose crops by)"),  # one clip of class 1: no CV
])
def test_auto_never_embeds_crops_it_cannot_use(tmp_path: Path, n_clips: int, length: int, expected: str) -> None:
    windows, features, made = choose(tmp_path, n_clips, whole_noise=1.5, crop_noise=0.3, length=length)
    assert windows == expected and made == [WindowSetting(SR, 1, True)] and features.shape == (1, 8)
