"""DyMN: Dynamic MobileNet audio tagger (MN's block table with dynamic blocks).

`get_model` builds a DyMN, optionally with released weights (width and block layout then come
from the registry, and the dynamic-conv temperature is set to its final value).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from models.dymn.dy_block import DynamicConv, DynamicInvertedResidual
from models import pretrained
from models.layers import AudioTagger, ConvNormActivation, classification_head, init_weights, make_divisible
from models.mn.block_types import InvertedResidual, InvertedResidualConfig
from models.mn.model import mn_block_configs

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
        if head_type not in ("mlp", "fully_convolutional", "linear", "concat"):
            raise ValueError(f"DyMN supports head_type mlp, fully_convolutional, linear or concat, got {head_type!r}")
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


def get_model(num_classes: int = 527, pretrained_name: Optional[str] = None,
              width_mult: Optional[float] = None, strides: Optional[Sequence[int]] = None,
              context_ratio: int = 4, max_context_size: int = 128, min_context_size: int = 32,
              dyrelu_k: int = 2, no_dyrelu: bool = False, dyconv_k: int = 4, no_dyconv: bool = False,
              T_max: float = 30.0, T0_slope: float = 1.0, T1_slope: float = 0.02, T_min: float = 1,
              pretrain_final_temp: float = 1.0, no_ca: bool = False,
              use_dy_blocks: Optional[str] = None, head_type: str = "mlp", dropout: float = 0.2) -> DyMN:
    """Build a DyMN. With `pretrained_name` the width and block layout come from the registry,
    T_max becomes `pretrain_final_temp` (1.0: the temperature AudioSet-trained DyMNs run at) and
    the released weights are loaded strictly (a different `num_classes` re-initializes only the
    final classifier layer)."""
    arch = {"width_mult": width_mult, "strides": strides, "use_dy_blocks": use_dy_blocks}
    if pretrained_name:
        entry = pretrained.get_entry(pretrained_name)
        if entry.family != "dymn":
            raise ValueError(f"{pretrained_name!r} is an MN checkpoint; build it with models.mn.model.get_model")
        arch = pretrained.resolve_model_kwargs(entry, arch)
        T_max = pretrain_final_temp
    width = 1.0 if arch["width_mult"] is None else arch["width_mult"]
    configs, last_channel = mn_block_configs(width, strides=(2, 2, 2, 2) if arch["strides"] is None
                                             else arch["strides"])
    model = DyMN(configs, last_channel, num_classes=num_classes, head_type=head_type, width_mult=width,
                 context_ratio=context_ratio, max_context_size=max_context_size,
                 min_context_size=min_context_size, dyrelu_k=dyrelu_k, dyconv_k=dyconv_k,
                 no_dyrelu=no_dyrelu, no_dyconv=no_dyconv, no_ca=no_ca,
                 temp_schedule=(T_max, T_min, T0_slope, T1_slope),
                 use_dy_blocks=arch["use_dy_blocks"] or "all", dropout=dropout)
    if pretrained_name:
        pretrained.load_pretrained_weights(model, pretrained_name)
    return model
