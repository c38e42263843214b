"""torchrun / DistributedDataParallel: where this process runs, the process group, and the
collectives the loops need (mean, sum, gather)."""
from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


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
