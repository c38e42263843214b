"""MN's front door (the architecture is in models/mn/arch.py): `get_model` builds an MN, with the
released weights of a registry name when one is given (resolved once, in models.factory)."""
from __future__ import annotations

from typing import Optional, Sequence

from models.factory import build_model
from models.mn.arch import MN, mn_block_configs

__all__ = ["MN", "get_model", "mn_block_configs"]


def get_model(num_classes: int = 527, pretrained_name: Optional[str] = None,
              width_mult: Optional[float] = None, reduced_tail: bool = False, dilated: bool = False,
              strides: Optional[Sequence[int]] = None, head_type: Optional[str] = None,
              multihead_attention_heads: int = 4, input_dim_f: int = 128, input_dim_t: int = 1000,
              se_dims: str = "c", se_agg: str = "max", se_r: int = 4, dropout: float = 0.2) -> MN:
    """Build an MN. With `pretrained_name` (a registry name such as "mn04_as") the width, head and
    strides come from the registry and the released weights are loaded strictly; arguments left
    at None take the registry's (or the architecture's default) value. A `num_classes` other than
    the checkpoint's replaces the final classifier layer by a freshly initialized one."""
    return build_model("mn", num_classes, pretrained_name, width_mult=width_mult, reduced_tail=reduced_tail,
                       dilated=dilated, strides=strides, head_type=head_type,
                       multihead_attention_heads=multihead_attention_heads, input_dim_f=input_dim_f,
                       input_dim_t=input_dim_t, se_dims=se_dims, se_agg=se_agg, se_r=se_r, dropout=dropout)
