"""Spectrogram mixup: draw (permutation, weights) once, mix inputs, targets and losses alike."""
from __future__ import annotations

import numpy as np
import torch


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
