"""`--precision`: fp32, or autocast with float16 (and a GradScaler) or bfloat16."""
from __future__ import annotations

from typing import Any, Optional

import torch

from common.errors import InputError

PRECISIONS = ("fp32", "fp16", "bf16")


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
