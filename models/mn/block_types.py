"""MN building blocks: block configuration, concurrent squeeze-excitation, inverted residual."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from models.layers import ACTIVATIONS, ConvNormActivation, make_divisible

SE_DIMS = {"c": 1, "f": 2, "t": 3}
SE_AGGREGATIONS = ("max", "avg", "add", "min")


@dataclass(frozen=True)
class InvertedResidualConfig:
    """One row of the block table, channels already scaled by the width multiplier."""
    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    activation: str  # "RE" (ReLU) or "HS" (Hardswish)
    stride: int
    dilation: int

    @property
    def conv_stride(self) -> int:
        """Stride of the depthwise conv: dilated blocks keep the resolution (stride 1)."""
        return 1 if self.dilation > 1 else self.stride

    @classmethod
    def scaled(cls, input_channels: int, kernel: int, expanded_channels: int, out_channels: int,
               use_se: bool, activation: str, stride: int, dilation: int,
               width_mult: float) -> "InvertedResidualConfig":
        def adjust(c: int) -> int:
            return make_divisible(c * width_mult, 8)
        return cls(adjust(input_channels), kernel, adjust(expanded_channels), adjust(out_channels),
                   use_se, activation, stride, dilation)


class SqueezeExcitation(nn.Module):
    """Squeeze-excitation along one axis (1 channel, 2 frequency, 3 time): average over the other
    two axes, fc1 -> ReLU -> fc2 -> sigmoid, rescale the input along that axis."""

    def __init__(self, size: int, squeeze_size: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.fc1 = nn.Linear(size, squeeze_size)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(squeeze_size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        other = tuple(d for d in (1, 2, 3) if d != self.dim)
        scale = x.mean(other, keepdim=True).transpose(self.dim, 3)  # descriptor on the last axis
        scale = torch.sigmoid(self.fc2(self.relu(self.fc1(scale)))).transpose(self.dim, 3)
        return x * scale


class ConcurrentSEBlock(nn.Module):
    """One SE layer per requested axis, applied in parallel and fused element-wise."""

    def __init__(self, sizes: dict[str, int], se_dims: str, se_r: int, se_agg: str) -> None:
        super().__init__()
        if se_agg not in SE_AGGREGATIONS:
            raise ValueError(f"unknown se_agg {se_agg!r}; choose one of {', '.join(SE_AGGREGATIONS)}")
        self.se_agg = se_agg
        self.conc_se_layers = nn.ModuleList(
            SqueezeExcitation(sizes[d], make_divisible(sizes[d] // se_r, 8), SE_DIMS[d]) for d in se_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [layer(x) for layer in self.conc_se_layers]
        if len(outs) == 1:
            return outs[0]
        stacked = torch.stack(outs)
        if self.se_agg == "max":
            return stacked.max(dim=0).values
        if self.se_agg == "min":
            return stacked.min(dim=0).values
        if self.se_agg == "avg":
            return stacked.mean(dim=0)
        return stacked.sum(dim=0)


class InvertedResidual(nn.Module):
    """Expansion 1x1 (only if channels change) -> depthwise kxk -> optional SE -> projection 1x1,
    with a residual connection when shape is preserved."""

    def __init__(self, cnf: InvertedResidualConfig, se_dims: str = "c", se_r: int = 4,
                 se_agg: str = "max", output_size: Sequence[int] = (0, 0)) -> None:
        super().__init__()
        if cnf.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {cnf.stride}")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        activation = ACTIVATIONS[cnf.activation]
        layers: list[nn.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(ConvNormActivation(cnf.input_channels, cnf.expanded_channels, kernel_size=1,
                                             activation=activation))
        layers.append(ConvNormActivation(cnf.expanded_channels, cnf.expanded_channels, cnf.kernel,
                                         stride=cnf.conv_stride, dilation=cnf.dilation,
                                         groups=cnf.expanded_channels, activation=activation))
        if cnf.use_se and se_dims != "none":
            sizes = {"c": cnf.expanded_channels, "f": output_size[0], "t": output_size[1]}
            layers.append(ConcurrentSEBlock(sizes, se_dims, se_r, se_agg))
        layers.append(ConvNormActivation(cnf.expanded_channels, cnf.out_channels, kernel_size=1,
                                         activation=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out
