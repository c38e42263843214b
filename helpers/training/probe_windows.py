"""How the probe cuts clips (`--probe_window`): whole clips, fixed windows, or, by default (`auto`),
whichever of whole clips and crops (windows of half the clip length, `--probe_crops` of them per
clip longer than that, each a training row, predictions averaged at test time) cross-validates
better on the training clips.

The choice compares the clip-level cross-validated log loss of the two probes, each at its own
best C (`linear_probe.fit_probe`); crops must be better by more than `TIE_TOLERANCE` (relative)
and by more than `MIN_GAIN` nats per clip (separable data cross-validates at losses near 0, whose
ratios mean nothing), else whole clips win (the simpler setting, one embedding per clip). Crops are not tried where the
probe cannot cross-validate (a class with one training clip) or where no training clip is longer
than the half window.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.errors import InputError
from helpers.training.linear_probe import TIE_TOLERANCE, LinearProbe

WINDOW_MODES = ("auto", "clip")
MIN_GAIN = 1e-3  # nats per clip of CV log loss the crops must gain over whole clips


def check_probe_window(value: str) -> str:
    """`value` if it is `auto`, `clip` or a positive number of seconds, else InputError."""
    if value in WINDOW_MODES:
        return value
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise InputError(f"--probe_window {value!r}: give auto, clip or a positive number of seconds")
    return value


@dataclass(frozen=True)
class WindowSetting:
    """Samples per window and windows per clip longer than it; `whole`: the window is the clip
    length (one window: the clip whole)."""
    window: int
    crops: int
    whole: bool = False

    def describe(self, sample_rate: int) -> str:
        if self.whole:
            return "whole clips"
        return f"{self.crops} crop{'s' if self.crops > 1 else ''} of {self.window / sample_rate:g} s"


def candidate_settings(mode: str, clip: int, crops: int, sample_rate: int) -> list[WindowSetting]:
    """The settings `--probe_window mode` lets the probe try, whole clips (of up to `clip`
    samples) first: `clip` one, a number of seconds one (fixed windows), `auto` whole clips and
    `crops` windows of half the clip length (none when `crops` < 2)."""
    if mode == "clip":
        return [WindowSetting(clip, 1, whole=True)]
    if mode != "auto":
        return [WindowSetting(int(round(float(mode) * sample_rate)), crops)]
    return [WindowSetting(clip, 1, whole=True)] + ([WindowSetting(clip // 2, crops)] if crops >= 2 else [])


def crops_apply(setting: WindowSetting, lengths: list[int]) -> bool:
    """Whether any clip (trimmed length in samples) is longer than the window: else the setting's
    features are those of whole clips."""
    return setting.crops > 1 and max(lengths, default=0) > setting.window


def better_by_cv(whole: LinearProbe, crops: LinearProbe) -> bool:
    """Whether the crops' probe cross-validates better than the whole-clip one: a lower CV log loss
    (each at its chosen C) by more than the tie tolerance and MIN_GAIN. False where either made no CV."""
    if not (whole.n_folds and crops.n_folds):
        return False
    best_whole, best_crops = whole.cv_loss[whole.C], crops.cv_loss[crops.C]
    return best_crops < best_whole - max(TIE_TOLERANCE * abs(best_whole), MIN_GAIN)
