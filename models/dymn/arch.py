"""DyMN: Dynamic MobileNet audio tagger (MN's block table with dynamic blocks).

`build_dymn` builds one from plain architecture arguments (models/dymn/model.py's `get_model`
adds released weights).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from models.dymn.dy_block import DynamicConv, DynamicInvertedResidual
from models.layers import AudioTagger, ConvNormActivation, classification_head, init_weights, make_divisible
from models.mn.block_types import InvertedResidual, InvertedResidualConfig
from models.mn.arch import mn_block_configs

# 0-based block positions where MN has squeeze-excitation; "replace_se" makes only these dynamic
SE_POSITIONS = (3, 4, 5, 10, 11, 12, 13, 14)


def context_size(expanded_channels: int, width_mult: float, context_ratio: int = 4,
                 min_context_size: int = 32, max_context_size: int = 128) -> int:
    """Width H of a block's context vector: E // ratio rounded, clipped to the scaled bounds."""
    lower = make_divisible(min_context_size * width_mult, 8)
    upper = make_divisible(max_context_size * width_mult, 8)
    return min(max(make_divisible(expanded_channels // context_ratio, 8), lower), upper)


class DyMN(AudioTagger):
    """Stem conv (`in_c`) -> 15 blocks (`layers`) -> 1x1 conv to 6x channels (`out_c`) -> head.

    forward(x) returns (logits, embedding) like MN; with return_fmaps=True the second value is
    the list of the 17 feature maps.
    """

    def __init__(self, block_configs: list[InvertedResidualConfig], last_channel: int,
                 num_classes: int = 527, head_type: str = "mlp", width_mult: float = 1.0,
                 context_ratio: int = 4, max_context_size: int = 128, min_context_size: int = 32,
                 dyrelu_k: int = 2, dyconv_k: int = 4, no_dyrelu: bool = False, no_dyconv: bool = False,
                 no_ca: bool = False, temp_schedule: tuple[float, float, float, float] = (30.0, 1.0, 1.0, 0.05),
                 use_dy_blocks: str = "all", dropout: float = 0.2, in_conv_kernel: int = 3,
                 in_conv_stride: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        if use_dy_blocks not in ("all", "replace_se"):
            raise ValueError(f"use_dy_blocks must be 'all' or 'replace_se', got {use_dy_blocks!r}")
        if head_type not in ("mlp", "fully_convolutional"):
            raise ValueError(f"DyMN supports head_type mlp or fully_convolutional, got {head_type!r}")
        layers: list[nn.Module] = []
        for i, cnf in enumerate(block_configs):
            if use_dy_blocks == "all" or i in SE_POSITIONS:
                h = context_size(cnf.expanded_channels, width_mult, context_ratio, min_context_size,
                                 max_context_size)
                layers.append(DynamicInvertedResidual(cnf, h, dyrelu_k, dyconv_k, no_dyrelu, no_dyconv,
                                                      no_ca, temp_schedule))
            else:
                layers.append(InvertedResidual(cnf, se_dims="none"))
        self.layers = nn.ModuleList(layers)  # registered first: the checkpoints' key order
        self.in_c = ConvNormActivation(in_channels, block_configs[0].input_channels, in_conv_kernel,
                                       stride=in_conv_stride, activation=nn.Hardswish)
        last_in = block_configs[-1].out_channels
        self.out_c = ConvNormActivation(last_in, 6 * last_in, kernel_size=1, activation=nn.Hardswish)
        self.classifier = classification_head(head_type, 6 * last_in, last_channel, num_classes,
                                              dropout=dropout)
        self.head_type = head_type
        self.head_args = (last_channel, 4, dropout)
        self.embedding_dim = 6 * last_in
        self.num_classes = num_classes
        init_weights(self)  # the dynamic kernels were initialized by DynamicConv itself

    def update_params(self, epoch: int) -> None:
        """Set every dynamic conv's softmax temperature for `epoch` (call at each epoch start)."""
        for m in self.modules():
            if isinstance(m, DynamicConv):
                m.update_params(epoch)

    def stages(self) -> tuple[nn.Module, ...]:
        return (self.in_c, *self.layers, self.out_c)


def build_dymn(num_classes: int = 527, width_mult: float = 1.0, strides: Sequence[int] = (2, 2, 2, 2),
               context_ratio: int = 4, max_context_size: int = 128, min_context_size: int = 32,
               dyrelu_k: int = 2, no_dyrelu: bool = False, dyconv_k: int = 4, no_dyconv: bool = False,
               T_max: float = 30.0, T0_slope: float = 1.0, T1_slope: float = 0.02, T_min: float = 1,
               no_ca: bool = False, use_dy_blocks: str = "all", head_type: str = "mlp",
               dropout: float = 0.2) -> DyMN:
    """A freshly initialized DyMN of these plain architecture arguments (the family's builder;
    models.factory resolves released names and loads weights)."""
    configs, last_channel = mn_block_configs(width_mult, strides=strides)
    return DyMN(configs, last_channel, num_classes=num_classes, head_type=head_type, width_mult=width_mult,
                context_ratio=context_ratio, max_context_size=max_context_size,
                min_context_size=min_context_size, dyrelu_k=dyrelu_k, dyconv_k=dyconv_k,
                no_dyrelu=no_dyrelu, no_dyconv=no_dyconv, no_ca=no_ca,
                temp_schedule=(T_max, T_min, T0_slope, T1_slope), use_dy_blocks=use_dy_blocks, dropout=dropout)
