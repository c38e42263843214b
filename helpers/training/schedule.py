"""Optimizer and the original's learning-rate schedule (exponential warm-up, plateau, linear ramp-down)."""
from __future__ import annotations

import math

import torch
from torch import nn

from helpers.training.config import OptimConfig


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


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, adamw: bool = False,
                   fused: bool = False) -> torch.optim.Optimizer:
    """Adam (or AdamW) over all model parameters with PyTorch's default betas and eps; `fused`
    (for CUDA) updates all parameters in one kernel and lets fp16's GradScaler skip overflowing
    steps without reading the overflow flag back to the host."""
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    return cls(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with `WarmupRampdown` from the schedule settings; step it once after each epoch."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupRampdown(
        optim.warm_up_len, optim.ramp_down_start, optim.ramp_down_len, optim.last_lr_value))
