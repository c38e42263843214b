"""The training recipes the fine-tuning scripts (`ex_*.py`) run: `finetune` (the original's loop),
`probe` (a linear probe on the frozen pretrained model, `linear_probe`), `probe_finetune` (the
probe, then a short fine-tuning, `probe_finetune`) and `auto`, which chooses by the data.

`auto` picks the probe below AUTO_FINETUNE_FROM labelled training clips per class and the
original's fine-tuning from there; it never picks probe_finetune, which did not beat the probe
by the required point where it was measured (docs/small-data.md).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from common.errors import InputError
from common.flags import add_old_spelling
from datasets.files import AudioFileDataset
from helpers.training.checkpoints import prepare_run_folder
from helpers.training.config import RecipeConfig, TrainingConfig
from helpers.training.clip_features import Embedder, check_feature_kind, file_clips
from helpers.training.distributed import DistInfo
from helpers.training.embedding_cache import clear_cache, default_cache_dir
from helpers.training.evaluation import evaluate_model
from helpers.training.linear_probe import LinearProbe, as_logits, clip_probabilities, fit_probe, install_probe
from helpers.training.loop import Result, fine_tune, make_model
from helpers.training.precision import Precision
from helpers.training.probe_finetune import FinetuneSchedule, head_logits, probe_finetune
from helpers.training.probe_windows import (WindowSetting, better_by_cv, candidate_settings, check_probe_window,
                                           crops_apply)
from helpers.training.run_log import RunLogger
from helpers.training.seeding import seed_everything
from helpers.training.tasks import Task, augment_training_set
from models.checkpoint import RunRecord, load_finetuned, plain, read_run_record, save_run_record
from models.preprocess import AugmentMelSTFT

logger = logging.getLogger(__name__)

RECIPES = ("probe", "probe_finetune", "finetune", "auto")
AUTO_FINETUNE_FROM = 50  # median labelled training clips per class from which `auto` fine-tunes


def choose_recipe(train_targets: np.ndarray, pretrained: bool = True) -> tuple[str, str]:
    """`auto`: (recipe, reason) from the median number of labelled training clips per class
    (clips carrying the label, for multi-label data): the probe below AUTO_FINETUNE_FROM, the
    original's full fine-tuning from there (data enough for its long schedule, as ESC-50's 32 per
    class). probe_finetune is never chosen (see the module docstring). A model trained from
    scratch (not `pretrained`) has nothing to probe: finetune."""
    if not pretrained:
        return "finetune", "no pretrained weights (--pretrained): nothing to probe, training from scratch"
    counts = (np.asarray(train_targets) > 0.5).sum(0)
    median = float(np.median(counts))
    seen = f"median {median:g} labelled training clips per class (min {int(counts.min())}, max {int(counts.max())})"
    if median < AUTO_FINETUNE_FROM:
        return "probe", f"{seen} < {AUTO_FINETUNE_FROM}: a linear probe on the frozen model"
    return "finetune", f"{seen} >= {AUTO_FINETUNE_FROM}: the original's fine-tuning recipe"


def add_recipe_args(parser: argparse.ArgumentParser, default: str) -> None:
    """--recipe (default `default`) and the settings of the probe recipes."""
    g = parser.add_argument_group("recipe (probe: linear head on the frozen model; probe_finetune: "
                                  "the probe, then a short fine-tuning; auto: chosen by clips per class)")
    g.add_argument("--recipe", choices=RECIPES, default=default,
                   help=f"training recipe (default {default}; finetune is the original's)")
    g.add_argument("--probe_features", type=check_feature_kind, default="concat",
                   help="embedding (pooled last feature map), hidden (the MLP head's hidden layer), concat "
                        "(both; default, measured best) or layer:N (pooled output of stage N)")
    g.add_argument("--probe_window", type=check_probe_window, default="auto",
                   help="auto (default: whole clips, or --probe_crops windows of half the clip length if they "
                        "cross-validate better), clip (whole clips) or seconds per window")
    g.add_argument("--probe_crops", type=int, default=3,
                   help="windows per clip longer than the window (training rows; predictions averaged)")
    g.add_argument("--probe_folds", type=int, default=5,
                   help="most cross-validation folds choosing the regularization (fewer when a class is small)")
    g.add_argument("--embedding_cache", type=str, default=str(default_cache_dir()),
                   help="folder of cached clip embeddings (default $EFFICIENTAT_CACHE/embeddings or "
                        "~/.cache/efficientat/embeddings; '' disables)")
    add_old_spelling(g, "--cache_dir", "--embedding_cache", "the probe's embedding cache; --cache_path is the "
                     "waveform cache", type=str)
    g.add_argument("--clear_cache", action="store_true",
                   help="delete the cached embeddings under --embedding_cache first")
    defaults = FinetuneSchedule()
    g.add_argument("--probe_epochs", type=int, default=defaults.epochs, help="probe_finetune: most epochs")
    g.add_argument("--probe_lr", type=float, default=defaults.lr, help="probe_finetune: learning rate of the head")
    g.add_argument("--layer_decay", type=float, default=defaults.layer_decay,
                   help="probe_finetune: learning-rate factor per stage below the head")
    g.add_argument("--patience", type=int, default=defaults.patience,
                   help="probe_finetune: epochs without a better validation score before stopping")


def file_dataset(dataset: Dataset, recipe: str) -> AudioFileDataset:
    """`dataset` if the probe recipes can read its clips whole (a file dataset), else InputError."""
    if not isinstance(dataset, AudioFileDataset):
        raise InputError(f"--recipe {recipe} reads the clips from audio files; this dataset "
                         f"({type(dataset).__name__}) supports --recipe finetune only")
    return dataset


def cache_root(recipe: RecipeConfig, clear: bool = False) -> Optional[Path]:
    """The embedding cache folder (--embedding_cache; None: off), emptied first if `clear`."""
    root = recipe.embedding_cache
    if root is not None and clear:
        if root.exists() and not root.is_dir():
            raise InputError(f"{root}: --embedding_cache is a file, not a folder")
        files, size = clear_cache(root)
        logger.info("embedding cache %s: cleared %d files, %.1f MB", root, files, size / 1e6)
    return root


def clip_samples(train: AudioFileDataset) -> int:
    """Samples of a whole clip: the dataset's clip length, else its longest clip."""
    return train.clip_samples or max(len(train.waveform(i)) for i in range(len(train)))


@dataclass
class FittedHead:
    """The probe (`probe`), the validation metrics of the probe fitted on the training clips
    (`val_metrics`), the clips of the final fit, the window setting chosen and how, and the
    embedders that computed features (for the log)."""
    probe: LinearProbe
    val_metrics: dict[str, float]
    fit_clips: int
    setting: WindowSetting
    windows: str
    embedders: list[Embedder]


def _train_probe(recipe: RecipeConfig, seed: int, task: Task, train: AudioFileDataset,
                 make_embedder: Callable[[WindowSetting], Embedder]) -> tuple[LinearProbe, list, Embedder, str, list]:
    """(probe, training features, its embedder, how its window setting was chosen, every embedder
    used) of the probe fitted on the training clips, C chosen by CV, under the window setting that
    `--probe_window` gives or, for `auto`, the one that cross-validates better (`probe_windows`)."""
    kind, targets = recipe.probe_features, train.targets.numpy()
    settings = candidate_settings(recipe.probe_window, clip_samples(train), recipe.probe_crops, train.sample_rate)
    embedder = make_embedder(settings[0])
    features = embedder(file_clips(train), kind)
    probe = fit_probe(features, targets, task.multilabel, n_folds=recipe.probe_folds, seed=seed)
    describe = partial(WindowSetting.describe, sample_rate=train.sample_rate)
    if len(settings) == 1:
        return probe, features, embedder, f"{describe(settings[0])} (--probe_window {recipe.probe_window})", [embedder]
    if not probe.n_folds:
        return probe, features, embedder, "whole clips (no CV to choose crops by)", [embedder]
    if not crops_apply(settings[1], list(embedder.lengths.values())):
        return probe, features, embedder, f"whole clips (no clip longer than {describe(settings[1])})", [embedder]
    crop_embedder = make_embedder(settings[1])
    crop_features = crop_embedder(file_clips(train), kind)
    crop_probe = fit_probe(crop_features, targets, task.multilabel, n_folds=recipe.probe_folds, seed=seed)
    losses = f"CV log loss {crop_probe.cv_loss[crop_probe.C]:.3g} vs {probe.cv_loss[probe.C]:.3g} whole clips"
    logger.info("probe windows: %s, %s", describe(settings[1]), losses)
    if better_by_cv(probe, crop_probe):
        return crop_probe, crop_features, crop_embedder, f"{describe(settings[1])} chosen by CV ({losses})", \
            [embedder, crop_embedder]
    return probe, features, embedder, f"whole clips chosen by CV over {describe(settings[1])} ({losses})", \
        [embedder, crop_embedder]


def _fit_head(recipe: RecipeConfig, seed: int, task: Task, train: AudioFileDataset, val: AudioFileDataset,
              make_embedder: Callable[[WindowSetting], Embedder], refit: bool) -> FittedHead:
    """The probe fitted on the training clips (`_train_probe`: C and, for `auto`, the window
    setting chosen by CV) and scored on the validation clips; with `refit` the final probe is
    fitted again, with that C and window setting, on training + validation clips (the test split
    never)."""
    probe, train_features, embedder, windows, embedders = _train_probe(recipe, seed, task, train, make_embedder)
    logger.info("probe on %s features (%d values), %s: %s", recipe.probe_features, train_features[0].shape[1],
                windows, probe.describe())
    val_features = embedder(file_clips(val), recipe.probe_features)
    val_metrics = task.metrics_fn(as_logits(probe.predict(val_features), task.multilabel), val.targets)
    setting = WindowSetting(embedder.window, embedder.n_crops)
    if not refit:
        return FittedHead(probe, val_metrics, len(train_features), setting, windows, embedders)
    final = fit_probe(train_features + val_features, np.concatenate([train.targets.numpy(), val.targets.numpy()]),
                      task.multilabel, c=probe.C, seed=seed)
    final.n_folds, final.cv_score, final.cv_loss = probe.n_folds, probe.cv_score, probe.cv_loss
    logger.info("probe refitted on %d training + %d validation clips", len(train_features), len(val_features))
    return FittedHead(final, val_metrics, len(train_features) + len(val_features), setting, windows, embedders)


def _probe_state(features: str, head: FittedHead, in_model: bool, val_metrics: dict[str, float],
                 refit: bool) -> dict:
    """The checkpoint's `probe` record: how the probe was made (features, C, window setting and how
    it was chosen), and its weights when they live beside the model (`layer:N`)."""
    probe = head.probe
    state = {"features": features, "C": probe.C, "n_folds": probe.n_folds, "cv_score": probe.cv_score,
             "window": head.setting.window, "crops": head.setting.crops, "windows": head.windows,
             "fit_clips": head.fit_clips, "refit": refit, "validation_before_refit": plain(val_metrics),
             "in_model": in_model}
    if not in_model:
        state.update(weight=probe.weight.tolist(), bias=probe.bias.tolist())
    return state


def run_probe_recipe(config: TrainingConfig, recipe: str, task: Task, train: Dataset, val: Dataset,
                     dist: DistInfo, out_dir: Path, augment: Callable[[Dataset], Dataset], refit: bool) -> Result:
    """The `probe` or `probe_finetune` recipe of the run's configuration: embed the clips, fit the
    probe (`_fit_head`; `refit` on training + validation clips, probe only), make it the model's
    head, for probe_finetune fine-tune (`augment` wrapping the training set); write
    <out_dir>/best.pt (a normal checkpoint plus the `probe` record) and the run log."""
    run_config, options = config.run, config.recipe
    if not config.model.pretrained:
        raise InputError(f"--recipe {recipe} starts from released weights: add --pretrained (or --pretrained_name NAME)")
    if run_config.resume:
        raise InputError(f"--recipe {recipe} does not resume (it takes minutes at most): use --overwrite to run it again")
    if recipe == "probe_finetune" and options.probe_features.startswith("layer:"):
        raise InputError("--recipe probe_finetune needs the probe in the model's head: --probe_features "
                         "embedding, hidden or concat")
    train, val = file_dataset(train, recipe), file_dataset(val, recipe)
    prepare_run_folder(out_dir, None, run_config.overwrite, dist.is_main)
    seed_everything(run_config.seed)
    model_config, model = make_model(config, len(task.class_names))
    frontend_config = config.frontend_settings()
    root = cache_root(options, clear=options.clear_cache)

    def make_embedder(setting: WindowSetting) -> Embedder:
        return Embedder(model, AugmentMelSTFT(**frontend_config), setting.window, setting.crops, root, dist.device)

    started = time.perf_counter()
    refit = refit and recipe == "probe"  # probe_finetune stops early on the validation clips
    head = _fit_head(options, run_config.seed, task, train, val, make_embedder, refit)
    probe, metrics, (window, crops) = head.probe, head.val_metrics, (head.setting.window, head.setting.crops)
    in_model = install_probe(model, probe, options.probe_features)
    model_config = {**model_config, "head_type": model.head_type}
    logger.info("probe: %d clips embedded, %d read back (%.1f s); %s", sum(e.computed for e in head.embedders),
                sum(e.reused for e in head.embedders), time.perf_counter() - started, head.embedders[0].cache.report())
    history, best_epoch = [{"epoch": -1, **metrics}], -1
    if recipe == "probe_finetune":
        train.clip_samples = min(window, max(head.embedders[0].lengths.values()))
        schedule = FinetuneSchedule(options.probe_epochs, options.probe_lr, options.layer_decay,
                                    config.optim.weight_decay, options.patience, config.loader.batch_size,
                                    config.loader.num_workers)
        best_epoch, history = probe_finetune(model, AugmentMelSTFT(**frontend_config), augment(train), file_clips(val),
                                             val.targets, task, schedule, window, crops, dist,
                                             Precision(run_config.precision, dist.device), run_config.seed)
        metrics = next(h for h in history if h["epoch"] == best_epoch)
    run = RunLogger(run_config.logger, task.project, run_config.experiment_name, config.flags, out_dir, dist,
                    tags=(*task.tags, recipe), notes=task.notes)
    for entry in history:
        run.log({k: v for k, v in entry.items() if k != "epoch"}, step=entry["epoch"])
    run.finish()
    metrics = {k: v for k, v in metrics.items() if k not in ("epoch", "train_loss", "seconds")}
    record = RunRecord(model.state_dict(), model_config, frontend_config, list(task.class_names), task.multilabel,
                       task.name, metrics, plain(dict(config.flags)), epoch=best_epoch if best_epoch >= 0 else None,
                       recipe=recipe, probe=_probe_state(options.probe_features, head, in_model, metrics, refit))
    path = out_dir / "best.pt"
    if dist.is_main:
        save_run_record(path, record)
    return Result(metrics, metrics, best_epoch, out_dir, {"best": path})


def train_recipe(config: TrainingConfig, task: Task, train_set: Dataset, val_set: Dataset, dist: DistInfo,
                 out_dir: Path, eval_batch_size: Optional[int] = None,
                 augment: Optional[Callable[[Dataset], Dataset]] = None, refit: bool = False) -> Result:
    """Train by --recipe: `finetune` (the original's loop, `fine_tune`), `probe` / `probe_finetune`
    (`run_probe_recipe`; `refit`: the probe is refitted on the validation clips too, for scripts
    whose validation split is not their test split), or `auto`, resolved by `choose_recipe` on the
    training targets; the recipe and the reason are logged. `augment` wraps the training set for
    the fine-tuning (default: `augment_training_set` as `config.data` switches it)."""
    recipe, reason = config.recipe.recipe, "as asked (--recipe)"
    if recipe == "auto":
        recipe, reason = choose_recipe(file_dataset(train_set, "auto").targets.numpy(), config.model.pretrained)
    logger.info("recipe %s: %s", recipe, reason)
    wrap = augment or (lambda dataset: augment_training_set(dataset, config.data))
    if recipe == "finetune":
        return fine_tune(config, task, wrap(train_set), val_set, dist, out_dir, eval_batch_size)
    return run_probe_recipe(config, recipe, task, train_set, val_set, dist, out_dir, wrap, refit)


def evaluate_trained(checkpoint: Optional[str | os.PathLike], model: nn.Module, frontend: AugmentMelSTFT,
                     dataset: Dataset, task: Task, config: TrainingConfig, dist: DistInfo,
                     batch_size: Optional[int] = None) -> dict[str, float]:
    """The task's metrics of the model `model_for_evaluation` loaded from `checkpoint`: a probe
    recipe's checkpoint scores clips as the probe predicts them (whole clips, or its crops averaged;
    embeddings cached under --embedding_cache), any other as `evaluate_model`."""
    record = read_run_record(checkpoint, mmap=True) if checkpoint else None
    settings = record.probe if record is not None else None
    if settings is None:
        return evaluate_model(model, frontend, dataset, task, config, dist, batch_size)
    dataset = file_dataset(dataset, "probe")
    # the embedding cache is keyed by the plain model's weights, not by those of its fast copy `model`
    plain_model, frontend_config, _, _ = load_finetuned(checkpoint, record.to_state(), probe_beside=True)
    embedder = Embedder(plain_model, AugmentMelSTFT(**frontend_config), settings["window"], settings["crops"],
                        cache_root(config.recipe), dist.device)
    if settings.get("in_model", True):
        logits = head_logits(embedder, file_clips(dataset), task.multilabel)
    else:
        probs = clip_probabilities(embedder(file_clips(dataset), settings["features"]),
                                   np.asarray(settings["weight"]), np.asarray(settings["bias"]), task.multilabel)
        logits = as_logits(probs, task.multilabel)
    return task.metrics_fn(logits, dataset.targets)


def recipe_summary(checkpoint: str | os.PathLike) -> str:
    """One line on how the model of a training script's checkpoint was made: the recipe, and for
    a probe its features, the regularization, how it was chosen and the CV score."""
    record = read_run_record(checkpoint, mmap=True)
    recipe, probe = record.recipe or "finetune", record.probe
    if probe is None:
        return f"recipe {recipe}" + (f", best epoch {record.epoch}" if record.epoch is not None else "")
    folds = probe.get("n_folds", 0)
    metric = "mAP" if record.multilabel else "accuracy"
    chosen = (f"C {probe['C']:g} chosen by {folds}-fold CV (CV {metric} {probe['cv_score']:.4f})" if folds
              else f"C {probe['C']:g} fixed (no CV: a class has one clip)")
    fitted = f"fitted on {probe['fit_clips']} clips" + (" (training + validation)" if probe.get("refit") else "")
    windows = f", {probe['windows']}" if probe.get("windows") else ""
    text = f"recipe {recipe}, {probe['features']} features{windows}, {chosen}, {fitted}"
    return text + (f", fine-tuned best epoch {record.epoch}" if record.epoch is not None else "")
