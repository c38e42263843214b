"""The training-loop pieces every `ex_*.py` script shares (AudioSet distillation and fine-tuning).

ex_audioset.py uses them directly; the fine-tuning scripts through `helpers.finetune.fine_tune`,
which is this loop. A script is its configuration plus a loss callback, like this:

    parser = argparse.ArgumentParser(description=...)
    add_run_args(parser, experiment_name="ESC50", batch_size=128, dataset_env="ESC50_DIR")
    add_model_args(parser)
    add_optimizer_args(parser, lr=6e-5, n_epochs=80, warm_up_len=10, ramp_down_start=10,
                       ramp_down_len=65)
    add_preprocessing_args(parser)
    args = parser.parse_args()

    dist = setup_distributed(args.cuda)              # torchrun's RANK/WORLD_SIZE, or one process
    data_dir = resolve_dataset_dir(args.dataset_dir, "ESC50_DIR", ["meta/esc50.csv"])
    seed_everything(args.seed)
    model_config = model_config_from_args(args, num_classes=50)
    model = wrap_ddp(model_from_config(model_config).to(dist.device), dist)
    frontend = AugmentMelSTFT(**frontend_config_from_args(args)).to(dist.device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.adamw)
    scheduler = make_scheduler(optimizer, args)
    precision = Precision(args.precision, dist.device)
    train_dl = train_loader(train_set, args.batch_size, args.num_workers, dist, args.seed)
    eval_dl = eval_loader(eval_set, args.batch_size, args.num_workers, dist)

    def loss_fn(model, x, batch):                    # x: (B, 1, n_mels, T) on the device
        perm, lam = mixup(len(x), args.mixup_alpha)
        logits = model(mix(x, perm, lam))[0]
        return {"loss": F.binary_cross_entropy_with_logits(logits, mix(batch[2], perm, lam))}

    out_dir = resolve_out_dir(args)                  # --out_dir or runs/<experiment_name>
    path = out_dir / "last.pt"
    start = 0
    if args.resume:                                  # "auto" (flag alone) or a path
        state = load_checkpoint(path if args.resume == "auto" else args.resume)
        start = restore_training_state(state, model, optimizer, scheduler, precision, args.seed)
    run = RunLogger(args.logger, "ESC50", args.experiment_name, vars(args), out_dir, dist)
    for epoch in range(start, args.n_epochs):
        seed_epoch(args.seed, epoch, dist.rank)      # all randomness = f(seed, epoch, rank)
        stats = train_one_epoch(model, frontend, train_dl, optimizer, loss_fn, precision, dist, epoch)
        scheduler.step()
        logits, targets = evaluate(model, frontend, eval_dl, precision, dist)   # all ranks
        run.log({"train_loss": stats["loss"], "accuracy": accuracy(targets, logits)}, step=epoch)
        if dist.is_main:
            save_checkpoint(path, training_state(model, optimizer, scheduler, precision, epoch,
                                                 args.seed, vars(args), model_config,
                                                 frontend_config_from_args(args), class_names))
    run.finish()                                     # the process group is destroyed at exit

Errors in the user's input raise helpers.common.errors.InputError; wrap `main` in
helpers.common.errors.run_cli to turn them into one line on stderr and exit status 2.

Losses for single-label CE, multi-label BCE, distillation or masked BCE all fit the callback:
it receives the model, the spectrogram batch and the loader's batch (tensors already on the
device) and returns a dict holding the scalar "loss" to minimize and any other values to average.

Reproducibility: `seed_epoch` re-seeds Python, NumPy and torch at the start of every epoch from
(seed, epoch, rank); samplers draw from (seed, epoch); DataLoader workers derive their seeds from
the loader's base seed (`worker_init_fn`). An epoch's randomness therefore depends only on those
numbers, so a run resumed from an epoch checkpoint repeats the uninterrupted run exactly.
"""
from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from helpers.common.errors import InputError
from helpers.common.files import atomic_write
from models.dymn.model import get_model as get_dymn
from models.factory import frontend_kwargs
from models.mn.model import get_model as get_mn
from models.pretrained import REGISTRY, get_entry

PRECISIONS = ("fp32", "fp16", "bf16")
CHECKPOINT_FORMAT = "efficientat-training-checkpoint"
LossFn = Callable[[nn.Module, torch.Tensor, Sequence[Any]], Mapping[str, Any]]


# ---------------------------------------------------------------- learning-rate schedule

class WarmupRampdown:
    """f(e) of the original schedule (a LambdaLR factor, e = epoch index from 0): exponential
    warm-up over `warm_up_len` epochs (with e floored at 0.5), then constant until
    `ramp_down_start`, then linear ramp-down over `ramp_down_len` epochs to `last_lr_value`.
    A class (not a closure) so that the scheduler's state_dict stores its settings."""

    def __init__(self, warm_up_len: int, ramp_down_start: int, ramp_down_len: int,
                 last_lr_value: float) -> None:
        self.warm_up_len = warm_up_len
        self.ramp_down_start = ramp_down_start
        self.ramp_down_len = ramp_down_len
        self.last_lr_value = last_lr_value

    def rampup(self, epoch: int) -> float:
        if epoch >= self.warm_up_len:
            return 1.0
        phase = 1.0 - min(max(epoch, 0.5), self.warm_up_len) / self.warm_up_len
        return math.exp(-5.0 * phase * phase)

    def rampdown(self, epoch: int) -> float:
        start, length, last = self.ramp_down_start, self.ramp_down_len, self.last_lr_value
        if epoch <= start:
            return 1.0
        if epoch - start < length:
            return last + (1.0 - last) * (length - epoch + start) / length
        return last

    def __call__(self, epoch: int) -> float:
        return self.rampup(epoch) * self.rampdown(epoch)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                   adamw: bool = False) -> torch.optim.Optimizer:
    """Adam (or AdamW) over all model parameters with PyTorch's default betas and eps."""
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    return cls(model.parameters(), lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer,
                   args: argparse.Namespace) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with `WarmupRampdown` from the schedule arguments; step it once after each epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupRampdown(
        args.warm_up_len, args.ramp_down_start, args.ramp_down_len, args.last_lr_value))


# ---------------------------------------------------------------- mixup and spectrograms

def mixup(size: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, lam) for spectrogram mixup: a random permutation of the batch (torch RNG) and
    `size` weights lam_i ~ Beta(alpha, alpha) (NumPy RNG) folded to max(lam, 1 - lam) >= 0.5."""
    if alpha <= 0:
        raise ValueError(f"mixup needs alpha > 0, got {alpha}")
    perm = torch.randperm(size)
    lam = np.random.beta(alpha, alpha, size)
    lam = np.maximum(lam, 1.0 - lam)
    return perm, torch.from_numpy(lam.astype(np.float32))


def mix(x: torch.Tensor, perm: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam_i * x_i + (1 - lam_i) * x_perm(i), lam broadcast over all axes after the first; works
    for spectrograms, targets and per-sample losses alike."""
    lam = lam.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    lam = lam.view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1.0 - lam) * x[perm.to(x.device)]


def mel(frontend: nn.Module, waveforms: torch.Tensor) -> torch.Tensor:
    """Waveform batch (B, 1, L) (or (B, L)) -> spectrograms (B, 1, n_mels, T) for the models."""
    spec = frontend(waveforms.reshape(waveforms.shape[0], -1))
    return spec.unsqueeze(1)


# ---------------------------------------------------------------- seeding

def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global RNG and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Re-seed all RNGs for one epoch from (seed, epoch, rank): every epoch and every rank draws
    different augmentations, and a resumed run repeats the uninterrupted one."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint64)
    seed_everything(int(state[0] >> np.uint64(1)))


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker seeding: three independent seeds spawned from a SeedSequence of (torch
    initial seed, worker id) for torch, `random` (64-bit) and NumPy (two 32-bit words). The torch
    initial seed of a worker changes with every epoch (the loader draws a base seed from the
    re-seeded torch RNG), so augmentations differ across workers and epochs and repeat exactly
    under the same seed."""
    torch_ss, random_ss, numpy_ss = np.random.SeedSequence([torch.initial_seed(), worker_id]).spawn(3)
    words = torch_ss.generate_state(2, dtype=np.uint32)
    torch.manual_seed(int(words[0]) + 2**32 * int(words[1]))
    words = random_ss.generate_state(2, dtype=np.uint32)
    random.seed(int(words[0]) + 2**32 * int(words[1]))
    np.random.seed(numpy_ss.generate_state(2, dtype=np.uint32))


# ---------------------------------------------------------------- distributed

@dataclass(frozen=True)
class DistInfo:
    """Where this process runs: its global rank, local rank (GPU index), the world size and the
    device. One process without torchrun is rank 0 of a world of 1."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) logs, prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(cuda: bool) -> DistInfo:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE (absent: one process), pick the device
    (cuda:LOCAL_RANK with --cuda when CUDA is available, else CPU) and, for more than one process,
    initialize the default process group (nccl on CUDA, gloo on CPU) from torchrun's
    MASTER_ADDR / MASTER_PORT; it is destroyed when the process exits."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cuda and not torch.cuda.is_available():
        warnings.warn("--cuda given but CUDA is not available; running on the CPU")
    if cuda and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                      rank=rank, world_size=world_size)
        atexit.register(cleanup_distributed)  # also when the script ends with an exception
    return DistInfo(rank, local_rank, world_size, device)


def cleanup_distributed() -> None:
    """Destroy the process group if one was created."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap_ddp(model: nn.Module, dist: DistInfo) -> nn.Module:
    """The model wrapped in DistributedDataParallel when running on several processes."""
    if not dist.distributed:
        return model
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (for evaluation, state dicts and update_params)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def broadcast_buffers(model: nn.Module, dist: DistInfo) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics) to all ranks."""
    if dist.distributed:
        for buffer in model.buffers():
            torch_dist.broadcast(buffer.data, src=0)


def all_reduce_mean(values: Mapping[str, float], dist: DistInfo) -> dict[str, float]:
    """Average scalar values over all ranks (identity on one process)."""
    if not dist.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return {k: float(v) / dist.world_size for k, v in zip(keys, t.tolist())}


def all_reduce_sum(value: int, dist: DistInfo) -> int:
    """Sum an integer count over all ranks (identity on one process)."""
    if not dist.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=dist.device)
    torch_dist.all_reduce(t)
    return int(t.item())


def gather_cat(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Concatenate tensors of different lengths along axis 0 across ranks in rank order
    (identity on one process). Every rank receives the full result on the CPU."""
    if not dist.distributed:
        return t
    src = t.to(dist.device)
    if src.dtype == torch.bool:
        src = src.to(torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dist.device) for _ in range(dist.world_size)]
    torch_dist.all_gather(sizes, torch.tensor([len(src)], dtype=torch.int64, device=dist.device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *src.shape[1:]), dtype=src.dtype, device=dist.device)
    padded[:len(src)] = src
    parts = [torch.empty_like(padded) for _ in range(dist.world_size)]
    torch_dist.all_gather(parts, padded)
    out = torch.cat([p[:n] for p, n in zip(parts, sizes)]).cpu()
    return out.bool() if t.dtype == torch.bool else out


class ShardSampler(Sampler[int]):
    """Sequential evaluation sampler: rank r reads the contiguous slice
    [r * N // W, (r + 1) * N // W) of the dataset, so concatenating the ranks' outputs in rank
    order gives every clip exactly once, in dataset order (no padding, no duplicates)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.start = rank * length // world_size
        self.stop = (rank + 1) * length // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling for one or many processes: every epoch draws `num_samples` indices with
    probability proportional to `weights` (torch.multinomial, like WeightedRandomSampler; without
    replacement by default) from a generator seeded with seed + epoch, identical on all ranks;
    rank r takes every world_size-th index from position r (the draw is padded by wrapping so that
    all ranks get the same count and run the same number of steps). Call set_epoch(epoch) before
    each epoch."""

    def __init__(self, weights: Sequence[float] | np.ndarray | torch.Tensor, num_samples: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 replacement: bool = False) -> None:
        self.weights = torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        positive = int((self.weights > 0).sum())
        if num_samples < 1:
            raise InputError(f"the number of samples per epoch must be positive, got {num_samples}")
        if not replacement and num_samples > positive:
            raise InputError(f"cannot draw {num_samples} distinct clips per epoch from {positive} "
                             "clips with a non-zero weight")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.replacement, self.epoch = seed, replacement, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples, self.replacement, generator=g)
        padded = len(self) * self.world_size
        idx = torch.cat([idx, idx[:padded - len(idx)]])
        return iter(idx[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world_size)


def train_loader(dataset: Dataset, batch_size: int, num_workers: int, dist: DistInfo, seed: int,
                 sampler: Optional[Sampler] = None) -> DataLoader:
    """Training DataLoader: the given sampler (it must split the data over ranks itself, e.g. a
    weighted sampler with set_epoch), or a shuffling DistributedSampler seeded by (seed, epoch);
    seeded workers; the last partial batch kept."""
    if sampler is None:
        sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                     shuffle=True, seed=seed, drop_last=False)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      worker_init_fn=worker_init_fn, pin_memory=dist.device.type == "cuda",
                      drop_last=False)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, dist: DistInfo) -> DataLoader:
    """Sequential evaluation DataLoader over this rank's `ShardSampler` slice (InputError when the
    set has fewer clips than there are processes)."""
    if len(dataset) < dist.world_size:
        raise InputError(f"the evaluation set has {len(dataset)} clips, fewer than the "
                         f"{dist.world_size} processes")
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), dist.rank,
                                                                           dist.world_size),
                      num_workers=num_workers, worker_init_fn=worker_init_fn,
                      pin_memory=dist.device.type == "cuda", drop_last=False)


# ---------------------------------------------------------------- precision

class Precision:
    """`--precision`: fp32 (also for None), or torch.autocast with float16 / bfloat16. fp16
    training uses a GradScaler (loss scaling against gradient underflow); fp32 and bf16 step
    plainly."""

    def __init__(self, name: Optional[str], device: torch.device) -> None:
        name = name or "fp32"
        if name not in PRECISIONS:
            raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
        self.name = name
        self.device = device
        self.dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self) -> torch.autocast:
        """Context manager for forward passes (a no-op for fp32)."""
        return torch.autocast(device_type=self.device.type, dtype=self.dtype,
                              enabled=self.dtype is not None)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward pass, optimizer step (through the scaler for fp16), zero the gradients."""
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)


# ---------------------------------------------------------------- loops

def _to_device(batch: Sequence[Any], device: torch.device) -> list[Any]:
    return [b.to(device, non_blocking=True) if isinstance(b, torch.Tensor) else b for b in batch]


def train_one_epoch(model: nn.Module, frontend: nn.Module, loader: DataLoader,
                    optimizer: torch.optim.Optimizer, loss_fn: LossFn, precision: Precision,
                    dist: DistInfo, epoch: int, progress: bool = True) -> dict[str, float]:
    """One pass over `loader` in train mode (model and frontend). For each batch (waveforms
    first): spectrograms under autocast, `loss_fn(model, x, batch)` -> {"loss": tensor, ...},
    backward and step. Returns the mean over batches of every returned value, averaged over ranks.
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
        batch = _to_device(batch, dist.device)
        with precision.autocast():
            out = loss_fn(model, mel(frontend, batch[0]), batch)
        precision.step(out["loss"], optimizer)
        for key, value in out.items():
            sums[key] += value.detach().float() if isinstance(value, torch.Tensor) else value
        batches += 1
        if batches % 10 == 1 and not bar.disable:  # reading the loss waits for the GPU
            bar.set_postfix(loss=f"{float(sums['loss']) / batches:.4f}")
    if batches == 0:
        raise InputError("the training loader yielded no batch (empty training set?)")
    return all_reduce_mean({k: float(v) / batches for k, v in sums.items()}, dist)


@torch.no_grad()
def evaluate(model: nn.Module, frontend: nn.Module, loader: DataLoader, precision: Precision,
             dist: DistInfo, target_index: int = 2,
             keep_fn: Optional[Callable[[Sequence[Any]], torch.Tensor]] = None,
             progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the whole evaluation set once (eval mode, autocast per `precision`) and return
    (logits as float32, targets) concatenated over all ranks in dataset order, on the CPU.
    `target_index` is the position of the target in a batch; `keep_fn(batch)` (optional) returns a
    boolean mask of the rows to keep (e.g. to drop undecodable clips). The model runs unwrapped,
    so ranks with different shard lengths never wait for each other inside the loop; its buffers
    (BatchNorm statistics, which each rank updates on its own last batch) are first copied from
    rank 0, so every rank evaluates the model rank 0 saves."""
    net = unwrap(model)
    net.eval()
    frontend.eval()
    broadcast_buffers(net, dist)
    outputs, targets = [], []
    for batch in tqdm(loader, desc="eval", disable=not (progress and dist.is_main),
                      dynamic_ncols=True, leave=False):
        with precision.autocast():
            logits = net(mel(frontend, batch[0].to(dist.device, non_blocking=True)))[0]
        logits, target = logits.float().cpu(), torch.as_tensor(batch[target_index])
        if keep_fn is not None:
            keep = torch.as_tensor(keep_fn(batch), dtype=torch.bool)
            logits, target = logits[keep], target[keep]
        outputs.append(logits)
        targets.append(target)
    if not outputs:
        raise InputError("the evaluation loader yielded no batch (empty evaluation set?)")
    return gather_cat(torch.cat(outputs), dist), gather_cat(torch.cat(targets), dist)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """torch.save `state` atomically (helpers.common.files.atomic_write): a crash never leaves a
    half-written checkpoint."""
    with atomic_write(path, "wb") as f:
        torch.save(dict(state), f)


def load_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU; InputError naming the file if it is missing or not a
    torch checkpoint. With mmap=True tensors are only read when used (cheap for reading settings)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for foreign or truncated files
        raise InputError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unknown error'})") from None
    if not isinstance(state, dict):
        raise InputError(f"{path}: checkpoint holds a {type(state).__name__}, expected a dict")
    return state


def _plain(value: Any) -> Any:
    """Config values reduced to types that load with weights_only=True (paths -> str)."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, precision: Precision,
                   epoch: int, seed: int, config: Mapping[str, Any], model_config: Mapping[str, Any],
                   frontend_config: Mapping[str, Any], class_names: Sequence[str],
                   metrics: Optional[Mapping[str, float]] = None) -> dict[str, Any]:
    """The checkpoint dict written after `epoch` (0-based, completed): everything needed to resume
    exactly (model, optimizer, scheduler, scaler, epoch, seed; samplers and RNGs are functions of
    seed and epoch) and to rebuild the model without the command line (model_config,
    frontend_config, class_names)."""
    return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "seed": seed,
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": precision.state_dict(),
            "config": _plain(dict(config)), "model_config": _plain(dict(model_config)),
            "frontend_config": _plain(dict(frontend_config)), "class_names": list(class_names),
            "metrics": _plain(dict(metrics or {}))}


def restore_training_state(state: Mapping[str, Any], model: nn.Module,
                           optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler,
                           precision: Precision, seed: int) -> int:
    """Load a `training_state` checkpoint into the objects; returns the epoch to start from. The
    run must continue with the seed it was started with (epoch randomness derives from it)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError("checkpoint is not a training checkpoint of this project (no optimizer "
                         "state to resume from)")
    if state["seed"] != seed:
        raise InputError(f"checkpoint was trained with --seed {state['seed']}, not {seed}")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    precision.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1


def load_finetuned(checkpoint_path: str | os.PathLike,
                   state: Optional[dict[str, Any]] = None) -> tuple[nn.Module, dict[str, Any], list[str], bool]:
    """(model in eval mode, frontend keyword arguments, class names, multilabel) of a checkpoint
    written by a training script (`training_state`), rebuilt from the configuration stored in it:
    no command line and no download needed. Apply sigmoid to the logits of multi-label models and
    softmax to those of single-label ones (checkpoints without the flag count as multi-label, like
    AudioSet's). `state`: the checkpoint's contents when the caller has already loaded them."""
    if state is None:
        state = load_checkpoint(checkpoint_path)
    missing = [k for k in ("model", "model_config", "frontend_config", "class_names") if k not in state]
    if missing:
        raise InputError(f"{checkpoint_path}: not a checkpoint of a training script (no "
                         f"{', '.join(missing)}); released models are loaded by name")
    model = model_from_config(state["model_config"], load_pretrained=False, epoch=state.get("epoch"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise InputError(f"{checkpoint_path}: weights do not fit the stored model configuration "
                         f"({str(e).splitlines()[0]})") from None
    return (model.eval(), dict(state["frontend_config"]), list(state["class_names"]),
            bool(state.get("multilabel", True)))


def save_epoch_weights(out_dir: Path, model: nn.Module, width: float, task: str, epoch: int, metric: str,
                       value: float) -> Path:
    """Save the model's state dict under the original's per-epoch name (e.g.
    mn10_as_epoch_5_mAP_450.pt: width, task, epoch, metric x 1000) and delete the file of the
    previous epoch, so only the latest is kept, as the original does."""
    path = out_dir / f"mn{str(width).replace('.', '')}_{task}_epoch_{epoch}_{metric}_{round(value * 1000)}.pt"
    save_checkpoint(path, unwrap(model).state_dict())
    for old in out_dir.glob(f"mn*_{task}_epoch_*_{metric}_*.pt"):
        if old != path:
            old.unlink()
    return path


# ---------------------------------------------------------------- models and frontend from args

def model_config_from_args(args: argparse.Namespace, num_classes: int) -> dict[str, Any]:
    """The model's full configuration from `add_model_args` arguments: "dymn*" names build a DyMN,
    others an MN; with --pretrained the architecture comes from the registry entry of
    --model_name (explicit --strides / --head_type win), otherwise from --model_width etc.
    Stored in checkpoints so `model_from_config` rebuilds the model without the command line."""
    name = args.model_name
    family = "dymn" if name and name.startswith("dymn") else "mn"
    arch: dict[str, Any] = {"width_mult": args.model_width, "strides": [2, 2, 2, 2],
                            "head_type": "mlp"}
    if args.pretrained:
        entry = get_entry(name)
        family = entry.family
        arch.update({k: v for k, v in entry.model_kwargs.items()})
    if args.strides is not None:
        arch["strides"] = list(args.strides)
    if args.head_type is not None:
        arch["head_type"] = args.head_type
    config = {"family": family, "num_classes": num_classes, "width_mult": arch["width_mult"],
              "strides": list(arch["strides"]), "head_type": arch["head_type"],
              "pretrained_name": name if args.pretrained else None}
    if family == "mn":
        config["se_dims"] = args.se_dims
    else:
        config["use_dy_blocks"] = arch.get("use_dy_blocks", "all")
        # DyMN temperature: a pretrained start runs the schedule from pretrain_final_temp
        config["T_max"] = args.pretrain_final_temp if args.pretrained else 30.0
    return config


def model_from_config(config: Mapping[str, Any], load_pretrained: bool = True,
                      epoch: Optional[int] = None) -> nn.Module:
    """Build the model a `model_config_from_args` dict describes. With `load_pretrained` and a
    pretrained name its released weights are loaded (the classifier is re-initialized for a
    different class count). A DyMN restored after training epoch `epoch` gets that epoch's
    softmax temperature (it is not part of the state dict)."""
    pretrained = config.get("pretrained_name") if load_pretrained else None
    common = {"num_classes": config["num_classes"], "pretrained_name": pretrained,
              "width_mult": config["width_mult"], "strides": tuple(config["strides"])}
    if config["family"] == "dymn":
        model = get_dymn(**common, use_dy_blocks=config["use_dy_blocks"],
                         head_type=config["head_type"], T_max=config["T_max"],
                         pretrain_final_temp=config["T_max"])
        if epoch is not None:
            model.update_params(epoch)
        return model
    return get_mn(**common, head_type=config["head_type"], se_dims=config["se_dims"])


def frontend_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The AugmentMelSTFT settings given by `add_preprocessing_args` arguments, without the
    ones left unset (None)."""
    given = {"sr": args.resample_rate, "win_length": args.window_size, "hopsize": args.hop_size,
             "n_fft": args.n_fft, "n_mels": args.n_mels, "freqm": args.freqm, "timem": args.timem,
             "fmin": args.fmin, "fmax": args.fmax, "fmin_aug_range": args.fmin_aug_range,
             "fmax_aug_range": args.fmax_aug_range}
    return {k: v for k, v in given.items() if v is not None}


def frontend_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """AugmentMelSTFT keyword arguments: the preprocessing arguments given, then the registry
    settings of --model_name (n_mels, hop size of the variants), then the standard defaults."""
    name = getattr(args, "model_name", None)
    return frontend_kwargs(name if name in REGISTRY else None, **frontend_overrides(args))


# ---------------------------------------------------------------- logging

class RunLogger:
    """Per-epoch metrics: a JSON line each in <out_dir>/metrics.jsonl, and Weights & Biases with
    `kind="wandb"`, offline unless the user set WANDB_MODE (no account is ever asked for). Only
    the main process logs; on other ranks every call is a no-op."""

    def __init__(self, kind: str, project: str, run_name: str, config: Mapping[str, Any],
                 out_dir: str | os.PathLike, dist: DistInfo, tags: Sequence[str] = (),
                 notes: str = "") -> None:
        if kind not in ("wandb", "none"):
            raise InputError(f"--logger must be wandb or none, got {kind!r}")
        self.active = dist.is_main
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")
            import wandb  # only needed with --logger wandb

            self.wandb_run = wandb.init(project=project, name=run_name, config=_plain(dict(config)),
                                        tags=list(tags), notes=notes, dir=str(out_dir))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": step, **_plain(dict(metrics))}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


# ---------------------------------------------------------------- argparse groups

def add_run_args(parser: argparse.ArgumentParser, experiment_name: str, batch_size: int,
                 dataset_env: Optional[str] = None, num_workers: int = 12) -> None:
    """Run arguments: --experiment_name, --cuda, --batch_size, --num_workers, --dataset_dir (default
    from the environment variable `dataset_env`), --seed, --out_dir, --logger, --precision,
    --resume."""
    g = parser.add_argument_group("run")
    g.add_argument("--experiment_name", type=str, default=experiment_name, help="run name")
    g.add_argument("--cuda", action="store_true", help="use the GPU if available")
    g.add_argument("--batch_size", type=int, default=batch_size, help="clips per batch and process")
    g.add_argument("--num_workers", type=int, default=num_workers, help="DataLoader workers")
    env_note = f" (default: ${dataset_env})" if dataset_env else ""
    g.add_argument("--dataset_dir", type=str,
                   default=os.environ.get(dataset_env) if dataset_env else None,
                   help=f"folder holding the dataset files{env_note}")
    g.add_argument("--seed", type=int, default=42, help="seed of all random draws")
    g.add_argument("--out_dir", type=str, default=None,
                   help="folder for checkpoints and logs (default: runs/<experiment_name>)")
    g.add_argument("--logger", choices=("wandb", "none"), default="wandb",
                   help="wandb logs offline unless WANDB_MODE is set")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast precision (default fp32)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from a checkpoint (default: <out_dir>/last.pt)")


def add_model_args(parser: argparse.ArgumentParser, model_name: str = "mn10_as",
                   pretrain_final_temp: float = 1.0) -> None:
    """Model arguments: --model_name, --pretrained, --pretrain_final_temp, --model_width,
    --strides, --head_type, --se_dims."""
    g = parser.add_argument_group("model")
    g.add_argument("--model_name", type=str, default=model_name,
                   help="registry name; 'dymn*' names build a DyMN")
    g.add_argument("--pretrained", action="store_true", help="start from --model_name's weights")
    g.add_argument("--pretrain_final_temp", type=float, default=pretrain_final_temp,
                   help="DyMN starting temperature when pretrained")
    g.add_argument("--model_width", type=float, default=1.0, help="width when not pretrained")
    g.add_argument("--strides", type=int, nargs=4, default=None,
                   help="four strides (default: the checkpoint's, else 2 2 2 2)")
    g.add_argument("--head_type", type=str, default=None,
                   choices=("mlp", "fully_convolutional", "multihead_attention_pooling"),
                   help="MN classifier head (default: the checkpoint's, else mlp)")
    g.add_argument("--se_dims", type=str, default="c", help="MN squeeze-excitation dimensions")


def add_optimizer_args(parser: argparse.ArgumentParser, lr: float, n_epochs: int,
                       warm_up_len: int, ramp_down_start: int, ramp_down_len: int,
                       last_lr_value: float = 0.01, lr_flag: str = "lr",
                       weight_decay: float = 0.0, mixup_alpha: float = 0.3) -> None:
    """Optimization arguments: --n_epochs, --mixup_alpha, --adamw, --weight_decay (a float),
    --<lr_flag> (--lr, or --max_lr for AudioSet), and the schedule (--warm_up_len,
    --ramp_down_start, --ramp_down_len, --last_lr_value)."""
    g = parser.add_argument_group("optimization")
    g.add_argument("--n_epochs", type=int, default=n_epochs)
    g.add_argument("--mixup_alpha", type=float, default=mixup_alpha, help="0 disables mixup")
    g.add_argument("--adamw", action="store_true", help="AdamW instead of Adam")
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument(f"--{lr_flag}", type=float, default=lr, help="base learning rate")
    g.add_argument("--warm_up_len", type=int, default=warm_up_len)
    g.add_argument("--ramp_down_start", type=int, default=ramp_down_start)
    g.add_argument("--ramp_down_len", type=int, default=ramp_down_len)
    g.add_argument("--last_lr_value", type=float, default=last_lr_value)


def add_preprocessing_args(parser: argparse.ArgumentParser) -> None:
    """Frontend arguments with the original's names. Sample rate, window, hop, n_fft and n_mels
    default to the --model_name checkpoint's settings (32000, 800, 320, 1024, 128 for most);
    masking is off (freqm = timem = 0) and eval-time fmax is sr/2 - fmax_aug_range/2."""
    g = parser.add_argument_group("preprocessing")
    g.add_argument("--resample_rate", type=int, default=None)
    g.add_argument("--window_size", type=int, default=None)
    g.add_argument("--hop_size", type=int, default=None)
    g.add_argument("--n_fft", type=int, default=None)
    g.add_argument("--n_mels", type=int, default=None)
    g.add_argument("--freqm", type=int, default=0, help="frequency mask width (train only)")
    g.add_argument("--timem", type=int, default=0, help="time mask width (train only)")
    g.add_argument("--fmin", type=float, default=0.0)
    g.add_argument("--fmax", type=float, default=None)
    g.add_argument("--fmin_aug_range", type=int, default=10)
    g.add_argument("--fmax_aug_range", type=int, default=2000)


def resolve_out_dir(args: argparse.Namespace) -> Path:
    """--out_dir, or runs/<experiment_name>."""
    return Path(args.out_dir) if args.out_dir else Path("runs") / args.experiment_name


def resolve_dataset_dir(dataset_dir: Optional[str], env_var: Optional[str],
                        required_files: Sequence[str] = ()) -> Path:
    """The dataset folder, checked: InputError when it was not given (neither --dataset_dir nor
    the environment variable), does not exist, or lacks one of `required_files`."""
    if not dataset_dir:
        hint = f" or set ${env_var}" if env_var else ""
        raise InputError(f"no dataset folder given: pass --dataset_dir{hint}")
    path = Path(dataset_dir)
    if not path.is_dir():
        raise InputError(f"{path}: dataset folder does not exist")
    for name in required_files:
        if not (path / name).is_file():
            raise InputError(f"{path / name}: dataset file not found")
    return path
