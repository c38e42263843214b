"""Metrics against scikit-learn on the same predictions."""
from __future__ import annotations

import math
import warnings
from statistics import NormalDist

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from helpers.training import metrics as M


def _data(seed=0, n=60, c=12):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < 0.2).astype(np.float32)
    targets[:, 3] = 0  # no positives
    targets[:, 4] = 1  # no negatives
    scores = rng.normal(size=(n, c)) + 1.5 * targets
    return targets, scores


def test_multilabel_metrics_equal_sklearn_over_defined_classes():
    targets, scores = _data()
    out = M.multilabel_metrics(targets, scores)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = average_precision_score(targets, scores, average=None)
        auc = roc_auc_score(targets, scores, average=None)
    has_pos = targets.sum(0) > 0
    both = has_pos & (targets.sum(0) < len(targets))
    assert out["mAP"] == pytest.approx(ap[has_pos].mean(), abs=1e-12)
    assert out["ROC"] == pytest.approx(auc[both].mean(), abs=1e-12)
    assert out["ap_classes"] == 11 and out["roc_classes"] == 10
    assert out["d_prime"] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(out["ROC"]))
    # where every class is defined, the means are scikit-learn's macro averages
    full = targets[:, [c for c in range(12) if c not in (3, 4)]]
    s = scores[:, [c for c in range(12) if c not in (3, 4)]]
    out = M.multilabel_metrics(full, s)
    assert out["mAP"] == pytest.approx(average_precision_score(full, s, average="macro"), abs=1e-12)
    assert out["ROC"] == pytest.approx(roc_auc_score(full, s, average="macro"), abs=1e-12)


def test_logits_and_probabilities_give_the_same_values():
    targets, scores = _data(1)
    a = M.multilabel_metrics(targets, scores)
    b = M.multilabel_metrics(targets, 1 / (1 + np.exp(-scores)))
    assert a == pytest.approx(b)


def test_masked_metrics_equal_sklearn_with_sample_weight():
    targets, scores = _data(2)
    mask = (np.random.default_rng(3).random(targets.shape) < 0.7).astype(np.float32)
    ap = M.per_class_average_precision(targets, scores, mask)
    auc = M.per_class_roc_auc(targets, scores, mask)
    for c in (0, 5, 9):
        assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c],
                                                              sample_weight=mask[:, c]))
        assert auc[c] == pytest.approx(roc_auc_score(targets[:, c], scores[:, c], sample_weight=mask[:, c]))
    assert np.isnan(ap[3]) and np.isnan(auc[4])


def test_d_prime_values():
    assert M.d_prime(0.5) == 0.0
    assert M.d_prime(0.98) == pytest.approx(2.9044, abs=1e-4)
    assert M.d_prime(1.0) == math.inf and math.isnan(M.d_prime(math.nan))


def test_accuracy_labels_and_one_hot():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert M.accuracy(np.array([0, 1, 1]), logits) == pytest.approx(2 / 3)
    assert M.accuracy(np.eye(2)[[0, 1, 1]], logits) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        M.accuracy(np.array([0, 1]), logits)


def test_shape_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        M.multilabel_metrics(np.zeros((3, 2)), np.zeros((3, 3)))
