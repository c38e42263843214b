"""MN's eval-only fast twin (see models/fast.py): `FastInvertedResidual` for `InvertedResidual`,
named in MN's family record (models/mn/family.py)."""
from __future__ import annotations

import torch
from torch import nn

from models.fast import fast_conv_layer, is_pointwise
from models.mn.block_types import ConcurrentSEBlock, InvertedResidual, SqueezeExcitation


class ChannelScale(nn.Module):
    """A channel squeeze-excitation's scale: (B, C) from the global average of its input."""

    def __init__(self, se: SqueezeExcitation) -> None:
        super().__init__()
        self.fc1, self.fc2 = se.fc1, se.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.relu_(self.fc1(x.mean((2, 3))))))


class FastInvertedResidual(nn.Module):
    """MN's `InvertedResidual` with folded norms: pointwise expansion and projection as
    `PointwiseConv`, a channel-only squeeze-excitation folded into the projection's weights, the
    activations in place and the residual added into the projection's output."""

    def __init__(self, block: InvertedResidual) -> None:
        super().__init__()
        self.use_res_connect = block.use_res_connect
        layers = list(block.block)
        self.expand = fast_conv_layer(layers.pop(0)) if is_pointwise(layers[0][0]) else None
        self.depthwise = fast_conv_layer(layers.pop(0))
        self.project = fast_conv_layer(layers.pop())
        se = layers[0] if layers else None
        self.channel_scale, self.se = None, None
        if isinstance(se, ConcurrentSEBlock) and len(se.conc_se_layers) == 1 and se.conc_se_layers[0].dim == 1:
            self.channel_scale = ChannelScale(se.conc_se_layers[0])
        else:
            self.se = se

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.depthwise(out)
        scale = None
        if self.channel_scale is not None:
            scale = self.channel_scale(out)
        elif self.se is not None:
            out = self.se(out)
        out = self.project(out, scale)
        return out.add_(x) if self.use_res_connect else out


FAST_TWINS = {InvertedResidual: FastInvertedResidual}
