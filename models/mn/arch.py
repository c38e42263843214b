"""MN: the MobileNetV3-Large based audio tagger of EfficientAT.

The architecture is the block table in `mn_block_configs`; `MN` walks it; `build_mn` builds one
from plain architecture arguments (models/mn/model.py's `get_model` adds released weights).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from models.layers import (AudioTagger, ConvNormActivation, classification_head, conv_output_size,
                           init_weights, make_divisible)
from models.mn.block_types import SE_DIMS, InvertedResidual, InvertedResidualConfig

# (input ch, kernel, expanded ch, output ch, SE, activation, stride index or 1)
# stride index i means strides[i] of the `strides` argument; r divides the tail when reduced_tail.
_BLOCKS = [
    (16, 3, 16, 16, False, "RE", None),
    (16, 3, 64, 24, False, "RE", 0),
    (24, 3, 72, 24, False, "RE", None),
    (24, 5, 72, 40, True, "RE", 1),
    (40, 5, 120, 40, True, "RE", None),
    (40, 5, 120, 40, True, "RE", None),
    (40, 3, 240, 80, False, "HS", 2),
    (80, 3, 200, 80, False, "HS", None),
    (80, 3, 184, 80, False, "HS", None),
    (80, 3, 184, 80, False, "HS", None),
    (80, 3, 480, 112, True, "HS", None),
    (112, 3, 672, 112, True, "HS", None),
    (112, 5, 672, "160/r", True, "HS", 3),
    ("160/r", 5, "960/r", "160/r", True, "HS", None),
    ("160/r", 5, "960/r", "160/r", True, "HS", None),
]


def mn_block_configs(width_mult: float = 1.0, reduced_tail: bool = False, dilated: bool = False,
                     strides: Sequence[int] = (2, 2, 2, 2)) -> tuple[list[InvertedResidualConfig], int]:
    """Scaled configuration of the 15 inverted residual blocks and the mlp head's hidden width."""
    if len(strides) != 4 or any(s not in (1, 2) for s in strides):
        raise ValueError(f"strides must be four values of 1 or 2, got {tuple(strides)}")
    r = 2 if reduced_tail else 1
    tail = {"160/r": 160 // r, "960/r": 960 // r}
    configs = []
    for i, (cin, k, exp, cout, se, act, stride_idx) in enumerate(_BLOCKS):
        dilation = 2 if dilated and i >= 12 else 1
        stride = 1 if stride_idx is None else strides[stride_idx]
        configs.append(InvertedResidualConfig.scaled(tail.get(cin, cin), k, tail.get(exp, exp),
                                                     tail.get(cout, cout), se, act, stride, dilation,
                                                     width_mult))
    last_channel = make_divisible(1280 // r * width_mult, 8)
    return configs, last_channel


class MN(AudioTagger):
    """Stem conv -> 15 inverted residual blocks -> 1x1 conv to 6x channels -> head.

    forward(x) returns (logits, embedding): raw logits (B, num_classes) and the global average of
    the last conv output (B, 6 * C). With return_fmaps=True the second value is the list of the 17
    feature maps (stem, blocks, last conv) instead.
    """

    def __init__(self, block_configs: list[InvertedResidualConfig], last_channel: int,
                 num_classes: int = 527, head_type: str = "mlp", multihead_attention_heads: int = 4,
                 input_dims: tuple[int, int] = (128, 1000), se_dims: str = "c", se_agg: str = "max",
                 se_r: int = 4, dropout: float = 0.2, in_conv_kernel: int = 3,
                 in_conv_stride: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        if se_dims != "none" and (not se_dims or any(d not in SE_DIMS for d in se_dims)):
            raise ValueError(f"se_dims must be letters from 'c', 'f', 't' or 'none', got {se_dims!r}")
        stem_channels = block_configs[0].input_channels
        layers: list[nn.Module] = [ConvNormActivation(in_channels, stem_channels, in_conv_kernel,
                                                      stride=in_conv_stride, activation=nn.Hardswish)]
        f, t = (conv_output_size(d, in_conv_kernel, in_conv_stride) for d in input_dims)
        for cnf in block_configs:
            f, t = (conv_output_size(d, cnf.kernel, cnf.conv_stride, cnf.dilation) for d in (f, t))
            layers.append(InvertedResidual(cnf, se_dims, se_r, se_agg, output_size=(f, t)))
        last_in = block_configs[-1].out_channels
        last_out = 6 * last_in
        layers.append(ConvNormActivation(last_in, last_out, kernel_size=1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.head_type = head_type
        self.classifier = classification_head(head_type, last_out, last_channel, num_classes,
                                              multihead_attention_heads, dropout)
        self.head_args = (last_channel, multihead_attention_heads, dropout)
        self.embedding_dim = last_out
        self.num_classes = num_classes
        init_weights(self)

    def stages(self) -> nn.Sequential:
        return self.features


def build_mn(num_classes: int = 527, width_mult: float = 1.0, reduced_tail: bool = False, dilated: bool = False,
             strides: Sequence[int] = (2, 2, 2, 2), head_type: str = "mlp", multihead_attention_heads: int = 4,
             input_dim_f: int = 128, input_dim_t: int = 1000, se_dims: str = "c", se_agg: str = "max",
             se_r: int = 4, dropout: float = 0.2) -> MN:
    """A freshly initialized MN of these plain architecture arguments (the family's builder;
    models.factory resolves released names and loads weights)."""
    configs, last_channel = mn_block_configs(width_mult, reduced_tail, dilated, strides)
    return MN(configs, last_channel, num_classes=num_classes, head_type=head_type,
              multihead_attention_heads=multihead_attention_heads, input_dims=(input_dim_f, input_dim_t),
              se_dims=se_dims, se_agg=se_agg, se_r=se_r, dropout=dropout)
