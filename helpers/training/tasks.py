"""What a training script tells the loop about its data (`Task`), and the pieces tasks are made
of: training-set augmentation, losses (single-label CE, multi-label BCE, OpenMIC's masked BCE,
MixStyle) and metrics.

Losses follow the spec: single-label tasks use cross-entropy with probability targets (mixing the
targets is the same as mixing the two losses, cross-entropy being linear in the target),
multi-label tasks binary cross-entropy on mixed targets, OpenMIC a BCE masked by its observation
mask.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from datasets.augment import GainDataset, RollDataset, WavMixDataset, mix_targets
from helpers.training.config import DataConfig
from helpers.training.metrics import accuracy, multilabel_metrics
from datasets.items import is_valid
from helpers.training.mixup import mix, mixup

LossFn = Callable[[torch.nn.Module, torch.Tensor, Any], Mapping[str, Any]]
MetricsFn = Callable[..., dict[str, float]]  # (logits, targets, mask=None) -> metrics
logger = logging.getLogger(__name__)


@dataclass
class Task:
    """What a script tells the loop about its data. `selection` names the metric (higher is
    better; ties go to the lower val_loss) that picks best.pt; `metric_tag` is its short form in
    the original's file names ("acc" or "mAP"); `keep_fn` drops rows of an evaluation batch
    (undecodable clips). `sampler`: the training sampler (it must split the data over ranks and
    have set_epoch; default: a shuffling DistributedSampler). `epoch_end(epoch, metrics)` runs on
    every process after each evaluation (metrics empty except on the main process) and returns
    extra values to log; `report` shows progress lines on the main process."""
    name: str
    class_names: list[str]
    multilabel: bool
    loss_fn: LossFn
    metrics_fn: MetricsFn
    selection: str
    metric_tag: str
    project: str
    tags: Sequence[str] = ()
    keep_fn: Optional[Callable[[Any], torch.Tensor]] = is_valid
    notes: str = ""
    sampler: Optional[Sampler] = None
    epoch_end: Optional[Callable[[int, dict[str, float]], dict[str, Any]]] = None
    report: Callable[[str], None] = logger.info


def augment_training_set(dataset: Dataset, data: DataConfig,
                         mix_target: Callable[[Any, Any, float], Any] = mix_targets) -> Dataset:
    """Training wrappers in the original's order: roll, gain, waveform mixing (as `data` switches
    them: the fine-tuning scripts' --no_roll, --gain_augment, --no_wavmix)."""
    if data.roll:
        dataset = RollDataset(dataset)
    if data.gain_augment > 0:
        dataset = GainDataset(dataset, data.gain_augment)
    if data.wavmix:
        dataset = WavMixDataset(dataset, mix_target=mix_target)
    return dataset


# ---------------------------------------------------------------- losses

def _mixed(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
           mixup_alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the (optionally mixed-up) batch and the equally mixed targets."""
    if mixup_alpha > 0:
        perm, lam = mixup(len(x), mixup_alpha)
        x, y = mix(x, perm, lam), mix(y, perm, lam)
    return model(x)[0].float(), y


def single_label_loss(mixup_alpha: float) -> LossFn:
    """Cross-entropy against (one-hot or mixed) probability targets, batch.target."""
    def loss_fn(model: torch.nn.Module, x: torch.Tensor, batch: Any) -> dict[str, torch.Tensor]:
        logits, y = _mixed(model, x, batch.target.float(), mixup_alpha)
        return {"loss": F.cross_entropy(logits, y)}
    return loss_fn


def multilabel_loss(mixup_alpha: float) -> LossFn:
    """Binary cross-entropy with logits against (mixed) multi-hot targets, batch.target."""
    def loss_fn(model: torch.nn.Module, x: torch.Tensor, batch: Any) -> dict[str, torch.Tensor]:
        logits, y = _mixed(model, x, batch.target.float(), mixup_alpha)
        return {"loss": F.binary_cross_entropy_with_logits(logits, y)}
    return loss_fn


def masked_multilabel_loss(mixup_alpha: float) -> LossFn:
    """OpenMIC: labels are the relevances batch.target > 0.5, mixed like the spectrograms; the
    BCE of entries unobserved in batch.mask counts 0 (the first clip's mask is used) and the mean
    runs over all entries."""
    def loss_fn(model: torch.nn.Module, x: torch.Tensor, batch: Any) -> dict[str, torch.Tensor]:
        mask = batch.mask.float()
        logits, y = _mixed(model, x, (batch.target.float() > 0.5).float(), mixup_alpha)
        loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return {"loss": (mask * loss).mean()}
    return loss_fn


def mixstyle(x: torch.Tensor, p: float, alpha: float) -> torch.Tensor:
    """Frequency-wise MixStyle (DCASE20): with probability p (one NumPy draw per batch) normalize
    every example per frequency bin by its mean and standard deviation over channels and time,
    then re-scale and shift with statistics mixed with those of a permuted example
    (lam ~ Beta(alpha, alpha) per example, torch RNG)."""
    if np.random.rand() > p:
        return x
    mu = x.mean(dim=(1, 3), keepdim=True).detach()
    sigma = (x.var(dim=(1, 3), keepdim=True) + 1e-6).sqrt().detach()
    lam = torch.distributions.Beta(alpha, alpha).sample((len(x), 1, 1, 1)).to(x.device, x.dtype)
    perm = torch.randperm(len(x), device=x.device)
    return (x - mu) / sigma * (lam * sigma + (1 - lam) * sigma[perm]) + lam * mu + (1 - lam) * mu[perm]


# ---------------------------------------------------------------- metrics

def classification_metrics(logits: torch.Tensor, targets: torch.Tensor,
                           mask: Optional[torch.Tensor] = None) -> dict[str, float]:
    """accuracy of the arg-max against the (one-hot) targets, and the mean cross-entropy
    (single-label data has no mask)."""
    return {"accuracy": accuracy(targets.numpy(), logits.numpy()),
            "val_loss": float(F.cross_entropy(logits, targets.float()))}


def tagging_metrics(logits: torch.Tensor, targets: torch.Tensor,
                    mask: Optional[torch.Tensor] = None) -> dict[str, float]:
    """mAP, ROC AUC and d' (helpers.training.metrics) and the mean binary cross-entropy; with a label
    mask see `masked_tagging_metrics`."""
    if mask is not None:
        return masked_tagging_metrics(logits, targets, mask)
    m = multilabel_metrics(targets.numpy(), logits.numpy())
    return {"mAP": m["mAP"], "ROC": m["ROC"], "d_prime": m["d_prime"],
            "val_loss": float(F.binary_cross_entropy_with_logits(logits, targets.float()))}


def masked_tagging_metrics(logits: torch.Tensor, targets: torch.Tensor,
                           mask: torch.Tensor) -> dict[str, float]:
    """OpenMIC: mAP / ROC of the binarized relevances against sigmoid outputs with the
    observation mask as sample weight, and the masked BCE."""
    relevance, mask = targets.float(), mask.float()
    m = multilabel_metrics(relevance.numpy(), torch.sigmoid(logits).numpy(), mask=mask.numpy())
    bce = F.binary_cross_entropy_with_logits(logits, (relevance > 0.5).float(), reduction="none")
    return {"mAP": m["mAP"], "ROC": m["ROC"], "d_prime": m["d_prime"],
            "val_loss": float((mask * bce).mean())}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
