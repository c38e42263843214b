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
from helpers.errors import InputError
from helpers.files import atomic_write
from helpers.finetune import Task, _better
from helpers.training import (DistInfo, Precision, eval_loader, evaluate, seed_epoch, seed_everything,
                              train_loader, train_one_epoch)
from models.preprocess import AugmentMelSTFT

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
    return model.for_inference() if hasattr(model, "for_inference") else model.eval()


def crop_starts(num_samples: int, window: int, n_crops: int) -> list[int]:
    """Start samples of up to `n_crops` evenly spaced windows (first and last flush with the clip's
    ends; one window at 0 for clips no longer than `window`)."""
    if num_samples <= window or n_crops <= 1:
        return [0]
    return sorted({int(round(s)) for s in np.linspace(0, num_samples - window, n_crops)})


def _backbone_hash(model: nn.Module, skip_prefix: str) -> hashlib._Hash:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not name.startswith(skip_prefix + "."):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest


class Embedder:
    """Penultimate features of a frozen model for clips (see the module docstring), cached on disk
    under `cache_dir` when given. Call it on `ClipSource`s; returns one (crops, D) float32 array per
    clip. `computed` / `reused` count the clips embedded / read from the cache so far."""

    def __init__(self, model: nn.Module, frontend: AugmentMelSTFT, window: int, n_crops: int = 1,
                 cache_dir: Optional[str | os.PathLike] = None,
                 device: torch.device | str = "cpu") -> None:
        name, _ = final_linear(model)
        self.device = torch.device(device)
        self.frontend = frontend.to(self.device).eval()
        self.window, self.n_crops = int(window), int(n_crops)
        settings = (FEATURE_VERSION, frontend.sr, frontend.n_mels, frontend.win_length, frontend.hopsize,
                    frontend.n_fft, frontend.fmin, frontend.fmax, self.window, self.n_crops)
        digest = _backbone_hash(model, name)
        digest.update(repr(settings).encode())
        self.key = digest.hexdigest()[:20]
        self.cache_dir = Path(cache_dir) / self.key if cache_dir is not None else None
        self.model = inference_model(model).to(self.device)
        self._features: list[torch.Tensor] = []
        self._hook = final_linear(self.model)[1].register_forward_hook(
            lambda module, inputs, output: self._features.append(inputs[0]))
        self.computed = self.reused = 0

    @torch.no_grad()
    def embed(self, waveform: np.ndarray) -> np.ndarray:
        """(crops, D) features of one whole waveform."""
        n = min(len(waveform), self.window)
        wave = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        crops = torch.stack([wave[s:s + n] for s in crop_starts(len(waveform), self.window, self.n_crops)])
        self._features.clear()
        self.model(self.frontend(crops.to(self.device)).unsqueeze(1))
        return self._features[-1].float().cpu().numpy()

    def _cache_file(self, clip: ClipSource) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        return self.cache_dir / (hashlib.sha256(clip.key.encode()).hexdigest()[:32] + ".npy")

    def __call__(self, clips: Sequence[ClipSource]) -> list[np.ndarray]:
        out = []
        for clip in clips:
            path = self._cache_file(clip)
            if path is not None and path.is_file():
                try:
                    out.append(np.load(path, allow_pickle=False))
                    self.reused += 1
                    continue
                except (OSError, ValueError):
                    logger.warning("%s: unreadable cached embedding, computing it again", path)
            features = self.embed(clip.load())
            if path is not None:
                with atomic_write(path, "wb") as f:
                    np.save(f, features)
            out.append(features)
            self.computed += 1
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
        return np.stack([_probabilities(self.logits(f), self.multilabel).mean(0) for f in features])


def _probabilities(logits: np.ndarray, multilabel: bool) -> np.ndarray:
    t = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    return (torch.sigmoid(t) if multilabel else torch.softmax(t, dim=-1)).numpy()


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
            probs = [_probabilities(x[clip_of_row == i] @ weight.T + bias, multilabel).mean(0) for i in val_clips]
            losses.append(_log_loss(np.stack(probs), targets[val_clips], multilabel))
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


# ---------------------------------------------------------------- probe, then fine-tune

def backbone_stages(model: nn.Module) -> list[nn.Module]:
    """The stages below the classifier, input first (MN: features; DyMN: in_c, layers, out_c)."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return list(features)
    return [model.in_c, *model.layers, model.out_c]


def layerwise_param_groups(model: nn.Module, lr: float, decay: float) -> list[dict]:
    """Optimizer groups with layer-wise learning-rate decay: the final Linear at `lr`, the rest of
    the classifier at lr * decay, then each backbone stage from the top down another factor
    `decay` lower (the stem of an MN at lr * decay ** 18)."""
    name, last = final_linear(model)
    head_rest = [p for n, p in model.classifier.named_parameters()
                 if not f"classifier.{n}".startswith(name + ".")]
    stages = [list(last.parameters()), head_rest] + [list(s.parameters()) for s in reversed(backbone_stages(model))]
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
    lr: float = 1e-3
    layer_decay: float = 0.8
    weight_decay: float = 1e-2
    patience: int = 3
    batch_size: int = 16
    num_workers: int = 0


def probe_finetune(model: nn.Module, frontend: AugmentMelSTFT, train_set: Dataset, val_set: Dataset,
                   task: Task, schedule: FinetuneSchedule, dist: DistInfo, precision: Precision,
                   seed: int = 0) -> tuple[int, list[dict[str, float]]]:
    """Fine-tune the whole `model`, whose final Linear holds the fitted probe, on `train_set`
    (BatchNorm statistics frozen, see `FrozenNorm`), validating after every epoch on `val_set`
    with the task's metrics. The probe itself is scored first as epoch -1, so the result is never
    worse on the validation data than the probe. The model ends holding the weights of the best
    epoch, which is returned with one metrics dict per epoch (epoch, train_loss, the task's
    metrics, seconds)."""
    seed_everything(seed)
    net = FrozenNorm(model).to(dist.device)
    frontend = frontend.to(dist.device)
    optimizer = torch.optim.AdamW(layerwise_param_groups(model, schedule.lr, schedule.layer_decay),
                                  weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / schedule.epochs)))
    train_dl = train_loader(train_set, schedule.batch_size, schedule.num_workers, dist, seed)
    val_dl = eval_loader(val_set, schedule.batch_size, schedule.num_workers, dist)

    def validate() -> dict[str, float]:
        return task.metrics_fn(*evaluate(net, frontend, val_dl, precision, dist, task.target_index,
                                         task.keep_fn, progress=False))

    best = validate()
    history = [{"epoch": -1, **best}]
    best_epoch, best_state = -1, copy.deepcopy(model.state_dict())
    for epoch in range(schedule.epochs):
        if epoch - best_epoch > schedule.patience:
            break
        seed_epoch(seed, epoch, dist.rank)
        if hasattr(model, "update_params"):
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
