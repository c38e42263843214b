"""Evaluation metrics of the training scripts: mAP, mAUC (ROC) and d' for multi-label tagging,
accuracy for single-label classification.

Per-class values come from scikit-learn (`average_precision_score`, `roc_auc_score`), the macro
figure is their unweighted mean over classes, as in the original. Classes a metric is undefined for
are left out of the mean:

- average precision needs at least one positive clip. scikit-learn returns 0 (with a warning)
  for a class without positives, which would pull the mean of a small or partial evaluation set
  down for classes that were never tested; such classes are excluded.
- ROC AUC needs at least one positive and one negative clip; scikit-learn returns NaN for the
  others (`UndefinedMetricWarning`), and those are excluded.

On the full AudioSet evaluation set every class has positives and negatives, so the figures are
the plain means over all 527 classes that the original reports. The per-class arrays carry NaN for
excluded classes.

d' (sensitivity index) = sqrt(2) * Phi^-1(AUC), computed from the macro AUC as AST and PaSST
report it.

Scores may be logits or probabilities: both metrics depend only on the ranking of each column.
"""
from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import Optional

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (clips, classes), got shape {a.shape}")
    return a


def _check(targets: np.ndarray, scores: np.ndarray, mask: Optional[np.ndarray]):
    targets, scores = _as_2d(targets, "targets"), _as_2d(scores, "scores")
    if targets.shape != scores.shape:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} differ in shape")
    if mask is not None:
        mask = _as_2d(mask, "mask")
        if mask.shape != targets.shape:
            raise ValueError(f"mask {mask.shape} and targets {targets.shape} differ in shape")
    return targets, scores, mask


def per_class_average_precision(targets: np.ndarray, scores: np.ndarray,
                                mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Average precision of every class (column); NaN where a class has no positive clip.
    `targets` are binarized at 0.5 (mixed or soft targets count as positive above one half).
    `mask` (same shape, optional) weights each clip per class, e.g. OpenMIC's observation mask;
    clips with weight 0 do not count."""
    targets, scores, mask = _check(targets, scores, mask)
    binary = targets > 0.5
    out = np.full(targets.shape[1], np.nan)
    for c in range(targets.shape[1]):
        weight = None if mask is None else mask[:, c]
        positives = binary[:, c] if weight is None else binary[:, c] & (weight > 0)
        if positives.any():
            out[c] = average_precision_score(binary[:, c], scores[:, c], sample_weight=weight)
    return out


def per_class_roc_auc(targets: np.ndarray, scores: np.ndarray,
                      mask: Optional[np.ndarray] = None) -> np.ndarray:
    """ROC AUC of every class; NaN where a class lacks positive or negative clips. Targets and
    mask as in `per_class_average_precision`."""
    targets, scores, mask = _check(targets, scores, mask)
    binary = targets > 0.5
    out = np.full(targets.shape[1], np.nan)
    for c in range(targets.shape[1]):
        weight = None if mask is None else mask[:, c]
        counted = np.ones(len(binary), dtype=bool) if weight is None else weight > 0
        if binary[counted, c].any() and not binary[counted, c].all():
            out[c] = roc_auc_score(binary[:, c], scores[:, c], sample_weight=weight)
    return out


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN -> NaN, said in the result
        return float(np.nanmean(values)) if values.size else math.nan


def d_prime(auc: float) -> float:
    """Sensitivity index d' = sqrt(2) * Phi^-1(AUC): +-inf for AUC 1 / 0, NaN for NaN."""
    if math.isnan(auc):
        return math.nan
    if auc <= 0.0 or auc >= 1.0:
        return math.copysign(math.inf, auc - 0.5)
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def multilabel_metrics(targets: np.ndarray, scores: np.ndarray,
                       mask: Optional[np.ndarray] = None) -> dict[str, float]:
    """{"mAP", "ROC", "d_prime", "ap_classes", "roc_classes"}: macro average precision and ROC AUC
    over the classes they are defined for (see the module docstring), d' of the macro AUC, and how
    many classes each mean covers."""
    ap = per_class_average_precision(targets, scores, mask)
    auc = per_class_roc_auc(targets, scores, mask)
    roc = _nanmean(auc)
    return {"mAP": _nanmean(ap), "ROC": roc, "d_prime": d_prime(roc),
            "ap_classes": int(np.isfinite(ap).sum()), "roc_classes": int(np.isfinite(auc).sum())}


def accuracy(targets: np.ndarray, logits: np.ndarray) -> float:
    """Fraction of clips whose arg-max score is the true class. `targets` are integer labels (N,)
    or one-hot / probability rows (N, C), whose arg-max is the label."""
    logits = np.asarray(logits)
    targets = np.asarray(targets)
    labels = targets.argmax(axis=1) if targets.ndim == 2 else targets.astype(np.int64)
    if len(labels) != len(logits):
        raise ValueError(f"{len(labels)} targets for {len(logits)} predictions")
    if not len(labels):
        raise ValueError("accuracy of an empty set")
    return float((logits.argmax(axis=1) == labels).mean())


def format_tagging_results(metrics: dict[str, float]) -> str:
    """The original's result lines (`  mAP: 0.471`, `  ROC: 0.980`), plus d' where computed."""
    lines = [f"  mAP: {metrics['mAP']:.3f}", f"  ROC: {metrics['ROC']:.3f}"]
    if "d_prime" in metrics:
        lines.append(f"  d': {metrics['d_prime']:.3f}")
    return "\n".join(lines)
