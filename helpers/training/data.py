"""Samplers and DataLoaders for training (shuffled or weighted, split over ranks) and evaluation
(contiguous shards, gathered back in dataset order)."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from common.errors import InputError
from helpers.training.distributed import DistInfo
from helpers.training.seeding import worker_init_fn


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


def _loader(dataset: Dataset, batch_size: int, sampler: Sampler, num_workers: int, dist: DistInfo,
            persistent_workers: bool, prefetch_factor: Optional[int]) -> DataLoader:
    """Seeded workers, pinned memory on CUDA, the last partial batch kept; `persistent_workers`
    and `prefetch_factor` apply when there are workers."""
    workers = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if num_workers else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      worker_init_fn=worker_init_fn, pin_memory=dist.device.type == "cuda",
                      drop_last=False, **workers)


def train_loader(dataset: Dataset, batch_size: int, num_workers: int, dist: DistInfo, seed: int,
                 sampler: Optional[Sampler] = None, persistent_workers: bool = False,
                 prefetch_factor: Optional[int] = None) -> DataLoader:
    """Training DataLoader: the given sampler (it must split the data over ranks itself, e.g. a
    weighted sampler with set_epoch), or a shuffling DistributedSampler seeded by (seed, epoch).
    Persistent workers are seeded once, so their augmentations then depend on the run's history
    and a resumed run no longer repeats the uninterrupted one."""
    if sampler is None:
        sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                     shuffle=True, seed=seed, drop_last=False)
    return _loader(dataset, batch_size, sampler, num_workers, dist, persistent_workers, prefetch_factor)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, dist: DistInfo,
                persistent_workers: bool = False, prefetch_factor: Optional[int] = None) -> DataLoader:
    """Sequential evaluation DataLoader over this rank's `ShardSampler` slice (InputError when the
    set has fewer clips than there are processes)."""
    if len(dataset) < dist.world_size:
        raise InputError(f"the evaluation set has {len(dataset)} clips, fewer than the "
                         f"{dist.world_size} processes")
    return _loader(dataset, batch_size, ShardSampler(len(dataset), dist.rank, dist.world_size), num_workers,
                   dist, persistent_workers, prefetch_factor)
