"""DyMN's front door (the architecture is in models/dymn/arch.py): `get_model` builds a DyMN, with
the released weights of a registry name when one is given (resolved once, in models.factory)."""
from __future__ import annotations

from typing import Optional, Sequence

from models.dymn.arch import SE_POSITIONS, DyMN, context_size
from models.factory import build_model

__all__ = ["DyMN", "SE_POSITIONS", "context_size", "get_model"]


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
    return build_model("dymn", num_classes, pretrained_name, width_mult=width_mult, strides=strides,
                       context_ratio=context_ratio, max_context_size=max_context_size,
                       min_context_size=min_context_size, dyrelu_k=dyrelu_k, no_dyrelu=no_dyrelu,
                       dyconv_k=dyconv_k, no_dyconv=no_dyconv,
                       T_max=pretrain_final_temp if pretrained_name else T_max, T0_slope=T0_slope,
                       T1_slope=T1_slope, T_min=T_min, no_ca=no_ca, use_dy_blocks=use_dy_blocks,
                       head_type=head_type, dropout=dropout)
