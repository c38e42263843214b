"""Fine-tuning a pre-trained (or fresh) MN / DyMN on a labelled dataset: what ex_esc50.py,
ex_fsd50k.py, ex_dcase20.py, ex_openmic.py and ex_custom.py share on top of `helpers.training`.

A script describes its dataset as a `Task` (class names, loss callback, metrics, wandb project)
and calls `fine_tune`, which runs the loop of the original scripts: per epoch the DyMN
temperature update, one training pass, the scheduler step, evaluation, logging and atomic
checkpoints. Each epoch writes

    <out_dir>/last.pt      training state (resume with --resume) that also rebuilds the model:
                           model configuration, frontend settings, class names, multilabel flag
    <out_dir>/best.pt      the same for the epoch with the best validation score so far
    <out_dir>/mn{w}_<task>_epoch_{e}_<metric>_{m}.pt   the latest weights alone, named as the
                           original names them
    <out_dir>/metrics.jsonl    one line per epoch: losses, metrics, learning rate, and the epoch's
                           wall-clock seconds (training alone and with evaluation) and the CPU
                           seconds of this process (which exclude DataLoader workers)

Losses follow the spec: single-label tasks use cross-entropy with probability targets (mixing the
targets is the same as mixing the two losses, cross-entropy being linear in the target),
multi-label tasks binary cross-entropy on mixed targets, OpenMIC a BCE masked by its observation
mask.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F
from torch.utils.data import Dataset

from datasets.augment import GainDataset, RollDataset, WavMixDataset, mix_targets
from helpers.common.errors import InputError
from helpers.metrics import accuracy, multilabel_metrics
from helpers.training import (DistInfo, LossFn, Precision, RunLogger, add_model_args, add_optimizer_args,
                              add_preprocessing_args, add_run_args, save_epoch_weights, eval_loader, evaluate,
                              frontend_config_from_args, load_checkpoint, load_finetuned, make_optimizer,
                              make_scheduler, mix, mixup, model_config_from_args, model_from_config,
                              restore_training_state, save_checkpoint, seed_epoch, seed_everything,
                              train_loader, train_one_epoch, training_state, unwrap, wrap_ddp)
from models.preprocess import AugmentMelSTFT

logger = logging.getLogger(__name__)

MetricsFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


# ---------------------------------------------------------------- arguments and augmentation

class _PretrainedName(argparse.Action):
    """--pretrained_name NAME: the same as --pretrained --model_name NAME."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        namespace.model_name, namespace.pretrained = values, True


def finetune_parser(description: str, experiment_name: str, batch_size: int, lr: float,
                    dataset_env: str) -> argparse.ArgumentParser:
    """The arguments every fine-tuning script has, with the original's defaults where the scripts
    differ (run name, batch size, learning rate) and where they agree (80 epochs, warm-up 10,
    ramp-down from epoch 10 over 65 epochs, gain 12 dB, roll and waveform mixing on): the
    `helpers.training` groups (run, model, optimization, preprocessing), --pretrained_name, and
    the fine-tuning data group: --cache_path, --no_roll, --no_wavmix, --gain_augment and
    --checkpoint (evaluate a fine-tuned checkpoint instead of training)."""
    parser = argparse.ArgumentParser(description=description)
    add_run_args(parser, experiment_name=experiment_name, batch_size=batch_size, dataset_env=dataset_env)
    add_model_args(parser)
    parser.add_argument("--pretrained_name", action=_PretrainedName, metavar="NAME",
                        help="start from the released weights NAME (= --pretrained --model_name NAME)")
    add_optimizer_args(parser, lr=lr, n_epochs=80, warm_up_len=10, ramp_down_start=10, ramp_down_len=65)
    add_preprocessing_args(parser)
    g = parser.add_argument_group("fine-tuning data")
    g.add_argument("--cache_path", type=str, default=None,
                   help="folder for decoded, resampled waveforms (later epochs skip decoding)")
    g.add_argument("--no_roll", action="store_true", help="no random time shift of the waveforms")
    g.add_argument("--no_wavmix", action="store_true", help="no waveform mixing of training clips")
    g.add_argument("--gain_augment", type=int, default=12, help="random gain range in dB (0 disables)")
    g.add_argument("--checkpoint", type=str, default=None,
                   help="evaluate this fine-tuned checkpoint (best.pt / last.pt) instead of training")
    return parser


def sample_rate(args: argparse.Namespace) -> int:
    """The rate to load clips at: that of --checkpoint's frontend when evaluating one, else the
    frontend the arguments describe."""
    if args.checkpoint:
        settings = load_checkpoint(args.checkpoint, mmap=True).get("frontend_config", {})
        return int(settings.get("sr", 32000))
    return int(frontend_config_from_args(args)["sr"])


def augment_training_set(dataset: Dataset, args: argparse.Namespace,
                         mix_target: Callable[[Any, Any, float], Any] = mix_targets) -> Dataset:
    """Training wrappers in the original's order: roll, gain, waveform mixing (as switched by the
    `finetune_parser` flags)."""
    if not args.no_roll:
        dataset = RollDataset(dataset)
    if args.gain_augment > 0:
        dataset = GainDataset(dataset, args.gain_augment)
    if not args.no_wavmix:
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
    """Cross-entropy against (one-hot or mixed) probability targets, batch[2]."""
    def loss_fn(model: torch.nn.Module, x: torch.Tensor, batch: Sequence[Any]) -> dict[str, torch.Tensor]:
        logits, y = _mixed(model, x, batch[2].float(), mixup_alpha)
        return {"loss": F.cross_entropy(logits, y)}
    return loss_fn


def multilabel_loss(mixup_alpha: float) -> LossFn:
    """Binary cross-entropy with logits against (mixed) multi-hot targets, batch[2]."""
    def loss_fn(model: torch.nn.Module, x: torch.Tensor, batch: Sequence[Any]) -> dict[str, torch.Tensor]:
        logits, y = _mixed(model, x, batch[2].float(), mixup_alpha)
        return {"loss": F.binary_cross_entropy_with_logits(logits, y)}
    return loss_fn


def masked_multilabel_loss(mixup_alpha: float, num_classes: int) -> LossFn:
    """OpenMIC: targets batch[2] hold relevances then the observation mask; labels are the
    relevances > 0.5, mixed like the spectrograms; the BCE of unobserved entries counts 0 (the
    first clip's mask is used) and the mean runs over all entries."""
    def loss_fn(model: torch.nn.Module, x: torch.Tensor, batch: Sequence[Any]) -> dict[str, torch.Tensor]:
        target = batch[2].float()
        mask = target[:, num_classes:]
        logits, y = _mixed(model, x, (target[:, :num_classes] > 0.5).float(), mixup_alpha)
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

def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """accuracy of the arg-max against the (one-hot) targets, and the mean cross-entropy."""
    return {"accuracy": accuracy(targets.numpy(), logits.numpy()),
            "val_loss": float(F.cross_entropy(logits, targets.float()))}


def tagging_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """mAP, ROC AUC and d' (helpers.metrics) and the mean binary cross-entropy."""
    m = multilabel_metrics(targets.numpy(), logits.numpy())
    return {"mAP": m["mAP"], "ROC": m["ROC"], "d_prime": m["d_prime"],
            "val_loss": float(F.binary_cross_entropy_with_logits(logits, targets.float()))}


def masked_tagging_metrics(num_classes: int) -> MetricsFn:
    """OpenMIC: mAP / ROC of the binarized relevances against sigmoid outputs with the
    observation mask as sample weight, and the masked BCE."""
    def metrics_fn(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        relevance, mask = targets[:, :num_classes].float(), targets[:, num_classes:].float()
        m = multilabel_metrics(relevance.numpy(), torch.sigmoid(logits).numpy(), mask=mask.numpy())
        bce = F.binary_cross_entropy_with_logits(logits, (relevance > 0.5).float(), reduction="none")
        return {"mAP": m["mAP"], "ROC": m["ROC"], "d_prime": m["d_prime"],
                "val_loss": float((mask * bce).mean())}
    return metrics_fn


# ---------------------------------------------------------------- the loop

@dataclass
class Task:
    """What a fine-tuning script tells `fine_tune` about its dataset. `selection` names the
    metric (higher is better; ties go to the lower val_loss) that picks best.pt; `metric_tag` is
    its short form in the original's file names ("acc" or "mAP"); `keep_fn` drops rows of an
    evaluation batch (undecodable clips)."""
    name: str
    class_names: list[str]
    multilabel: bool
    loss_fn: LossFn
    metrics_fn: MetricsFn
    selection: str
    metric_tag: str
    project: str
    tags: Sequence[str] = ()
    target_index: int = 2
    keep_fn: Optional[Callable[[Sequence[Any]], torch.Tensor]] = None
    notes: str = ""


@dataclass
class Result:
    """Metrics of the last epoch and of the best epoch, and where the checkpoints are."""
    last: dict[str, float]
    best: dict[str, float]
    best_epoch: int
    out_dir: Path
    checkpoints: dict[str, Path] = field(default_factory=dict)


def _better(metrics: dict[str, float], best: dict[str, float], selection: str) -> bool:
    """Higher `selection` metric wins; a tie goes to the lower validation loss."""
    return (metrics[selection], -metrics["val_loss"]) > (best[selection], -best["val_loss"])


def _checkpoint(model, optimizer, scheduler, precision, epoch: int, args: argparse.Namespace,
                model_config: dict, frontend_config: dict, task: Task,
                metrics: dict[str, float]) -> dict[str, Any]:
    state = training_state(model, optimizer, scheduler, precision, epoch, args.seed, vars(args),
                           model_config, frontend_config, task.class_names, metrics)
    return {**state, "multilabel": task.multilabel, "task": task.name}


def fine_tune(args: argparse.Namespace, task: Task, train_set: Dataset, val_set: Dataset,
              dist: DistInfo, out_dir: Path, eval_batch_size: Optional[int] = None) -> Result:
    """Train for args.n_epochs on `train_set`, evaluating on `val_set` after every epoch; see the
    module docstring for the files written. With --resume the run continues from
    <out_dir>/last.pt (or the given file)."""
    seed_everything(args.seed)
    model_config = model_config_from_args(args, num_classes=len(task.class_names))
    frontend_config = frontend_config_from_args(args)
    model = wrap_ddp(model_from_config(model_config).to(dist.device), dist)
    frontend = AugmentMelSTFT(**frontend_config).to(dist.device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.adamw)
    scheduler = make_scheduler(optimizer, args)
    precision = Precision(args.precision, dist.device)
    train_dl = train_loader(train_set, args.batch_size, args.num_workers, dist, args.seed)
    val_dl = eval_loader(val_set, eval_batch_size or args.batch_size, args.num_workers, dist)
    paths = {"last": out_dir / "last.pt", "best": out_dir / "best.pt"}

    start, last, best, best_epoch = 0, {}, {}, -1
    if args.resume:
        resume_path = paths["last"] if args.resume == "auto" else Path(args.resume)
        state = load_checkpoint(resume_path)
        start = restore_training_state(state, model, optimizer, scheduler, precision, args.seed)
        last = dict(state["metrics"])
        if paths["best"].is_file():
            best_state = load_checkpoint(paths["best"])
            best, best_epoch = dict(best_state["metrics"]), int(best_state["epoch"])
        logger.info("resumed from %s after epoch %d", resume_path, start - 1)
    run = RunLogger(args.logger, task.project, args.experiment_name, vars(args), out_dir, dist,
                    tags=task.tags, notes=task.notes)
    for epoch in range(start, args.n_epochs):
        seed_epoch(args.seed, epoch, dist.rank)
        if model_config["family"] == "dymn":
            unwrap(model).update_params(epoch)
        started, cpu_started = time.perf_counter(), time.process_time()
        stats = train_one_epoch(model, frontend, train_dl, optimizer, task.loss_fn, precision, dist, epoch)
        scheduler.step()
        trained = time.perf_counter()
        logits, targets = evaluate(model, frontend, val_dl, precision, dist, task.target_index, task.keep_fn)
        if not dist.is_main:
            continue
        last = task.metrics_fn(logits, targets)
        run.log({"train_loss": stats["loss"], "learning_rate": optimizer.param_groups[0]["lr"], **last,
                 "train_seconds": trained - started, "epoch_seconds": time.perf_counter() - started,
                 "cpu_seconds": time.process_time() - cpu_started},
                step=epoch)
        logger.info("epoch %d: train_loss %.4f, %s", epoch, stats["loss"],
                    ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
        state = _checkpoint(model, optimizer, scheduler, precision, epoch, args, model_config,
                            frontend_config, task, last)
        save_checkpoint(paths["last"], state)
        if best_epoch < 0 or _better(last, best, task.selection):
            best, best_epoch = last, epoch
            save_checkpoint(paths["best"], state)
        save_epoch_weights(out_dir, model, model_config["width_mult"], task.name, epoch, task.metric_tag,
                           last[task.selection])
    run.finish()
    if dist.distributed:  # the other ranks may read the checkpoints the main process wrote
        torch.distributed.barrier()
    return Result(last, best, best_epoch, out_dir, paths)


def model_for_evaluation(checkpoint: Optional[str | Path], args: argparse.Namespace, task: Task,
                         dist: DistInfo) -> tuple[torch.nn.Module, AugmentMelSTFT, str]:
    """(model, frontend, description) to evaluate: a fine-tuned checkpoint, checked against the
    task's classes, or without one (the original's evaluation mode) the model of the model
    arguments with an untrained classifier for the task's classes, which is logged as a warning."""
    if checkpoint:
        model, frontend_config, class_names, _ = load_finetuned(checkpoint)
        if class_names != list(task.class_names):
            raise InputError(f"{checkpoint}: was trained on other classes ({len(class_names)}) than "
                             f"the {len(task.class_names)} of this dataset")
        return model.to(dist.device), AugmentMelSTFT(**frontend_config).to(dist.device), str(checkpoint)
    model = model_from_config(model_config_from_args(args, num_classes=len(task.class_names)))
    logger.warning("no --checkpoint given: %s is evaluated with an untrained %d-class classifier",
                   args.model_name, len(task.class_names))
    return (model.to(dist.device), AugmentMelSTFT(**frontend_config_from_args(args)).to(dist.device),
            args.model_name)


def evaluate_model(model: torch.nn.Module, frontend: AugmentMelSTFT, dataset: Dataset, task: Task,
                   args: argparse.Namespace, dist: DistInfo, batch_size: Optional[int] = None) -> dict[str, float]:
    """The task's metrics of `model` on `dataset` (empty dict on ranks other than the main one)."""
    loader = eval_loader(dataset, batch_size or args.batch_size, args.num_workers, dist)
    logits, targets = evaluate(model, frontend, loader, Precision(args.precision, dist.device), dist,
                               task.target_index, task.keep_fn)
    return task.metrics_fn(logits, targets) if dist.is_main else {}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0

