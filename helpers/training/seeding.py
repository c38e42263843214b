"""Seeding: an epoch's randomness is a function of (seed, epoch, rank) only, so resumed runs repeat."""
from __future__ import annotations

import random

import numpy as np
import torch


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
