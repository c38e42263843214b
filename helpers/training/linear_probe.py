"""The linear probe's head: a logistic regression on standardized clip features, its
regularization chosen by cross-validation, refitted on every labelled clip, then put into the
model as its classifier.

Fit. Features are standardized, then a multinomial logistic regression (single-label) or one
binary logistic regression per class (multi-label) is fitted; the standardization is folded into
the weights. The inverse regularization C is chosen on the training clips by stratified k-fold
cross-validation with as many folds as the smallest class has clips (at most `n_folds`; crops of a
clip stay in one fold, probabilities averaged per clip as at test time), scored by the clip-level
log loss, which separates settings that accuracy on a few clips scores alike; C values whose loss
is within `TIE_TOLERANCE` of the best count as tied and the strongest regularization (smallest C)
of them wins. With fewer than two clips in some class no fold split exists: C is DEFAULT_C (said
in the log). The cross-validated accuracy (single-label) or mAP (multi-label) is reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from threadpoolctl import threadpool_limits
from torch import nn

from common.errors import InputError
from models.layers import ConcatHead, classification_head

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
DEFAULT_C = 1.0  # C without cross-validation (one clip in some class); measured best on the US8K subset
TIE_TOLERANCE = 1e-3  # relative: CV log losses this close to the best are tied
MISSING_CLASS_LOGIT = -30.0  # logit of a class that a cross-validation fold never saw in training


@dataclass
class LinearProbe:
    """A fitted linear head on raw (unstandardized) features: logits = x @ weight.T + bias, with
    how its C was chosen (`n_folds` 0: DEFAULT_C, no cross-validation)."""
    weight: np.ndarray
    bias: np.ndarray
    multilabel: bool
    C: float
    n_folds: int = 0
    cv_score: Optional[float] = None
    cv_loss: dict[float, float] = field(default_factory=dict)

    def predict(self, features: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities per clip (sigmoid or softmax), averaged over its crops."""
        return clip_probabilities(features, self.weight, self.bias, self.multilabel)

    def describe(self) -> str:
        """How C was chosen, for the log and the final summary."""
        if not self.n_folds:
            return f"C {self.C:g} fixed (some class has one clip: no cross-validation)"
        metric = "mAP" if self.multilabel else "accuracy"
        return f"C {self.C:g} chosen by {self.n_folds}-fold cross-validation (CV {metric} {self.cv_score:.4f})"


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
    weight, bias = np.zeros((n_classes, x.shape[1])), np.full(n_classes, MISSING_CLASS_LOGIT)
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
    if len(clf.classes_) == 1:  # one class: it gets all the probability
        bias[clf.classes_] = 0.0
        return weight, bias
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


def _score(probs: np.ndarray, targets: np.ndarray, multilabel: bool) -> float:
    """Accuracy (single-label) or mAP over the classes with positives (multi-label)."""
    if not multilabel:
        return float((probs.argmax(1) == targets.argmax(1)).mean())
    present = [k for k in range(targets.shape[1]) if 0 < targets[:, k].sum() < len(targets)]
    return float(np.mean([average_precision_score(targets[:, k], probs[:, k]) for k in present])) if present else 0.0


def stratified_folds(targets: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per clip: the clips of every group (first label; clips without one form a group)
    are shuffled and dealt round-robin, continuing where the previous group stopped, so folds keep
    class proportions and sizes."""
    groups = np.where(targets.max(1) > 0.5, targets.argmax(1), -1)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(targets), dtype=np.int64)
    offset = 0
    for g in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        folds[members] = (offset + np.arange(len(members))) % n_folds
        offset += len(members)
    return folds


def cv_folds_allowed(targets: np.ndarray, n_folds: int) -> int:
    """Folds the smallest class allows (its labelled clips), at most `n_folds`; < 2: none."""
    counts = (np.asarray(targets) > 0.5).sum(0)
    counts = counts[counts > 0]
    return int(min(n_folds, counts.min())) if len(counts) else 0


def choose_c(cv_loss: dict[float, float]) -> float:
    """The smallest C (strongest regularization) among those tied with the best CV loss."""
    best = min(cv_loss.values())
    return min(c for c, loss in cv_loss.items() if loss <= best + TIE_TOLERANCE * abs(best))


def _standardize(features: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(standardized rows, clip index per row, mean, std) of per-clip (crops, D) features."""
    clip_of_row = np.concatenate([np.full(len(f), i) for i, f in enumerate(features)])
    x = np.concatenate(features).astype(np.float64)
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-6] = 1.0  # constant features (e.g. dead units) stay at 0 after centring
    return (x - mean) / std, clip_of_row, mean, std


def _cross_validate(x: np.ndarray, clip_of_row: np.ndarray, targets: np.ndarray, multilabel: bool,
                    cs: Sequence[float], n_folds: int, seed: int) -> tuple[dict[float, float], dict[float, float]]:
    """({C: CV log loss}, {C: CV accuracy or mAP}), clip-level, over `n_folds` stratified folds."""
    y = targets[clip_of_row]
    folds = stratified_folds(targets, n_folds, seed)
    losses, scores = {}, {}
    for c in cs:
        probs = np.zeros_like(targets)
        for k in range(n_folds):
            train_rows, val_clips = folds[clip_of_row] != k, np.flatnonzero(folds == k)
            weight, bias = _fit_linear(x[train_rows], y[train_rows], c, multilabel, seed)
            probs[val_clips] = clip_probabilities([x[clip_of_row == i] for i in val_clips], weight, bias, multilabel)
        losses[float(c)] = _log_loss(probs, targets, multilabel)
        scores[float(c)] = _score(probs, targets, multilabel)
    return losses, scores


def fit_probe(features: Sequence[np.ndarray], targets: np.ndarray, multilabel: bool,
              cs: Sequence[float] = DEFAULT_CS, n_folds: int = 5, seed: int = 0,
              c: Optional[float] = None) -> LinearProbe:
    """Fit the linear head on per-clip (crops, D) features and (clips, classes) multi-hot targets,
    C chosen by cross-validation (see the module docstring) unless `c` is given (a refit). BLAS
    runs single-threaded: these small problems are several times faster so than with threads."""
    if len(features) != len(targets):
        raise ValueError(f"{len(features)} feature arrays for {len(targets)} targets")
    targets = np.asarray(targets, dtype=np.float64)
    with threadpool_limits(1):
        x, clip_of_row, mean, std = _standardize(features)
        folds, cv_loss, cv_score = 0, {}, None
        if c is None:
            folds = cv_folds_allowed(targets, n_folds)
            if folds >= 2:
                cv_loss, scores = _cross_validate(x, clip_of_row, targets, multilabel, cs, folds, seed)
                c = choose_c(cv_loss)
                cv_score = scores[c]
            else:
                folds, c = 0, DEFAULT_C
        weight, bias = _fit_linear(x, targets[clip_of_row], c, multilabel, seed)
    weight = weight / std
    return LinearProbe(weight.astype(np.float32), (bias - weight @ mean).astype(np.float32), multilabel,
                       float(c), folds, cv_score, cv_loss)


def install_probe(model: nn.Module, probe: LinearProbe, kind: str) -> bool:
    """Make the probe the model's classifier: `hidden` fills the MLP head's final Linear,
    `embedding` replaces the head by a `linear` head, `concat` by a `concat` head keeping the MLP's
    hidden layer. `layer:N` features are not the head's: the model is left as it is and False is
    returned (the probe then lives beside the model, in the checkpoint)."""
    if kind.startswith("layer:"):
        return False
    if kind in ("hidden", "concat") and model.head_type != "mlp":
        raise InputError(f"--probe_features {kind} needs a model with an MLP head (head_type mlp)")
    if kind == "embedding":
        model.classifier = classification_head("linear", model.embedding_dim, 0, probe.weight.shape[0])
        model.head_type = "linear"
    elif kind == "concat":
        hidden = model.classifier[2]
        head = ConcatHead(hidden.in_features, hidden.out_features, probe.weight.shape[0])
        head.hidden[0].load_state_dict(hidden.state_dict())
        model.classifier, model.head_type = head, "concat"
    layer = model.get_classifier()
    if tuple(layer.weight.shape) != probe.weight.shape:
        raise ValueError(f"the model's final layer is {tuple(layer.weight.shape)}, the probe {probe.weight.shape}")
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(probe.weight))
        layer.bias.copy_(torch.from_numpy(probe.bias))
    model.num_classes = probe.weight.shape[0]
    return True
