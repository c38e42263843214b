"""One traced forward pass of a model: every executed convolution (static Conv2d and the dynamic
convolutions a family names, `Family.dynamic_convs`), every Linear call and every block a family
counts (`Family.blocks`) with its input and output sizes, the record complexity analysis
computes costs from (helpers/analysis/complexity.py). Only shapes matter, so models are traced on
the "meta" device."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from models.factory import FAMILIES

# block type -> (residual, squeeze-excitation); dynamic conv type -> kernels it mixes: of every family
BLOCKS = {block: traits for family in FAMILIES.values() for block, traits in family.blocks.items()}
DYNAMIC_CONVS = {layer: kernels for family in FAMILIES.values() for layer, kernels in family.dynamic_convs.items()}


def _rule(table: dict[type, Callable], module: nn.Module) -> Optional[Callable]:
    return next((rule for kind, rule in table.items() if isinstance(module, kind)), None)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class _Tensors:
    """Element counts of a recorded call's input and output."""
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def in_numel(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape)


@dataclass(frozen=True)
class ConvCall(_Tensors):
    """One executed convolution: its geometry, tensor shapes and enclosing block."""
    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    bias: bool
    dynamic: bool = False  # a dynamic conv: per-sample mixture of `num_kernels` kernels
    num_kernels: int = 1
    block: Optional[int] = None  # index into ModelTrace.blocks, None outside the blocks
    reads_block_input: bool = False  # its input is the enclosing block's input tensor itself
    kind: str = "Conv2d"  # the layer's type name

    @property
    def kernel_numel(self) -> int:
        return self.out_shape[1] * (self.in_shape[1] // self.groups) * self.kernel[0] * self.kernel[1]

    @property
    def macs(self) -> int:
        """Cout * (kh * kw * Cin / groups + bias) * Hout * Wout."""
        per_output = self.kernel[0] * self.kernel[1] * self.in_shape[1] // self.groups + int(self.bias)
        return self.out_numel * per_output

    @property
    def mixing_macs(self) -> int:
        """MACs of a dynamic conv's kernel aggregation (K attention weights times K kernels)."""
        return self.num_kernels * self.kernel_numel if self.dynamic else 0


@dataclass(frozen=True)
class LinearCall:
    name: str
    weight_numel: int
    bias_numel: int

    @property
    def macs(self) -> int:
        """Weight plus bias elements, once per call, however many positions the layer is applied to."""
        return self.weight_numel + self.bias_numel


@dataclass(frozen=True)
class BlockCall(_Tensors):
    """One executed block of a type a family counts (an inverted residual block)."""
    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    residual: bool
    squeeze_excitation: bool


@dataclass(frozen=True)
class ModelTrace:
    """Everything the cost functions need, recorded from one forward pass."""
    input_shape: tuple[int, ...]
    convs: tuple[ConvCall, ...]
    linears: tuple[LinearCall, ...]
    blocks: tuple[BlockCall, ...]
    uncounted: dict[str, int]  # leaf module type -> number of calls (BatchNorm2d, ReLU, ...)

    def block_convs(self, index: int) -> list[ConvCall]:
        return [c for c in self.convs if c.block == index]


def trace_model(model: nn.Module, input_size: Sequence[int] = (1, 1, 128, 1000)) -> ModelTrace:
    """Run `model` once on a random tensor of `input_size` (batch 1, on the model's device, in eval
    mode and without gradients) and record its convolutions, Linear calls and blocks."""
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) != 4 or input_size[0] != 1:
        raise ValueError(f"input size must be (batch 1, channels, mel bins, frames), got {input_size}")
    names = {m: n for n, m in model.named_modules()}
    convs: list[ConvCall] = []
    linears: list[LinearCall] = []
    blocks: list[BlockCall] = []
    uncounted: Counter[str] = Counter()
    open_blocks: list[tuple[int, torch.Tensor]] = []

    def block_start(module: nn.Module, inputs: tuple) -> None:
        open_blocks.append((len(blocks), inputs[0]))
        residual, has_se = _rule(BLOCKS, module)(module)
        blocks.append(BlockCall(names[module], tuple(inputs[0].shape), (), residual, has_se))

    def block_end(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        index, _ = open_blocks.pop()
        blocks[index] = replace(blocks[index], out_shape=tuple(output.shape))

    def conv_done(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        block, block_input = open_blocks[-1] if open_blocks else (None, None)
        kernels = _rule(DYNAMIC_CONVS, module)
        convs.append(ConvCall(
            names[module], tuple(inputs[0].shape), tuple(output.shape), _pair(module.kernel_size),
            _pair(module.stride), _pair(getattr(module, "dilation", 1)), module.groups,
            getattr(module, "bias", None) is not None, kernels is not None,
            1 if kernels is None else kernels(module), block, inputs[0] is block_input,
            type(module).__name__))

    def linear_done(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        linears.append(LinearCall(names[module], module.weight.numel(),
                                  0 if module.bias is None else module.bias.numel()))

    def other_leaf_done(module: nn.Module, inputs: tuple, output: Any) -> None:
        uncounted[type(module).__name__] += 1

    handles = []
    for module in model.modules():
        if _rule(BLOCKS, module):
            handles += [module.register_forward_pre_hook(block_start), module.register_forward_hook(block_end)]
        if isinstance(module, nn.Conv2d) or _rule(DYNAMIC_CONVS, module):
            handles.append(module.register_forward_hook(conv_done))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_done))
        elif not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(other_leaf_done))
    _run_hooked(model, input_size, handles)
    return ModelTrace(input_size, tuple(convs), tuple(linears), tuple(blocks), dict(uncounted))


def _run_hooked(model: nn.Module, input_size: tuple[int, ...], handles: list) -> None:
    """One forward pass on a random input, in eval mode and without gradients; the hooks
    `handles` are removed and the model's mode restored after it."""
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(input_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
