"""Probe variants on the UrbanSound8K subset, from features exported once: which features, window
settings and pooled statistics the default `probe` recipe could use, and whether cross-validation
on the training clips can choose among them.

Split and fit as `bench_small_data.py`'s `probe` row (its `write_fold_csv`): the probe is fitted
on the training clips as `linear_probe.fit_probe` fits it (C by CV where every class has two
training clips, else C = 1; on this subset always C = 1), refitted with that C on training +
validation clips, and scored on the test half. Features per window: the recipe's stored arrays
(`clip_features.Embedder`) plus two max statistics of the last feature map (`tmax`: the time
maximum of its frequency mean; `gmax`: its global maximum), for whole clips (4 s) and for
crops (3 or 5 windows of 2 s, 3 of 3 s; test-time average). A variant is features joined by `+`.

`--relaxed_cv` also reports the choice between whole clips and 3 crops of 2 s by a CV that keeps
the clips of one-clip classes in training in every fold (the recipe's CV needs two clips in
every class, which this subset's training halves never have), for several CV seeds, and the
validation log loss of both (probe fitted on the training clips): choices made on labelled
training data only, never on the test half.

    python benchmarks/bench_probe_variants.py
    python benchmarks/bench_probe_variants.py --variants concat,concat+tmax --relaxed_cv
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_small_data import DATA, write_fold_csv  # noqa: E402
from datasets import custom  # noqa: E402
from helpers.training import linear_probe  # noqa: E402
from helpers.training.clip_features import Embedder, crop_starts, file_clips, select_features, trim_silence  # noqa: E402
from helpers.training.linear_probe import fit_probe  # noqa: E402
from helpers.training.args import finetune_parser  # noqa: E402
from helpers.training.config import TrainingConfig  # noqa: E402
from helpers.training.loop import make_model  # noqa: E402
from models.preprocess import AugmentMelSTFT  # noqa: E402

SETTINGS = {"whole": (4.0, 1), "3x2s": (2.0, 3), "5x2s": (2.0, 5), "3x3s": (3.0, 3)}
VARIANTS = ("concat", "embedding", "hidden", "concat+layer:-2", "concat+layer:-5", "concat+layer:-8", "layer:-2",
            "concat+tmax", "concat+gmax", "embedding+tmax")


class MaxEmbedder(Embedder):
    """The recipe's stored arrays of a clip plus the max statistics `tmax` and `gmax`."""

    @torch.no_grad()
    def embed(self, waveform: np.ndarray) -> dict[str, np.ndarray]:
        arrays = super().embed(waveform)
        waveform = trim_silence(waveform)
        n = min(len(waveform), self.window)
        wave = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        crops = torch.stack([wave[s:s + n] for s in crop_starts(len(waveform), self.window, self.n_crops)])
        last = self.model.forward_features(self.frontend(crops).unsqueeze(1), return_fmaps=True)[-1].float()
        return {**arrays, "tmax": last.mean(2).amax(2).numpy(), "gmax": last.amax(dim=(2, 3)).numpy()}


def features(stored: list[dict], variant: str) -> list[np.ndarray]:
    return [np.concatenate([s[p] if p in ("tmax", "gmax") else select_features(s, p) for p in variant.split("+")],
                           1).astype(np.float32) for s in stored]


def export(data: Path, fold: int, tmp: Path) -> dict:
    """Per setting and split the stored arrays of every clip, and the targets per split."""
    rows = list(csv.DictReader(open(data / "subset.csv")))
    write_fold_csv(rows, fold, tmp / f"fold{fold}.csv", merge_val=False)
    split = custom.get_datasets(data, tmp / f"fold{fold}.csv", None, 0.2, 0, None, 32000, 4.0, None)
    parser = finetune_parser("", experiment_name="x", batch_size=32, lr=6e-5, dataset_env=custom.ENV_VAR,
                             recipe="probe")
    config = TrainingConfig.from_flags(vars(parser.parse_args(["--pretrained_name", "mn04_as"])))
    model, frontend_config = make_model(config, len(split.class_names))[1], config.frontend_settings()
    out = {"targets": {s: getattr(split, s).targets.numpy() for s in ("train", "val", "test")}}
    for name, (seconds, crops) in SETTINGS.items():
        embedder = MaxEmbedder(model, AugmentMelSTFT(**frontend_config), int(seconds * 32000), crops, None)
        out[name] = {s: embedder.stored(file_clips(getattr(split, s))) for s in ("train", "val", "test")}
    return out


def test_accuracy(fold: dict, setting: str, variant: str, seed: int = 0) -> tuple[float, float]:
    """(test accuracy of the probe refitted on train + val, its C) as the recipe fits it."""
    train, val, test = (features(fold[setting][s], variant) for s in ("train", "val", "test"))
    y = fold["targets"]
    probe = fit_probe(train, y["train"], False, seed=seed)
    final = fit_probe(train + val, np.concatenate([y["train"], y["val"]]), False, c=probe.C, seed=seed)
    return float((final.predict(test).argmax(1) == y["test"].argmax(1)).mean()), probe.C


def relaxed_cv_loss(stored: list[dict], targets: np.ndarray, seed: int) -> float:
    """The best clip-level CV log loss over the recipe's C grid, concat features, with folds as
    many as the smallest class of two or more clips allows and the clips of one-clip classes in
    training in every fold (never scored)."""
    x, clip_of_row, _, _ = linear_probe._standardize(features(stored, "concat"))
    counts = targets.sum(0)
    scored = ~((targets > 0.5) & (counts == 1)).any(1)
    n_folds = int(min(5, counts[counts > 1].min()))
    folds = np.full(len(targets), -1)
    folds[scored] = linear_probe.stratified_folds(targets[scored], n_folds, seed)
    losses = []
    for c in linear_probe.DEFAULT_CS:
        probs = np.zeros_like(targets)
        for k in range(n_folds):
            rows, held = folds[clip_of_row] != k, np.flatnonzero(folds == k)
            weight, bias = linear_probe._fit_linear(x[rows], targets[clip_of_row][rows], c, False, seed)
            probs[held] = linear_probe.clip_probabilities([x[clip_of_row == i] for i in held], weight, bias, False)
        losses.append(linear_probe._log_loss(probs[scored], targets[scored], False))
    return min(losses)


def validation_loss(fold: dict, setting: str) -> float:
    """Log loss on the validation clips of the concat probe fitted on the training clips."""
    y = fold["targets"]
    probe = fit_probe(features(fold[setting]["train"], "concat"), y["train"], False)
    return linear_probe._log_loss(probe.predict(features(fold[setting]["val"], "concat")), y["val"], False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="the subset's folder (with subset.csv)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="features joined by +, comma-separated")
    parser.add_argument("--relaxed_cv", action="store_true", help="also the window choice by the relaxed CV")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folds = [export(args.data, fold, Path(tmp)) for fold in (0, 1)]
    print("| features | " + " | ".join(SETTINGS) + " |  (test accuracy fold 0 / fold 1 = mean)")
    print("|---|" + "---|" * len(SETTINGS))
    for variant in args.variants.split(","):
        cells = []
        for setting in SETTINGS:
            accs = [test_accuracy(fold, setting, variant)[0] for fold in folds]
            cells.append(" / ".join(f"{a:.3f}" for a in accs) + f" = {np.mean(accs):.3f}")
        print(f"| {variant} | " + " | ".join(cells) + " |", flush=True)
    if args.relaxed_cv:
        for seed in (0, 1, 2):
            for k, fold in enumerate(folds):
                whole, crops = (relaxed_cv_loss(fold[s]["train"], fold["targets"]["train"], seed)
                                for s in ("whole", "3x2s"))
                print(f"relaxed CV, seed {seed}, fold {k}: log loss whole clips {whole:.3f}, 3 crops of 2 s "
                      f"{crops:.3f}: {'crops' if crops < whole - max(1e-3 * whole, 1e-3) else 'whole clips'}")
        for k, fold in enumerate(folds):
            print(f"validation split, fold {k}: log loss whole clips {validation_loss(fold, 'whole'):.3f}, "
                  f"3 crops of 2 s {validation_loss(fold, '3x2s'):.3f}")


if __name__ == "__main__":
    main()
