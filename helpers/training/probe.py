"""Small-data recipes: a linear probe on the frozen pretrained model, and the pieces that turn it
into a normal checkpoint or a starting point for fine-tuning.

Features. A clip's feature is the *penultimate* activation of the pretrained model: the input of
the classifier's final Linear (for the released MLP heads the hidden layer after Hardswish, e.g.
512 values for mn04), so a probe fitted on it becomes that Linear exactly. Clips longer than the
window are cut into `n_crops` evenly spaced windows (each a training row; their predicted
probabilities are averaged at test time); shorter clips are embedded whole, without padding, as
`inference.py` tags a file.

Cache. `Embedder` keeps every clip's features on disk under a folder named by a hash of the
model's weights (the final Linear excepted), the frontend's evaluation settings, the window and
the crop count, in a file named by a hash of the clip's identity (path, size, modification time):
a second run with other head settings reads them back, an edited clip or other preprocessing is
embedded again.

Head. Features are standardized, then a multinomial logistic regression (single-label) or one
binary logistic regression per class (multi-label) is fitted. The inverse regularization C is
chosen on the training clips by stratified k-fold cross-validation on the clip-level log loss
(crops of a clip stay in one fold; probabilities averaged per clip as at test time): the log loss
separates settings that accuracy on a few clips scores alike, and ties go to the stronger
regularization. The standardization is then folded into the weights.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import Dataset

from datasets.cache import file_signature
from datasets.files import AudioFileDataset
from common.errors import InputError
from common.files import atomic_write
from helpers.training.args import frontend_config_from_args
from helpers.training.data import train_loader
from helpers.training.distributed import DistInfo
from helpers.training.evaluation import evaluate_model
from helpers.training.checkpoints import prepare_run_folder
from helpers.training.loop import Result, _better, fine_tune, model_from_args, train_one_epoch
from helpers.training.precision import Precision
from helpers.training.run_log import RunLogger
from helpers.training.seeding import seed_epoch, seed_everything
from helpers.training.tasks import Task, augment_training_set
from models.checkpoint import load_checkpoint, load_finetuned, plain, save_checkpoint
from models.preprocess import AugmentMelSTFT
from models.runtime import for_inference

logger = logging.getLogger(__name__)

FEATURE_VERSION = "penultimate-v1"  # part of the cache key: bump when the feature definition changes
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
MISSING_CLASS_LOGIT = -30.0  # logit of a class that a cross-validation fold never saw in training


# ---------------------------------------------------------------- features

@dataclass(frozen=True)
class ClipSource:
    """One clip to embed: `key` identifies its content (cache file name), `load()` returns its
    whole mono waveform at the frontend's rate."""
    key: str
    load: Callable[[], np.ndarray]


def file_clips(dataset: AudioFileDataset) -> list[ClipSource]:
    """The clips of a file dataset, whole (not cut to the dataset's clip length), keyed by file
    signature and sample rate."""
    return [ClipSource(f"{file_signature(path)}|{dataset.sample_rate}", partial(dataset.waveform, i))
            for i, path in enumerate(dataset.files)]


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(qualified name, module) of the classifier's last layer; InputError unless it is a Linear
    (the probe needs the MLP head of the released MN / DyMN models)."""
    classifier = getattr(model, "classifier", None)
    last = list(classifier.children())[-1] if isinstance(classifier, nn.Sequential) else None
    if not isinstance(last, nn.Linear):
        raise InputError("the probe recipes need a model whose classifier ends in a Linear layer "
                         "(head_type mlp); use --recipe finetune for other heads")
    return f"classifier.{len(classifier) - 1}", last


def inference_model(model: nn.Module) -> nn.Module:
    """The model's eval-only fast path where it has one (`for_inference`), else the model in eval
    mode."""
    return for_inference(model)


def crop_starts(num_samples: int, window: int, n_crops: int) -> list[int]:
    """Start samples of up to `n_crops` evenly spaced windows (first and last flush with the clip's
    ends; one window at 0 for clips no longer than `window`)."""
    if num_samples <= window or n_crops <= 1:
        return [0]
    return sorted({int(round(s)) for s in np.linspace(0, num_samples - window, n_crops)})


def cache_key(model: nn.Module, frontend: AugmentMelSTFT, window: int, n_crops: int) -> str:
    """Hash of what a clip's features depend on besides the clip: the model's weights except the
    final Linear, the frontend's evaluation settings, the window and the crop count."""
    skip = final_linear(model)[0] + "."
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not name.startswith(skip):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    settings = (FEATURE_VERSION, frontend.sr, frontend.n_mels, frontend.win_length, frontend.hopsize,
                frontend.n_fft, frontend.fmin, frontend.fmax, window, n_crops)
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:20]


class Embedder:
    """Penultimate features of a frozen model for clips (see the module docstring), cached on disk
    under `cache_dir`/`cache_key(...)` when given. Call it on `ClipSource`s; returns one (crops, D) float32 array per
    clip. `lengths` holds each clip's length in samples by key; `computed` / `reused` count the
    clips embedded / read from the cache so far."""

    def __init__(self, model: nn.Module, frontend: AugmentMelSTFT, window: int, n_crops: int = 1,
                 cache_dir: Optional[str | os.PathLike] = None,
                 device: torch.device | str = "cpu") -> None:
        final_linear(model)  # fail early on heads the probe cannot use
        self.device = torch.device(device)
        self.frontend = frontend.to(self.device).eval()
        self.window, self.n_crops = int(window), int(n_crops)
        self.cache_dir = None
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir) / cache_key(model, frontend, self.window, self.n_crops)
        self.model = inference_model(model).to(self.device)
        self.lengths: dict[str, int] = {}
        self.computed = self.reused = 0

    @torch.no_grad()
    def embed(self, waveform: np.ndarray) -> np.ndarray:
        """(crops, D) features of one whole waveform."""
        n = min(len(waveform), self.window)
        wave = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        crops = torch.stack([wave[s:s + n] for s in crop_starts(len(waveform), self.window, self.n_crops)])
        captured: list[torch.Tensor] = []
        hook = final_linear(self.model)[1].register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
        try:
            self.model(self.frontend(crops.to(self.device)).unsqueeze(1))
        finally:
            hook.remove()
        return captured[0].float().cpu().numpy()

    def _cached(self, path: Optional[Path]) -> Optional[tuple[np.ndarray, int]]:
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return data["features"], int(data["num_samples"])
        except (OSError, ValueError, KeyError):
            logger.warning("%s: unreadable cached embedding, computing it again", path)
            return None

    def __call__(self, clips: Sequence[ClipSource]) -> list[np.ndarray]:
        out = []
        for clip in clips:
            path = None
            if self.cache_dir is not None:
                path = self.cache_dir / (hashlib.sha256(clip.key.encode()).hexdigest()[:32] + ".npz")
            cached = self._cached(path)
            if cached is None:
                waveform = clip.load()
                cached = self.embed(waveform), len(waveform)
                if path is not None:
                    with atomic_write(path, "wb") as f:
                        np.savez(f, features=cached[0], num_samples=cached[1])
                self.computed += 1
            else:
                self.reused += 1
            out.append(cached[0])
            self.lengths[clip.key] = cached[1]
        return out


# ---------------------------------------------------------------- the linear head

@dataclass
class LinearProbe:
    """A fitted linear head on raw (unstandardized) features: logits = x @ weight.T + bias."""
    weight: np.ndarray
    bias: np.ndarray
    multilabel: bool
    C: float
    cv_loss: dict[float, float] = field(default_factory=dict)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def predict(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities per clip (sigmoid or softmax), averaged over its crops."""
        return clip_probabilities(features, self.weight, self.bias, self.multilabel)


def clip_probabilities(features: Sequence[np.ndarray], weight: np.ndarray, bias: np.ndarray,
                       multilabel: bool) -> np.ndarray:
    """(clips, classes) probabilities (sigmoid or softmax) of the linear layer (weight, bias) on
    every crop's features, averaged over each clip's crops."""
    rows = []
    for f in features:
        logits = torch.from_numpy(np.asarray(f @ weight.T + bias, dtype=np.float64))
        rows.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)).mean(0))
    return torch.stack(rows).numpy()


def as_logits(probabilities: np.ndarray, multilabel: bool) -> torch.Tensor:
    """Logits that give back `probabilities` (log p under softmax, log(p / (1 - p)) under sigmoid),
    for the tasks' metrics, which take logits."""
    p = torch.from_numpy(np.clip(probabilities, 1e-7, 1 - 1e-7)).float()
    return torch.logit(p) if multilabel else torch.log(p)


def _fit_linear(x: np.ndarray, y: np.ndarray, c: float, multilabel: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, D), bias (C,)) of a logistic regression on multi-hot targets `y` (N, C): one
    multinomial model, or one binary model per class (constant classes get their smoothed prior
    as a constant logit). Classes absent from `y` get MISSING_CLASS_LOGIT in the multinomial case."""
    n_classes = y.shape[1]
    weight = np.zeros((n_classes, x.shape[1]))
    bias = np.full(n_classes, MISSING_CLASS_LOGIT)
    fit = partial(LogisticRegression, C=c, max_iter=5000, random_state=seed)
    if multilabel:
        for k in range(n_classes):
            positives = y[:, k] > 0.5
            if positives.all() or not positives.any():
                prior = (positives.sum() + 0.5) / (len(y) + 1.0)
                bias[k] = np.log(prior / (1 - prior))
            else:
                clf = fit().fit(x, positives)
                weight[k], bias[k] = clf.coef_[0], clf.intercept_[0]
        return weight, bias
    clf = fit().fit(x, y.argmax(1))
    if len(clf.classes_) == 2:  # sklearn's binary model: softmax([-z/2, z/2]) = sigmoid(z)
        coef = np.concatenate([-clf.coef_ / 2, clf.coef_ / 2])
        intercept = np.concatenate([-clf.intercept_ / 2, clf.intercept_ / 2])
    else:
        coef, intercept = clf.coef_, clf.intercept_
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    return weight, bias


def _log_loss(probs: np.ndarray, targets: np.ndarray, multilabel: bool) -> float:
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    if multilabel:
        return float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())
    return float(-np.log(p[np.arange(len(p)), targets.argmax(1)]).mean())


def stratified_folds(targets: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per clip: the clips of every group (first label; clips without one form a group)
    are shuffled and dealt round-robin, continuing where the previous group stopped, so folds keep
    class proportions and sizes even with classes of fewer clips than folds."""
    groups = np.where(targets.max(1) > 0.5, targets.argmax(1), -1)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(targets), dtype=np.int64)
    offset = 0
    for g in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        folds[members] = (offset + np.arange(len(members))) % n_folds
        offset += len(members)
    return folds


def fit_probe(features: Sequence[np.ndarray], targets: np.ndarray, multilabel: bool,
              cs: Sequence[float] = DEFAULT_CS, n_folds: int = 5, seed: int = 0) -> LinearProbe:
    """Fit the linear head on per-clip (crops, D) features and (clips, classes) multi-hot targets,
    C chosen by cross-validation (see the module docstring). BLAS runs single-threaded: these
    small problems are several times faster so than with threads."""
    with threadpool_limits(1):
        return _fit_probe(features, targets, multilabel, cs, n_folds, seed)


def _fit_probe(features: Sequence[np.ndarray], targets: np.ndarray, multilabel: bool,
               cs: Sequence[float], n_folds: int, seed: int) -> LinearProbe:
    if len(features) != len(targets):
        raise ValueError(f"{len(features)} feature arrays for {len(targets)} targets")
    targets = np.asarray(targets, dtype=np.float64)
    clip_of_row = np.concatenate([np.full(len(f), i) for i, f in enumerate(features)])
    x = np.concatenate(features).astype(np.float64)
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-6] = 1.0  # constant features (e.g. dead units) stay at 0 after centring
    x = (x - mean) / std
    y = targets[clip_of_row]
    folds = stratified_folds(targets, min(n_folds, len(targets)), seed)
    cv_loss = {}
    for c in cs:
        losses = []
        for k in np.unique(folds):
            train_rows, val_clips = folds[clip_of_row] != k, np.flatnonzero(folds == k)
            if not multilabel:  # a class unseen in training cannot be scored
                seen = y[train_rows].max(0) > 0.5
                val_clips = val_clips[seen[targets[val_clips].argmax(1)]]
            if not len(val_clips) or (not multilabel and len(np.unique(y[train_rows].argmax(1))) < 2):
                continue
            weight, bias = _fit_linear(x[train_rows], y[train_rows], c, multilabel, seed)
            probs = clip_probabilities([x[clip_of_row == i] for i in val_clips], weight, bias, multilabel)
            losses.append(_log_loss(probs, targets[val_clips], multilabel))
        cv_loss[float(c)] = float(np.mean(losses)) if losses else float("inf")
    best = min(cv_loss, key=lambda c: (cv_loss[c], c))
    weight, bias = _fit_linear(x, y, best, multilabel, seed)
    weight = weight / std
    return LinearProbe(weight.astype(np.float32), (bias - weight @ mean).astype(np.float32), multilabel,
                       best, cv_loss)


def set_classifier(model: nn.Module, probe: LinearProbe) -> None:
    """Copy the probe into the model's final Linear, whose logits then equal the probe's."""
    _, layer = final_linear(model)
    if tuple(layer.weight.shape) != probe.weight.shape:
        raise ValueError(f"the model's final layer is {tuple(layer.weight.shape)}, the probe "
                         f"{probe.weight.shape}")
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(probe.weight))
        layer.bias.copy_(torch.from_numpy(probe.bias))


def clip_logits(embedder: Embedder, clips: Sequence[ClipSource], multilabel: bool) -> torch.Tensor:
    """(clips, classes) logits of the embedder's model as the probe predicts: the final Linear on
    every crop, probabilities averaged over a clip's crops (`as_logits` of them)."""
    _, layer = final_linear(embedder.model)
    weight, bias = layer.weight.detach().cpu().numpy(), layer.bias.detach().cpu().numpy()
    return as_logits(clip_probabilities(embedder(clips), weight, bias, multilabel), multilabel)


# ---------------------------------------------------------------- probe, then fine-tune

def layerwise_param_groups(model: nn.Module, lr: float, decay: float) -> list[dict]:
    """Optimizer groups with layer-wise learning-rate decay: the final Linear at `lr`, the rest of
    the classifier at lr * decay, then each backbone stage from the top down another factor
    `decay` lower (the stem of an MN at lr * decay ** 18)."""
    name, last = final_linear(model)
    head_rest = [p for n, p in model.classifier.named_parameters()
                 if not f"classifier.{n}".startswith(name + ".")]
    stages = [list(last.parameters()), head_rest] + [list(s.parameters()) for s in reversed(list(model.stages()))]
    return [{"params": params, "lr": lr * decay ** depth} for depth, params in enumerate(stages) if params]


class FrozenNorm(nn.Module):
    """Wraps a model so that `train()` leaves every BatchNorm in eval mode: with a few clips per
    batch, re-estimated statistics would drift from the pretrained ones (and a batch of one clip
    could not be normalized at all). Forward passes straight through."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> FrozenNorm:
        super().train(mode)
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


@dataclass
class FinetuneSchedule:
    """probe_finetune's short schedule: AdamW with `lr` for the head (layer-wise decay below it,
    see `layerwise_param_groups`), a cosine decay over at most `epochs` epochs, and early
    stopping after `patience` epochs without a better validation score."""
    epochs: int = 10
    lr: float = 3e-4
    layer_decay: float = 0.8
    weight_decay: float = 1e-2
    patience: int = 3
    batch_size: int = 16
    num_workers: int = 0


def probe_finetune(model: nn.Module, frontend: AugmentMelSTFT, train_set: Dataset, val_clips: Sequence[ClipSource],
                   val_targets: torch.Tensor, task: Task, schedule: FinetuneSchedule, window: int, n_crops: int,
                   dist: DistInfo, precision: Precision, seed: int = 0) -> tuple[int, list[dict[str, float]]]:
    """Fine-tune the whole `model`, whose final Linear holds the fitted probe, on `train_set`
    (BatchNorm statistics frozen, see `FrozenNorm`), validating after every epoch on the clips
    `val_clips` as the probe is evaluated (`clip_logits`, `window`, `n_crops`) with the task's
    metrics. The probe itself is scored first as epoch -1, so the result is never worse on the
    validation data than the probe. The model ends holding the weights of the best epoch, which is
    returned with one metrics dict per epoch (epoch, train_loss, the task's metrics, seconds)."""
    seed_everything(seed)
    net = FrozenNorm(model).to(dist.device)
    frontend = frontend.to(dist.device)
    optimizer = torch.optim.AdamW(layerwise_param_groups(model, schedule.lr, schedule.layer_decay),
                                  weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / schedule.epochs)))
    train_dl = train_loader(train_set, schedule.batch_size, schedule.num_workers, dist, seed)
    eval_frontend = copy.deepcopy(frontend)

    def validate() -> dict[str, float]:
        embedder = Embedder(model, eval_frontend, window, n_crops, device=dist.device)
        return task.metrics_fn(clip_logits(embedder, val_clips, task.multilabel), val_targets)

    best = validate()
    history = [{"epoch": -1, **best}]
    best_epoch, best_state = -1, copy.deepcopy(model.state_dict())
    for epoch in range(schedule.epochs):
        if epoch - best_epoch > schedule.patience:
            break
        seed_epoch(seed, epoch, dist.rank)
        model.update_params(epoch)
        started = time.perf_counter()
        stats = train_one_epoch(net, frontend, train_dl, optimizer, task.loss_fn, precision, dist, epoch,
                                progress=False)
        scheduler.step()
        metrics = validate()
        history.append({"epoch": epoch, "train_loss": stats["loss"], **metrics,
                        "seconds": time.perf_counter() - started})
        logger.info("probe_finetune epoch %d: train_loss %.4f, %s", epoch, stats["loss"],
                    ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if _better(metrics, best, task.selection):
            best, best_epoch, best_state = metrics, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return best_epoch, history


# ---------------------------------------------------------------- choosing a recipe

RECIPES = ("probe", "probe_finetune", "finetune", "auto")
AUTO_PROBE_BELOW = 10  # median labelled training clips per class below which `auto` probes
AUTO_FINETUNE_FROM = 50  # ... from which it runs the original's full fine-tuning


def choose_recipe(train_targets: np.ndarray, pretrained: bool = True) -> tuple[str, str]:
    """`auto`: (recipe, reason) from the median number of labelled training clips per class
    (clips carrying the label, for multi-label data): below AUTO_PROBE_BELOW the probe (on a few
    clips per class, fine-tuning the network gains little over the probe for minutes of training),
    from AUTO_FINETUNE_FROM the original's full fine-tuning (data enough for its long schedule, as
    ESC-50's 32 per class), probe_finetune in between. A model trained from scratch (not
    `pretrained`) has nothing to probe: finetune."""
    if not pretrained:
        return "finetune", "no pretrained weights (--pretrained): nothing to probe, training from scratch"
    counts = (np.asarray(train_targets) > 0.5).sum(0)
    median = float(np.median(counts))
    seen = f"median {median:g} labelled training clips per class (min {int(counts.min())}, max {int(counts.max())})"
    if median < AUTO_PROBE_BELOW:
        return "probe", f"{seen} < {AUTO_PROBE_BELOW}: a linear probe on the frozen model"
    if median < AUTO_FINETUNE_FROM:
        return "probe_finetune", (f"{AUTO_PROBE_BELOW} <= {seen} < {AUTO_FINETUNE_FROM}: the probe, then a "
                                  "short fine-tuning of the whole network")
    return "finetune", f"{seen} >= {AUTO_FINETUNE_FROM}: the original's fine-tuning recipe"


# ---------------------------------------------------------------- the recipes as the scripts run them

def add_recipe_args(parser: argparse.ArgumentParser, default: str) -> None:
    """--recipe (default `default`) and the settings of the probe recipes."""
    g = parser.add_argument_group("recipe (probe: linear head on the frozen model; probe_finetune: "
                                  "the probe, then a short fine-tuning; auto: chosen by clips per class)")
    g.add_argument("--recipe", choices=RECIPES, default=default,
                   help=f"training recipe (default {default}; finetune is the original's)")
    g.add_argument("--probe_crops", type=int, default=1,
                   help="windows per clip longer than the clip length (training rows; predictions averaged)")
    g.add_argument("--probe_folds", type=int, default=5, help="cross-validation folds choosing the regularization")
    g.add_argument("--embedding_cache", type=str, default=str(Path("runs") / "embedding_cache"),
                   help="folder of cached clip embeddings ('' disables)")
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


def run_probe_recipe(args: argparse.Namespace, recipe: str, task: Task, train: Dataset, val: Dataset,
                     dist: DistInfo, out_dir: Path, augment: Callable[[Dataset], Dataset]) -> Result:
    """The `probe` or `probe_finetune` recipe from the script's arguments: embed the training clips
    (windows of the dataset's clip length), fit the probe, make it the classifier, for
    probe_finetune fine-tune (training windows no longer than the longest clip, `augment` wrapping
    the training set); score the validation clips as the probe predicts them, write
    <out_dir>/best.pt (a normal checkpoint: model, frontend and model configuration, class names,
    plus the recipe and the probe's settings) and metrics.jsonl."""
    if not args.pretrained:
        raise InputError(f"--recipe {recipe} starts from released weights: add --pretrained "
                         "(or --pretrained_name NAME)")
    if args.resume:
        raise InputError(f"--recipe {recipe} does not resume (it takes minutes at most): use --overwrite "
                         "to run it again")
    train, val = file_dataset(train, recipe), file_dataset(val, recipe)
    prepare_run_folder(out_dir, None, args.overwrite, dist.is_main)
    seed_everything(args.seed)
    model_config, model = model_from_args(args, len(task.class_names))
    frontend_config = frontend_config_from_args(args)
    window = train.clip_samples or max(len(train.waveform(i)) for i in range(len(train)))
    embedder = Embedder(model, AugmentMelSTFT(**frontend_config), window, args.probe_crops,
                        args.embedding_cache or None, dist.device)
    started = time.perf_counter()
    probe = fit_probe(embedder(file_clips(train)), train.targets.numpy(), task.multilabel,
                      n_folds=args.probe_folds, seed=args.seed)
    set_classifier(model, probe)
    set_classifier(embedder.model, probe)  # the embedder runs an eval-only copy of the model
    logger.info("probe: %d clips embedded, %d read from %s; C = %g chosen by %d-fold cross-validation "
                "(%.1f s)", embedder.computed, embedder.reused, embedder.cache_dir or "no cache", probe.C,
                args.probe_folds, time.perf_counter() - started)
    val_clips = file_clips(val)
    metrics = task.metrics_fn(clip_logits(embedder, val_clips, task.multilabel), val.targets)
    history, best_epoch = [{"epoch": -1, **metrics}], -1
    if recipe == "probe_finetune":
        train.clip_samples = min(window, max(embedder.lengths.values()))
        schedule = FinetuneSchedule(args.probe_epochs, args.probe_lr, args.layer_decay, args.weight_decay,
                                    args.patience, args.batch_size, args.num_workers)
        best_epoch, history = probe_finetune(model, AugmentMelSTFT(**frontend_config), augment(train), val_clips,
                                             val.targets, task, schedule, window, args.probe_crops, dist,
                                             Precision(args.precision, dist.device), args.seed)
        metrics = next(h for h in history if h["epoch"] == best_epoch)
    run = RunLogger(args.logger, task.project, args.experiment_name, vars(args), out_dir, dist,
                    tags=(*task.tags, recipe), notes=task.notes)
    for entry in history:
        run.log({k: v for k, v in entry.items() if k != "epoch"}, step=entry["epoch"])
    run.finish()
    metrics = {k: v for k, v in metrics.items() if k not in ("epoch", "train_loss", "seconds")}
    state = {"model": model.state_dict(), "model_config": plain(model_config),
             "frontend_config": plain(frontend_config), "class_names": list(task.class_names),
             "multilabel": task.multilabel, "task": task.name, "metrics": plain(metrics), "recipe": recipe,
             "config": plain(vars(args)), "probe": {"C": probe.C, "window": window, "crops": args.probe_crops}}
    if best_epoch >= 0:
        state["epoch"] = best_epoch
    path = out_dir / "best.pt"
    if dist.is_main:
        save_checkpoint(path, state)
    return Result(metrics, metrics, best_epoch, out_dir, {"best": path})


def train_recipe(args: argparse.Namespace, task: Task, train_set: Dataset, val_set: Dataset, dist: DistInfo,
                 out_dir: Path, eval_batch_size: Optional[int] = None,
                 augment: Optional[Callable[[Dataset], Dataset]] = None) -> Result:
    """Train by --recipe: `finetune` (the original's loop, `fine_tune`), `probe` / `probe_finetune`
    (`run_probe_recipe`), or `auto`, resolved by `choose_recipe` on the training targets; the
    recipe and the reason are logged. `augment` wraps the training set for the fine-tuning
    (default: `augment_training_set` as the arguments switch it)."""
    recipe, reason = args.recipe, "as asked (--recipe)"
    if recipe == "auto":
        recipe, reason = choose_recipe(file_dataset(train_set, "auto").targets.numpy(), args.pretrained)
    logger.info("recipe %s: %s", recipe, reason)
    wrap = augment or (lambda dataset: augment_training_set(dataset, args))
    if recipe == "finetune":
        return fine_tune(args, task, wrap(train_set), val_set, dist, out_dir, eval_batch_size)
    return run_probe_recipe(args, recipe, task, train_set, val_set, dist, out_dir, wrap)


def evaluate_trained(checkpoint: Optional[str | os.PathLike], model: nn.Module, frontend: AugmentMelSTFT,
                     dataset: Dataset, task: Task, args: argparse.Namespace, dist: DistInfo,
                     batch_size: Optional[int] = None) -> dict[str, float]:
    """The task's metrics of the model `model_for_evaluation` loaded from `checkpoint`: a probe
    recipe's checkpoint scores clips as the probe predicts them (whole clips, or its crops averaged;
    embeddings cached under --embedding_cache), any other as `evaluate_model`."""
    state = load_checkpoint(checkpoint, mmap=True) if checkpoint else {}
    settings = state.get("probe")
    if settings is None:
        return evaluate_model(model, frontend, dataset, task, args, dist, batch_size)
    dataset = file_dataset(dataset, "probe")
    # the embedding cache is keyed by the plain model's weights, not by those of its fast copy `model`
    plain_model, frontend_config, _, _ = load_finetuned(checkpoint, state)
    embedder = Embedder(plain_model, AugmentMelSTFT(**frontend_config), settings["window"], settings["crops"],
                        args.embedding_cache or None, dist.device)
    return task.metrics_fn(clip_logits(embedder, file_clips(dataset), task.multilabel), dataset.targets)
