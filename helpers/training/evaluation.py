"""Evaluation: one pass over an evaluation set gathered from all ranks (`evaluate`), and the
model a script evaluates (a fine-tuned checkpoint, or the model arguments' model)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.errors import InputError
from helpers.training.args import apply_speed_options, frontend_config_from_args, model_config_from_args
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
    return Predictions(*gathered) if len(gathered) == 3 else Predictions(*gathered, None)


def model_for_evaluation(checkpoint: Optional[str | Path], args: argparse.Namespace, task: Task,
                         dist: DistInfo) -> tuple[torch.nn.Module, AugmentMelSTFT, str]:
    """(model, frontend, description) to evaluate: a fine-tuned checkpoint, checked against the
    task's classes, or without one (the original's evaluation mode) the model of the model
    arguments with an untrained classifier for the task's classes, which is logged as a warning.
    On the CPU both are the eval-only fast copies (models/fast.py)."""
    if checkpoint:
        model, frontend_config, class_names, _ = load_finetuned(checkpoint)
        if class_names != list(task.class_names):
            raise InputError(f"{checkpoint}: was trained on other classes ({len(class_names)}) than "
                             f"the {len(task.class_names)} of this dataset")
        return (*fast_inference(model.to(dist.device), AugmentMelSTFT(**frontend_config).to(dist.device)),
                str(checkpoint))
    model = model_from_config(model_config_from_args(args, num_classes=len(task.class_names)))
    logger.warning("no --checkpoint given: %s is evaluated with an untrained %d-class classifier",
                   args.model_name, len(task.class_names))
    frontend = AugmentMelSTFT(**frontend_config_from_args(args)).to(dist.device)
    return (*fast_inference(model.to(dist.device), frontend), args.model_name)


def evaluate_model(model: torch.nn.Module, frontend: AugmentMelSTFT, dataset: Dataset, task: Task,
                   args: argparse.Namespace, dist: DistInfo, batch_size: Optional[int] = None) -> dict[str, float]:
    """The task's metrics of `model` on `dataset` (empty dict on ranks other than the main one)."""
    predictions = predict(model, frontend, dataset, task, args, dist, batch_size)
    return task.metrics_fn(*predictions) if dist.is_main else {}


def predict(model: torch.nn.Module, frontend: AugmentMelSTFT, dataset: Dataset, task: Task,
            args: argparse.Namespace, dist: DistInfo, batch_size: Optional[int] = None) -> Predictions:
    """`evaluate` over `dataset` with the script's batch size, workers, --precision and speed
    options (applied to `model` in place), dropping the rows `task.keep_fn` rejects."""
    loader = eval_loader(dataset, batch_size or args.batch_size, args.num_workers, dist,
                         prefetch_factor=args.prefetch_factor)
    return evaluate(apply_speed_options(model, args), frontend, loader, Precision(args.precision, dist.device),
                    dist, task.keep_fn)
