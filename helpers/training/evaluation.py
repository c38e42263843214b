"""Evaluation: one pass over an evaluation set gathered from all ranks (`evaluate`), and the
model a script evaluates (a fine-tuned checkpoint, or the model its configuration names)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.errors import InputError
from helpers.training.config import TrainingConfig
from helpers.training.data import eval_loader
from helpers.training.distributed import DistInfo, broadcast_buffers, gather_cat, unwrap
from helpers.training.precision import Precision
from helpers.training.tasks import Task
from models.checkpoint import load_finetuned
from models.factory import model_from_config
from models.runtime import fast_inference
from models.preprocess import AugmentMelSTFT

logger = logging.getLogger(__name__)


class Predictions(NamedTuple):
    """Evaluation outputs in dataset order: logits (N, classes) float32, the targets and, for
    items with a label mask (OpenMIC), the masks (else None). `metrics_fn(*predictions)`."""
    logits: torch.Tensor
    targets: torch.Tensor
    mask: Optional[torch.Tensor]


def mel(frontend: nn.Module, waveforms: torch.Tensor) -> torch.Tensor:
    """Waveform batch (B, 1, L) (or (B, L)) -> spectrograms (B, 1, n_mels, T) for the models."""
    spec = frontend(waveforms.reshape(waveforms.shape[0], -1))
    return spec.unsqueeze(1)


@torch.no_grad()
def evaluate(model: nn.Module, frontend: nn.Module, loader: DataLoader, precision: Precision,
             dist: DistInfo, keep_fn: Optional[Callable[[Any], torch.Tensor]] = None,
             progress: bool = True) -> Predictions:
    """Run the whole evaluation set once (eval mode, autocast per `precision`) and return
    `Predictions` (logits as float32, batch.target, batch.mask where the items have one)
    concatenated over all ranks in dataset order, on the CPU. `keep_fn(batch)` (optional) returns
    a boolean mask of the rows to keep (e.g. `datasets.items.is_valid`: drop undecodable clips).
    The model runs unwrapped, so ranks with different shard lengths never wait for each other
    inside the loop; its buffers (BatchNorm statistics, which each rank updates on its own last
    batch) are first copied from rank 0, so every rank evaluates the model rank 0 saves."""
    net = unwrap(model)
    net.eval()
    frontend.eval()
    broadcast_buffers(net, dist)
    parts: list[list[torch.Tensor]] = []
    keep: list[torch.Tensor] = []
    for batch in tqdm(loader, desc="eval", disable=not (progress and dist.is_main),
                      dynamic_ncols=True, leave=False):
        with precision.autocast():
            logits = net(mel(frontend, batch.waveform.to(dist.device, non_blocking=True)))[0]
        fields = [logits.float(), torch.as_tensor(batch.target)]  # logits stay on the device
        if "mask" in batch._fields:
            fields.append(torch.as_tensor(batch.mask))
        parts.append(fields)
        keep.append(torch.ones(len(logits), dtype=torch.bool) if keep_fn is None
                    else torch.as_tensor(keep_fn(batch), dtype=torch.bool))
    if not parts:
        raise InputError("the evaluation loader yielded no batch (empty evaluation set?)")
    kept = torch.cat(keep)
    # the logits come to the host once, after the last batch
    gathered = [gather_cat(torch.cat(column).cpu()[kept], dist) for column in zip(*parts)]
    if len(gathered[0]) == 0:  # metrics of nothing would be NaN
        raise InputError(f"none of the {len(loader.dataset)} evaluation clips could be read "
                         "(see the warnings above)")
    return Predictions(*gathered) if len(gathered) == 3 else Predictions(*gathered, None)


def model_for_evaluation(checkpoint: Optional[str | Path], config: TrainingConfig, task: Task,
                         dist: DistInfo) -> tuple[torch.nn.Module, AugmentMelSTFT, str]:
    """(model, frontend, description) to evaluate: a fine-tuned checkpoint, checked against the
    task's classes, or without one (the original's evaluation mode) the model of the model
    flags (`config.model`) with an untrained classifier for the task's classes, which is logged as a warning.
    On the CPU in fp32 both are the eval-only fast copies (models/fast.py); under a reduced
    --precision the originals, as the training loop evaluates them: autocast rounds a folded
    convolution otherwise than the convolution and batch norm it replaces, so the fast copies
    would score other numbers than the epoch lines logged."""
    if checkpoint:
        model, frontend_config, class_names, _ = load_finetuned(checkpoint, probe_beside=True)
        if class_names != list(task.class_names):
            raise InputError(f"{checkpoint}: was trained on other classes ({len(class_names)}) than "
                             f"the {len(task.class_names)} of this dataset")
        title = str(checkpoint)
    else:
        model = model_from_config(config.model.to_dict(len(task.class_names)))
        logger.warning("no --checkpoint given: %s is evaluated with an untrained %d-class classifier",
                       config.model.name, len(task.class_names))
        frontend_config, title = config.frontend_settings(), config.model.name
    model, frontend = model.to(dist.device).eval(), AugmentMelSTFT(**frontend_config).to(dist.device).eval()
    if config.run.precision in (None, "fp32"):
        model, frontend = fast_inference(model, frontend)
    return model, frontend, title


def evaluate_model(model: torch.nn.Module, frontend: AugmentMelSTFT, dataset: Dataset, task: Task,
                   config: TrainingConfig, dist: DistInfo, batch_size: Optional[int] = None) -> dict[str, float]:
    """The task's metrics of `model` on `dataset` (empty dict on ranks other than the main one)."""
    predictions = predict(model, frontend, dataset, task, config, dist, batch_size)
    return task.metrics_fn(*predictions) if dist.is_main else {}


def predict(model: torch.nn.Module, frontend: AugmentMelSTFT, dataset: Dataset, task: Task,
            config: TrainingConfig, dist: DistInfo, batch_size: Optional[int] = None) -> Predictions:
    """`evaluate` over `dataset` with the run's batch size, workers, --precision and speed
    options (applied to `model` in place), dropping the rows `task.keep_fn` rejects."""
    loader_config = config.loader
    loader = eval_loader(dataset, batch_size or loader_config.batch_size, loader_config.num_workers, dist,
                         prefetch_factor=loader_config.prefetch_factor)
    return evaluate(config.speed.apply(model), frontend, loader, Precision(config.run.precision, dist.device),
                    dist, task.keep_fn)
