"""MN's support of the shared pass over long recordings (helpers/inference/shared_pass.py): its
blocks' channel squeeze-excitation is the only layer that pools over time, so a block runs with
that gate's scale replaced by the moving-window one. Squeeze-excitation over frequency or time
cannot be shared."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from models.family import SharedStage
from models.mn.block_types import ConcurrentSEBlock, InvertedResidual
from models.mn.fast import FastInvertedResidual

Gate = Callable[[torch.Tensor], torch.Tensor]
NOT_SHARED = "squeeze-excitation over frequency or time cannot be shared"


def _excitation(fc1: nn.Linear, fc2: nn.Linear) -> Gate:
    """The SE's scale of a pooled context (B, T, C) -> (B, T, C)."""
    return lambda context: torch.sigmoid(fc2(torch.relu(fc1(context))))


def _channel_se(se: ConcurrentSEBlock) -> Optional[nn.Module]:
    """The single channel SE layer of `se`; None for SE over frequency or time."""
    layers = se.conc_se_layers
    return layers[0] if len(layers) == 1 and layers[0].dim == 1 else None


def _block_gate(block: InvertedResidual) -> Optional[Gate]:
    se = next((m for m in block.block if isinstance(m, ConcurrentSEBlock)), None)
    layer = None if se is None else _channel_se(se)
    return None if layer is None else _excitation(layer.fc1, layer.fc2)


def _block_refusal(block: InvertedResidual) -> Optional[str]:
    if any(_channel_se(m) is None for m in block.block if isinstance(m, ConcurrentSEBlock)):
        return NOT_SHARED
    return None


def _run_block(block: InvertedResidual, x: torch.Tensor, scale: Gate) -> torch.Tensor:
    out = x
    for layer in block.block:
        out = out * scale(out) if isinstance(layer, ConcurrentSEBlock) else layer(out)
    return out + x if block.use_res_connect else out


def _fast_gate(block: FastInvertedResidual) -> Optional[Gate]:
    se = block.channel_scale
    return None if se is None else _excitation(se.fc1, se.fc2)


def _run_fast_block(block: FastInvertedResidual, x: torch.Tensor, scale: Gate) -> torch.Tensor:
    out = block.depthwise(x if block.expand is None else block.expand(x))
    out = block.project(out.mul_(scale(out)))
    return out.add_(x) if block.use_res_connect else out


SHARED_STAGES = {
    InvertedResidual: SharedStage(_block_gate, _run_block, _block_refusal),
    FastInvertedResidual: SharedStage(_fast_gate, _run_fast_block,
                                      lambda block: NOT_SHARED if block.se is not None else None),
}
