"""probe_finetune: the fitted linear probe as the classifier, then a short fine-tuning of the whole
network with layer-wise learning rates, frozen BatchNorm statistics and early stopping."""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from helpers.training.clip_features import ClipSource, Embedder
from helpers.training.data import train_loader
from helpers.training.distributed import DistInfo
from helpers.training.linear_probe import as_logits, clip_probabilities
from helpers.training.loop import _better, train_one_epoch
from helpers.training.precision import Precision
from helpers.training.seeding import seed_epoch, seed_everything
from helpers.training.tasks import Task
from models.preprocess import AugmentMelSTFT

logger = logging.getLogger(__name__)


def head_logits(embedder: Embedder, clips: Sequence[ClipSource], multilabel: bool) -> torch.Tensor:
    """(clips, classes) logits of a model holding the probe as its head, as the probe predicts:
    the final layer on every crop's `pre_logits` features, probabilities averaged over a clip's
    crops (`as_logits` of them)."""
    layer = embedder.model.get_classifier()
    weight, bias = layer.weight.detach().cpu().float().numpy(), layer.bias.detach().cpu().float().numpy()
    return as_logits(clip_probabilities(embedder(clips, "head"), weight, bias, multilabel), multilabel)


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
    """probe_finetune's short schedule: AdamW with `lr` for the final layer (`layer_decay` less per
    group below it, `AudioTagger.param_groups`), a cosine decay over at most `epochs` epochs, and
    early stopping after `patience` epochs without a better validation score."""
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
    """Fine-tune the whole `model`, whose head holds the fitted probe, on `train_set` (BatchNorm
    statistics frozen, see `FrozenNorm`), validating after every epoch on `val_clips` as the probe
    is evaluated (`head_logits`, `window`, `n_crops`) with the task's metrics. The probe itself is
    scored first as epoch -1, so the result is never worse on the validation data than the probe.
    The model ends holding the weights of the best epoch, which is returned with one metrics dict
    per epoch (epoch, train_loss, the task's metrics, seconds)."""
    seed_everything(seed)
    net = FrozenNorm(model).to(dist.device)
    frontend = frontend.to(dist.device)
    optimizer = torch.optim.AdamW(model.param_groups(schedule.lr, schedule.layer_decay),
                                  weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / schedule.epochs)))
    train_dl = train_loader(train_set, schedule.batch_size, schedule.num_workers, dist, seed)
    eval_frontend = copy.deepcopy(frontend)

    def validate() -> dict[str, float]:
        embedder = Embedder(model, eval_frontend, window, n_crops, device=dist.device)
        return task.metrics_fn(head_logits(embedder, val_clips, task.multilabel), val_targets)

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
