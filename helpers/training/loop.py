"""The one training loop every `ex_*.py` script runs (AudioSet distillation and fine-tuning).

A script describes its data as a `helpers.training.tasks.Task` (class names, loss callback,
metrics, wandb project; optionally a training sampler and an end-of-epoch hook) and calls
`fine_tune(config, task, train_set, val_set, dist, out_dir)` with the run's typed configuration
(`helpers.training.config.TrainingConfig`). Per epoch: re-seed from (seed, epoch,
rank), the model's `update_params(epoch)` (DyMN temperature), one training pass, the scheduler
step, evaluation on all ranks, the task's hook, logging and atomic checkpoints:

    <out_dir>/last.pt      training state (resume with --resume) that also rebuilds the model:
                           model configuration, frontend settings, class names, multilabel flag
    <out_dir>/best.pt      the same for the epoch with the best validation score so far
    <out_dir>/mn{w}_<task>_epoch_{e}_<metric>_{m}.pt   the latest weights alone, named as the
                           original names them
    <out_dir>/metrics.jsonl    one line per epoch: losses, metrics, learning rate, the hook's
                           values, and the epoch's wall-clock seconds (training alone and with
                           evaluation) and the CPU seconds of this process (without DataLoader workers)

An epoch is committed by writing last.pt (a `models.checkpoint.RunRecord` that also holds the
best epoch so far, the epoch's log line and the name of its weight file); best.pt, the weight
file and the metrics line follow, and `--resume` redoes whichever a kill cut short. The run folder
is locked while a run writes into it (`common.files.lock_folder`). A NaN or infinite loss stops
the run (`TrainingDiverged`) before anything non-finite is saved.

The loss callback receives the model, the spectrogram batch (B, 1, n_mels, T) and the loader's
batch (a NamedTuple of `datasets.items`, tensors already on the device) and returns a dict holding
the scalar "loss" to minimize and any other values to average and log.

Errors in the user's input raise common.errors.InputError; scripts wrap `main` in
common.errors.run_cli to turn them into one line on stderr and exit status 2.

Reproducibility: `seed_epoch` re-seeds Python, NumPy and torch at the start of every epoch from
(seed, epoch, rank); samplers draw from (seed, epoch); DataLoader workers derive their seeds from
the loader's base seed (`worker_init_fn`). An epoch's randomness therefore depends only on those
numbers, so a run resumed from an epoch checkpoint repeats the uninterrupted run exactly.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.errors import InputError
from common.files import unlock_folder
from helpers.training.config import TrainingConfig
from helpers.training.checkpoints import (RUN_FILES, check_resumable, epoch_weights_name, prepare_run_folder,
                                          restore_training_state, save_epoch_weights, training_record)
from helpers.training.data import eval_loader, train_loader
from helpers.training.distributed import DistInfo, all_reduce_mean, unwrap, wrap_ddp
from helpers.training.evaluation import evaluate, mel
from helpers.training.precision import Precision
from helpers.training.run_log import RunLogger
from helpers.training.schedule import make_optimizer, make_scheduler
from helpers.training.seeding import seed_epoch, seed_everything
from helpers.training.tasks import LossFn, Task
from models.checkpoint import RunRecord, read_run_record, save_run_record
from models.factory import model_from_config
from models.preprocess import AugmentMelSTFT

log = logging.getLogger(__name__)


class TrainingDiverged(InputError):
    """The loss or the model's outputs became NaN or infinite (a learning rate too high, ...)."""


def _to_device(batch: Any, device: torch.device) -> Any:
    """The batch (a NamedTuple of `datasets.items`) with its tensors on `device`."""
    return batch._replace(**{k: v.to(device, non_blocking=True) for k, v in batch._asdict().items()
                             if isinstance(v, torch.Tensor)})


def train_step(model: nn.Module, frontend: nn.Module, batch: Any, optimizer: torch.optim.Optimizer,
               loss_fn: LossFn, precision: Precision, device: torch.device) -> dict[str, Any]:
    """One training step on a loader batch: to `device`, spectrograms and `loss_fn` under
    autocast, backward and optimizer step; returns `loss_fn`'s dict. It reads nothing back from
    the device, so the host can queue the next steps while the GPU works (with fp16, the
    GradScaler's overflow check stays on the device when the optimizer is fused)."""
    batch = _to_device(batch, device)
    with precision.autocast():
        out = loss_fn(model, mel(frontend, batch.waveform), batch)
    precision.step(out["loss"], optimizer)
    return out


def train_one_epoch(model: nn.Module, frontend: nn.Module, loader: DataLoader,
                    optimizer: torch.optim.Optimizer, loss_fn: LossFn, precision: Precision,
                    dist: DistInfo, epoch: int, progress: bool = True) -> dict[str, float]:
    """One pass over `loader` in train mode (model and frontend). For each batch (a NamedTuple
    with a `waveform` field): spectrograms under autocast, `loss_fn(model, x, batch)` ->
    {"loss": tensor, ...}, backward and step. Returns the mean over batches of every returned value, averaged over ranks.
    Calls the sampler's set_epoch(epoch) first when it has one."""
    model.train()
    frontend.train()
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    sums: dict[str, Any] = defaultdict(float)  # device tensors: no GPU sync per batch
    batches = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not (progress and dist.is_main),
               dynamic_ncols=True, leave=False)
    for batch in bar:
        out = train_step(model, frontend, batch, optimizer, loss_fn, precision, dist.device)
        for key, value in out.items():
            sums[key] += value.detach().float() if isinstance(value, torch.Tensor) else value
        batches += 1
        if batches % 10 == 1 or dist.device.type == "cpu":  # reading the loss waits for the GPU
            _check_finite(float(sums["loss"]), epoch, batches)  # a non-finite loss stays in the sum
            if not bar.disable:
                bar.set_postfix(loss=f"{float(sums['loss']) / batches:.4f}")
    if batches == 0:
        raise InputError("the training loader yielded no batch (empty training set?)")
    _check_finite(float(sums["loss"]), epoch, batches)
    return all_reduce_mean({k: float(v) / batches for k, v in sums.items()}, dist)


def _check_finite(loss_sum: float, epoch: int, batches: int) -> None:
    """TrainingDiverged once the running loss sum is NaN or infinite: every later step would
    train NaN weights."""
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(f"training diverged: the loss became {loss_sum} in epoch {epoch} (by batch "
                               f"{batches}); try a lower --lr")


@dataclass
class Result:
    """Metrics of the last epoch and of the best epoch, and where the checkpoints are."""
    last: dict[str, float]
    best: dict[str, float]
    best_epoch: int
    out_dir: Path
    checkpoints: dict[str, Path] = field(default_factory=dict)


@dataclass
class Run:
    """What one training run holds: model (DDP-wrapped on several processes), frontend,
    optimizer, schedule, precision, loaders and the configurations stored in checkpoints."""
    model: nn.Module
    frontend: AugmentMelSTFT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    train_dl: DataLoader
    val_dl: DataLoader
    model_config: dict[str, Any]
    frontend_config: dict[str, Any]


def _better(metrics: dict[str, float], best: dict[str, float], selection: str) -> bool:
    """Whether `metrics` beat the best epoch's: higher `selection` metric wins, a tie goes to the
    lower validation loss; a NaN never wins."""
    def key(m: dict[str, float]) -> tuple[float, ...]:
        return tuple(-math.inf if math.isnan(v) else v for v in (m[selection], -m["val_loss"]))
    return key(metrics) > key(best)


def make_model(config: TrainingConfig, num_classes: int) -> tuple[dict[str, Any], nn.Module]:
    """(model configuration, model) of the run's model for `num_classes` classes; a model the
    flags cannot build (unknown name, conflicting settings) is an InputError."""
    try:
        model_config = config.model.to_dict(num_classes)
        return model_config, model_from_config(model_config)
    except ValueError as e:
        raise InputError(str(e)) from None


def build_run(config: TrainingConfig, task: Task, train_set: Dataset, val_set: Dataset, dist: DistInfo,
              eval_batch_size: Optional[int] = None) -> Run:
    """Model (`make_model`), frontend, optimizer (--lr), schedule, precision and loaders of
    the run's configuration."""
    seed_everything(config.run.seed)
    model_config, model = make_model(config, len(task.class_names))
    model = wrap_ddp(config.speed.apply(model.to(dist.device)), dist)
    frontend_config = config.frontend_settings()
    optim, loader = config.optim, config.loader
    optimizer = make_optimizer(model, optim.lr, optim.weight_decay, optim.adamw, fused=dist.device.type == "cuda")
    loader_options = {"persistent_workers": loader.persistent_workers, "prefetch_factor": loader.prefetch_factor}
    return Run(model, AugmentMelSTFT(**frontend_config).to(dist.device), optimizer,
               make_scheduler(optimizer, optim), Precision(config.run.precision, dist.device),
               train_loader(train_set, loader.batch_size, loader.num_workers, dist, config.run.seed, task.sampler,
                            **loader_options),
               eval_loader(val_set, eval_batch_size or loader.batch_size, loader.num_workers, dist, **loader_options),
               model_config, frontend_config)


def _resume(config: TrainingConfig, run: Run, task: Task, out_dir: Path) -> tuple[int, Optional[RunRecord], Path]:
    """(first epoch, the record resumed from, its folder), from --resume's checkpoint if given."""
    resume = config.run.resume
    if not resume:
        return 0, None, out_dir
    resume_path = out_dir / "last.pt" if resume == "auto" else Path(resume)
    if resume == "auto" and not any((out_dir / name).exists() for name in RUN_FILES):
        # e.g. a fold of --all_folds that an interruption kept from starting
        log.warning("--resume: %s holds no run yet; starting it from epoch 0", out_dir)
        return 0, None, out_dir
    record = read_run_record(resume_path)
    check_resumable(record, resume_path, config.flags, run.model_config, task.class_names)
    start = restore_training_state(record, run.model, run.optimizer, run.scheduler, run.precision, config.run.seed)
    if start >= config.optim.n_epochs and resume_path.resolve().parent != out_dir.resolve():
        raise InputError(f"{resume_path}: that run has finished its {start} epochs, and its models are in "
                         f"{resume_path.parent}, not --out_dir {out_dir}; raise --n_epochs to train it further")
    task.report(f"resumed from {resume_path} after epoch {start - 1}")
    return start, record, resume_path.parent


def _finish_commit(out_dir: Path, record: RunRecord, source: Path, logger: RunLogger) -> Optional[dict[str, Any]]:
    """Redo what follows last.pt in an epoch's commit (`_commit_epoch`), which a kill may have cut
    short or which another --out_dir lacks: best.pt, the epoch weights, metrics.jsonl's lines.
    Returns the best epoch so far (epoch and metrics)."""
    best_path = out_dir / "best.pt"
    best = record.best
    if best is None and best_path.is_file():  # a record of an earlier version
        earlier = read_run_record(best_path, mmap=True)
        best = {"epoch": earlier.epoch, "metrics": earlier.metrics}
    best = best or {"epoch": record.epoch, "metrics": record.metrics}
    if not best_path.is_file() or read_run_record(best_path, mmap=True).epoch != best["epoch"]:
        source_best = source / "best.pt"
        if best["epoch"] == record.epoch:
            save_run_record(best_path, record)
        elif source_best.is_file() and read_run_record(source_best, mmap=True).epoch == best["epoch"]:
            save_run_record(best_path, read_run_record(source_best))
        else:
            log.warning("%s of epoch %d is missing: it now holds the last epoch, %d", best_path,
                        best["epoch"], record.epoch)
            best = {"epoch": record.epoch, "metrics": record.metrics}
            save_run_record(best_path, record)
    if record.epoch_weights:
        save_epoch_weights(out_dir, record, only_if_missing=True)
    logger.align(record.epoch, record.log)
    return best


def _commit_epoch(out_dir: Path, record: RunRecord, logger: RunLogger) -> None:
    """Write an epoch's files. last.pt is the commit: what follows it (best.pt when this epoch is
    the best, the epoch weights, the metrics line) is redone by `_finish_commit` on resume."""
    save_run_record(out_dir / "last.pt", record)
    if record.best["epoch"] == record.epoch:
        save_run_record(out_dir / "best.pt", record)
    save_epoch_weights(out_dir, record)
    logger.log(record.log, step=record.epoch)


def _train_epoch(run: Run, task: Task, seed: int, dist: DistInfo,
                 epoch: int) -> tuple[dict[str, float], dict[str, Any]]:
    """One epoch: seed, model settings, training pass, schedule step, evaluation, the task's
    metrics (main process) and hook (all processes). Returns (metrics, values to log)."""
    seed_epoch(seed, epoch, dist.rank)
    unwrap(run.model).update_params(epoch)
    started, cpu_started = time.perf_counter(), time.process_time()
    stats = train_one_epoch(run.model, run.frontend, run.train_dl, run.optimizer, task.loss_fn, run.precision,
                            dist, epoch)
    run.scheduler.step()
    trained = time.perf_counter()
    predictions = evaluate(run.model, run.frontend, run.val_dl, run.precision, dist, task.keep_fn)
    if not torch.isfinite(predictions.logits).all():
        raise TrainingDiverged(f"training diverged: the model's outputs are NaN or infinite after epoch "
                               f"{epoch} (training loss {stats['loss']:.4g}); try a lower --lr")
    metrics = task.metrics_fn(*predictions) if dist.is_main else {}
    if dist.is_main:
        task.report(f"epoch {epoch}: train_loss {stats['loss']:.4f}, "
                    + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    extra = task.epoch_end(epoch, metrics) if task.epoch_end is not None else {}
    losses = {k: v for k, v in stats.items() if k != "loss"}
    return metrics, {"train_loss": stats["loss"], **losses, "learning_rate": run.optimizer.param_groups[0]["lr"],
            **metrics, **extra, "train_seconds": trained - started,
            "epoch_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started}


def fine_tune(config: TrainingConfig, task: Task, train_set: Dataset, val_set: Dataset,
              dist: DistInfo, out_dir: Path, eval_batch_size: Optional[int] = None) -> Result:
    """Train for --n_epochs on `train_set`, evaluating on `val_set` after every epoch; see the
    module docstring for the files written. With --resume the run continues from
    <out_dir>/last.pt (or the given file). The run folder is locked while it runs."""
    prepare_run_folder(out_dir, config.run.resume, config.run.overwrite, dist.is_main)
    try:
        return _fine_tune(config, task, train_set, val_set, dist, out_dir, eval_batch_size)
    finally:
        unlock_folder(out_dir)


def _fine_tune(config: TrainingConfig, task: Task, train_set: Dataset, val_set: Dataset,
               dist: DistInfo, out_dir: Path, eval_batch_size: Optional[int]) -> Result:
    run = build_run(config, task, train_set, val_set, dist, eval_batch_size)
    start, record, source = _resume(config, run, task, out_dir)
    logger = RunLogger(config.run.logger, task.project, config.run.experiment_name, config.flags, out_dir, dist,
                       tags=task.tags, notes=task.notes)
    best = _finish_commit(out_dir, record, source, logger) if record is not None and dist.is_main else None
    last = record.metrics if record is not None else {}
    seed = config.run.seed
    for epoch in range(start, config.optim.n_epochs):
        try:
            last, values = _train_epoch(run, task, seed, dist, epoch)
        except TrainingDiverged as e:
            kept = f"{out_dir / 'last.pt'} keeps epoch {epoch - 1}" if epoch > 0 else "nothing was saved"
            raise TrainingDiverged(f"{e}; {kept}") from None
        if not dist.is_main:
            continue
        if best is None or _better(last, best["metrics"], task.selection):
            best = {"epoch": epoch, "metrics": last}
        weights = epoch_weights_name(run.model_config, task.name, epoch, task.metric_tag,
                                     last[task.selection])
        record = training_record(run.model, run.optimizer, run.scheduler, run.precision, epoch, seed,
                                 config.flags, run.model_config, run.frontend_config, task.class_names, last,
                                 multilabel=task.multilabel, task=task.name, best=best, log=values,
                                 epoch_weights=weights, stale_weights=record.epoch_weights if record else None)
        _commit_epoch(out_dir, record, logger)
    logger.finish()
    if dist.distributed:  # the other ranks may read the checkpoints the main process wrote
        torch.distributed.barrier()
    paths = {"last": out_dir / "last.pt", "best": out_dir / "best.pt"}
    return Result(last, best["metrics"] if best else {}, best["epoch"] if best else -1, out_dir, paths)
