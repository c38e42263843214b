"""What a model costs: parameters, multiply-accumulate operations (MACs), analytical peak memory
and receptive field, computed the way the original EfficientAT tools compute them.

Everything is read from one traced forward pass of a single 10-second spectrogram (batch 1;
helpers/analysis/trace.py): hooks record every executed convolution (static Conv2d and the dynamic
convolutions a family names, such as DyMN's), every Linear call and every inverted residual block
with its input and output sizes. Only shapes matter, so models
are built and traced on the "meta" device: no weights are allocated, nothing is computed, and even
the width-4.0 models take well under a second.

MACs: Conv2d = Cout * (kh * kw * Cin / groups + [bias]) * Hout * Wout; Linear = its weight and
bias elements, once per call (the original counter's rules). The original counter skips DyMN's
dynamic convolutions; here each dynamic convolution counts as a bias-free conv of its kernel shape
plus the mixing of its K kernels (K * kernel elements), see `MacCount`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from helpers.analysis.trace import ModelTrace, trace_model
from models.factory import FAMILIES, build_model as build_family_model, create_frontend, create_model, family_of
from models.preprocess import AugmentMelSTFT
from models.pretrained import REGISTRY, get_entry

CLIP_SECONDS = 10.0


def count_params(model: nn.Module) -> int:
    """Number of elements of all parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward pass, by kind. `reference_total` is what the original counter reports
    (static convs and Linear layers only); `total` adds DyMN's dynamic convolutions, counted as
    bias-free convs of their kernel shape, and their kernel mixing. Both are equal for MN.
    Batch norm, activations (DyReLU included), pooling, SE/coordinate-attention rescaling and
    residual additions are not counted."""
    conv: int
    conv_layers: int
    dynamic_conv: int
    dynamic_conv_layers: int
    kernel_mixing: int
    linear: int
    linear_layers: int
    uncounted: dict[str, int]
    dynamic_conv_kinds: tuple[str, ...] = ()  # type names of the dynamic convolutions

    @property
    def reference_total(self) -> int:
        return self.conv + self.linear

    @property
    def total(self) -> int:
        return self.conv + self.dynamic_conv + self.kernel_mixing + self.linear


def count_macs(trace: ModelTrace) -> MacCount:
    """MACs of the traced forward pass (see MacCount for what is counted)."""
    static = [c for c in trace.convs if not c.dynamic]
    dynamic = [c for c in trace.convs if c.dynamic]
    return MacCount(sum(c.macs for c in static), len(static), sum(c.macs for c in dynamic), len(dynamic),
                    sum(c.mixing_macs for c in dynamic), sum(l.macs for l in trace.linears),
                    len(trace.linears), trace.uncounted, tuple(dict.fromkeys(c.kind for c in dynamic)))


@dataclass(frozen=True)
class PeakMemory:
    """Activation memory per recorded entry (label, elements) and its maximum."""
    entries: tuple[tuple[str, int], ...]
    bits_per_elem: int = 16

    def kilobytes(self, elements: int) -> float:
        """Elements -> kB (1 kB = 1000 bytes) at `bits_per_elem` bits per element."""
        return elements * self.bits_per_elem / 8 / 1000

    @property
    def peak_elements(self) -> int:
        return max(elements for _, elements in self.entries)

    @property
    def peak_kb(self) -> float:
        return self.kilobytes(self.peak_elements)


def _check_bits(bits_per_elem: int) -> None:
    if bits_per_elem < 1:
        raise ValueError(f"bits per element must be positive, got {bits_per_elem}")


def peak_memory_cnn(trace: ModelTrace, bits_per_elem: int = 16) -> PeakMemory:
    """Layer-by-layer inference: every convolution holds its input and output; inside a block with
    a residual connection, a conv that does not read the block input itself also holds that input
    (the copy kept for the addition). Weights are streamed from flash and not counted."""
    _check_bits(bits_per_elem)
    entries = []
    for i, conv in enumerate(trace.convs, 1):
        elements = conv.in_numel + conv.out_numel
        if conv.block is not None:
            block = trace.blocks[conv.block]
            if block.residual and not conv.reads_block_input:
                elements += block.in_numel
        entries.append((f"conv {i}", elements))
    return PeakMemory(tuple(entries), bits_per_elem)


def peak_memory_mnv3(trace: ModelTrace, bits_per_elem: int = 16) -> PeakMemory:
    """Memory-efficient inverted-residual inference (the expanded representation is computed in
    8 slices, Lin et al., NeurIPS 2021): one entry per block, with the original's rules.

    - Block 1, fused with the stem: spectrogram + block output + 2 slices of the block input
      (before and after the depthwise conv).
    - A block with squeeze-excitation (which needs the whole expanded map): projection input +
      projection output + block input.
    - Any other block: block input + output + one slice of the expanded map before and one after
      the strided depthwise conv, F_in*T_in*E/8 + floor(F_in/s)*floor(T_in/s)*E/8. A block without
      expansion conv (width 0.1; the original raises here) has no expanded map: its depthwise conv
      reads the stored block input, so only the slice after it counts (E = input channels).
      DyMN blocks follow this rule: their context is computed from the block input beforehand,
      and dynamic convs, dynamic ReLU and coordinate attention then work slice by slice.
    The stem alone, the last conv and the head are not recorded. A model without blocks of this
    kind (a family counting none) has nothing to slice: it runs layer by layer (`peak_memory_cnn`)."""
    _check_bits(bits_per_elem)
    if not trace.blocks:
        return peak_memory_cnn(trace, bits_per_elem)
    entries = []
    for index, block in enumerate(trace.blocks):
        convs = trace.block_convs(index)
        _, c_in, f_in, t_in = block.in_shape
        if index == 0:
            elements = math.prod(trace.input_shape) + block.out_numel + 2 * (f_in * t_in * c_in // 8)
        elif block.squeeze_excitation:
            projection = convs[-1]
            elements = projection.in_numel + projection.out_numel + block.in_numel
        else:
            expansion = next((c for c in convs if c.reads_block_input and c.groups == 1), None)
            depthwise = next(c for c in convs if c.groups > 1)
            expanded = c_in if expansion is None else expansion.out_shape[1]
            s_f, s_t = depthwise.stride
            elements = block.in_numel + block.out_numel + (f_in // s_f) * (t_in // s_t) * expanded // 8
            if expansion is not None:
                elements += f_in * t_in * expanded // 8
        entries.append((f"block {index + 1}", elements))
    return PeakMemory(tuple(entries), bits_per_elem)


def receptive_field(trace: ModelTrace) -> tuple[int, int]:
    """Receptive field (frequency bins, frames) of the executed convolutions: from r = 1 at the last
    conv back to the first, r = s * r + (k_eff - s) with k_eff = (k - 1) * d + 1, per axis. DyMN's
    context pooling (global by construction) is not part of it."""
    rf = [1, 1]
    for conv in reversed(trace.convs):
        for axis in (0, 1):
            k_eff = (conv.kernel[axis] - 1) * conv.dilation[axis] + 1
            rf[axis] = conv.stride[axis] * rf[axis] + k_eff - conv.stride[axis]
    return rf[0], rf[1]


def clip_input_size(frontend: AugmentMelSTFT, clip_seconds: float = CLIP_SECONDS) -> tuple[int, int, int, int]:
    """Model input size (1, 1, n_mels, frames) for one clip of `clip_seconds` through `frontend`."""
    return 1, 1, frontend.n_mels, frontend.num_frames(round(clip_seconds * frontend.sr))


def untrained_model(name: Optional[str] = None, width_mult: Optional[float] = None,
                head_type: Optional[str] = None, strides: Optional[Sequence[int]] = None,
                options: Optional[Mapping[str, Any]] = None, input_size: Sequence[int] = (1, 1, 128, 1000),
                device: str | torch.device = "meta") -> nn.Module:
    """The architecture of registry model `name` (or, without a name, a plain model of the default
    family of `width_mult`) with fresh weights on `device`; nothing is downloaded. Arguments that
    are not None override the registry's; `options` are the family's architecture options
    (`Option.architecture`, e.g. MN's se_dims). Arguments that follow the input size (MN's
    frequency / time squeeze-excitation) are sized for `input_size`."""
    family = FAMILIES[family_of(name)]
    if name:
        get_entry(name)  # unknown names: ValueError with close matches
    given = {k: v for k, v in (options or {}).items() if v is not None}
    for option in given:
        if option not in family.options:
            owners = [f.label for f in FAMILIES.values() if option in f.options]
            raise ValueError(f"{name or 'this model'} is a {family.label}, which has no --{option} (an option of "
                             f"{', '.join(owners) or 'no family'})")
    kwargs = {"head_type": head_type, "strides": strides, **given, **family.input_size_kwargs(input_size)}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with torch.device(device):
        if name:
            return create_model(name, pretrained=False, **kwargs)
        return build_family_model(family.name, width_mult=1.0 if width_mult is None else width_mult, **kwargs)


@dataclass(frozen=True)
class ModelCost:
    input_size: tuple[int, ...]
    params: int
    macs: MacCount
    peak_memory: PeakMemory  # layer-by-layer
    peak_memory_efficient: PeakMemory  # memory-efficient inverted-residual inference
    receptive_field: tuple[int, int]


def analyze(model: nn.Module, input_size: Sequence[int], bits_per_elem: int = 16) -> ModelCost:
    """All costs of `model` for one input of `input_size` from a single traced forward pass."""
    return _cost(trace_model(model, input_size), count_params(model), bits_per_elem)


def _cost(trace: ModelTrace, params: int, bits_per_elem: int) -> ModelCost:
    return ModelCost(trace.input_shape, params, count_macs(trace), peak_memory_cnn(trace, bits_per_elem),
                     peak_memory_mnv3(trace, bits_per_elem), receptive_field(trace))


# (family, model arguments, input size) -> (trace, parameter count): re-runs of one architecture
# (mn40_as(2), ...) and repeated tables in one process share a trace
_REGISTRY_TRACES: dict[tuple, tuple[ModelTrace, int]] = {}


def registry_costs(bits_per_elem: int = 16) -> list[dict[str, Any]]:
    """One row per AudioSet model of the registry: architecture and input size (from its model and
    frontend settings), computed costs, and the published mAP, parameters and MACs."""
    rows = []
    for name, entry in REGISTRY.items():
        if not entry.audioset:
            continue
        arch = entry.model_kwargs
        size = clip_input_size(create_frontend(name))
        key = (entry.family, tuple(sorted(arch.items())), size)
        if key not in _REGISTRY_TRACES:
            model = untrained_model(name, input_size=size)
            _REGISTRY_TRACES[key] = trace_model(model, size), count_params(model)
        cost = _cost(*_REGISTRY_TRACES[key], bits_per_elem)
        rows.append({
            "name": name, "family": entry.family, "width_mult": arch.get("width_mult"),
            "head_type": arch.get("head_type", "mlp"), "strides": ",".join(map(str, arch.get("strides", ()))),
            "n_mels": size[2], "frames": size[3], "params": cost.params, "macs": cost.macs.total,
            "peak_memory_kB": cost.peak_memory.peak_kb,
            "peak_memory_efficient_kB": cost.peak_memory_efficient.peak_kb,
            "receptive_field": f"{cost.receptive_field[0]}x{cost.receptive_field[1]}",
            "map": entry.map, "published_params_m": entry.params_m, "published_macs_g": entry.macs_g,
        })
    return rows
