"""The family-agnostic part of the eval-only CPU fast path: kernels, folding, the fast tagger,
precision policy and allocator tuning.

`fast_model(model, precision, twins)` is a copy of a tagger that computes the same (logits,
embedding) with less work: every batch norm folded into the convolution before it; channels_last
activations throughout; 1x1 convolutions as one matrix product over channels, or as a oneDNN
convolution where the layer is narrow (`pointwise`), and the largest layers as oneDNN
convolutions with the activation fused (`conv_activation`). Each stage becomes the fast twin its
family's record names for its block type (`models.family.Family.fast_twins`); a stage without one
runs folded and otherwise unchanged. The fast path
lets glibc's malloc keep freed blocks (`keep_freed_memory`), which alone saves thousands of page
faults per clip. All are for inference only: `train()` raises; training uses the original
modules. models/runtime.py picks what a command runs (`for_inference`, `fast_inference`).
"""
from __future__ import annotations

import copy
import ctypes
import logging
import platform
import sys
import threading
import time
from typing import Callable, Mapping

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.layers import AudioTagger, ConvNormActivation

logger = logging.getLogger(__name__)


class EvalOnly(nn.Module):
    """Base of the fast modules: train(True) is refused."""

    def train(self, mode: bool = True) -> "EvalOnly":
        if mode:
            raise RuntimeError(f"{type(self).__name__} is an eval-only inference module; train the "
                               "original model instead")
        return super().train(False)


def fold_batch_norms(module: nn.Module) -> None:
    """In place: in every nn.Sequential (ConvNormActivation, the fully convolutional head) a
    Conv2d followed by a BatchNorm2d becomes one Conv2d with bias and an nn.Identity."""
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = seq._modules[first], seq._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                seq._modules[first] = fuse_conv_bn_eval(conv, norm)
                seq._modules[second] = nn.Identity()


MATMUL_MIN_CHANNELS = 16


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """1x1 convolution of channels_last x (B, in, F, T) with weight (out, in), or per-sample
    weights (B, out, in), plus bias; the result is channels_last. Layers with at least
    `MATMUL_MIN_CHANNELS` input and output channels run as one matrix product over channels (no
    layout conversion, no im2col); narrower ones as a oneDNN convolution, which is faster there
    (measured on AVX2: 3.5x for 8 -> 8 channels at 64 x 500)."""
    b = x.shape[0]
    rows = x.permute(0, 2, 3, 1)  # a view for channels_last x
    if weight.dim() == 3:  # per-sample weights
        flat = torch.bmm(rows.reshape(b, -1, rows.shape[-1]), weight.transpose(1, 2))
        out = flat.view(*rows.shape[:3], -1).permute(0, 3, 1, 2)
        return out if bias is None else out.add_(bias[:, None, None])
    if min(weight.shape) < MATMUL_MIN_CHANNELS:
        return nn.functional.conv2d(x, weight[:, :, None, None], bias)
    return nn.functional.linear(rows.contiguous(), weight, bias).permute(0, 3, 1, 2)


FUSED_MIN_OUTPUTS = 1 << 20
_FUSED_ACTIVATIONS = {nn.ReLU: "relu", nn.Hardswish: "hardswish"}


def conv_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
                    padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                    activation: nn.Module | None) -> torch.Tensor:
    """conv2d followed by `activation` (in place). float32 outputs of at least `FUSED_MIN_OUTPUTS`
    values run as one oneDNN convolution with the activation fused (one pass over the output less;
    a call costs about 60 us more, which only large layers win back; bf16 keeps the plain calls,
    as the fused ones could not be checked on a CPU with native bf16)."""
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    name = _fused_name(x, activation, x.shape[0] * weight.shape[0] * size[0] * size[1])
    if name:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                       name, [], "")
    out = nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return out if activation is None else activation(out)


def _fused_name(x: torch.Tensor, activation: nn.Module | None, outputs: int) -> str | None:
    """oneDNN's name for `activation` when a conv of x with `outputs` output values runs fused."""
    name = _FUSED_ACTIVATIONS.get(type(activation), "none" if activation is None else None)
    if (name and x.dtype == torch.float32 and outputs >= FUSED_MIN_OUTPUTS and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return name
    return None


class ConvActivation(nn.Module):
    """A convolution (norm folded in) and its activation, through `conv_activation`."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_activation(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                               self.activation)


class PointwiseConv(nn.Module):
    """A 1x1 convolution (stride 1, no groups) with its optional activation, on channels_last
    activations (see `pointwise`; large outputs with an activation go through `conv_activation`).
    `forward(x, scale)` multiplies input channel c of sample b by scale[b, c] through the weights,
    which is how a channel squeeze-excitation before the layer costs no pass over the activations."""

    def __init__(self, conv: nn.Conv2d, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().flatten(1))  # (out, in)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach())
        self.activation = activation

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if scale is None else self.weight * scale[:, None, :]  # (B, out, in)
        return pointwise_activation(x, weight, self.bias, self.activation)


def pointwise_activation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         activation: nn.Module | None) -> torch.Tensor:
    """`pointwise` then `activation` (in place); one weight for a large output with an activation
    goes through `conv_activation` (fused). Per-sample weights of a batch of one are one weight."""
    if weight.dim() == 3 and x.shape[0] == 1:
        weight = weight[0]
    if activation is not None and weight.dim() == 2 and \
            _fused_name(x, activation, x.shape[0] * x.shape[2] * x.shape[3] * weight.shape[0]):
        return conv_activation(x, weight[:, :, None, None], bias, (1, 1), (0, 0), (1, 1), 1, activation)
    out = pointwise(x, weight, bias)
    return out if activation is None else activation(out)


def is_pointwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding == (0, 0))


def replace_pointwise_convs(module: nn.Module) -> None:
    """In place: every plain 1x1 Conv2d under `module` becomes a PointwiseConv."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if is_pointwise(child):
                setattr(parent, name, PointwiseConv(child))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_KEPT_BYTES = 1 << 30
# freed heap memory kept for reuse at most; above it the excess goes back to the kernel
KEPT_FREE_BYTES = 512 << 20
RELEASE_CHECK_SECONDS = 1.0
_malloc_tuned: bool | None = None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep up to `KEPT_FREE_BYTES` of freed memory for reuse (process-wide, once).

    By default glibc returns every freed block above 128 KiB-32 MiB to the kernel, so each new
    activation tensor of a forward pass is faulted in page by page and zeroed again: about 2,700
    page faults per 10-s clip for mn04, and a quarter to half of the fast path's time at batch 16
    (measured; see benchmarks/bench_inference.py). Raising the mmap and trim thresholds makes the
    heap reuse those blocks, as PyTorch's CUDA caching allocator does on a GPU. Unbounded, the heap
    fragments over a long run (a 1-hour recording at 1-s hops once grew to 8.6 GB), so a daemon
    thread checks the heap's free bytes every `RELEASE_CHECK_SECONDS` and, above the bound, gives
    the free pages back (malloc_trim): the working set of a batch stays, fragmentation does not.
    Called by the fast inference paths; returns whether it applied (glibc only; elsewhere nothing
    changes)."""
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                libc.mallinfo2.restype = _MallInfo2
                _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEPT_BYTES)
                                     and libc.mallopt(_M_TRIM_THRESHOLD, _KEPT_BYTES))
            except (OSError, AttributeError) as error:  # mallinfo2: glibc 2.33+
                logger.debug("malloc thresholds left as they are: %s", error)
            if _malloc_tuned:
                threading.Thread(target=_release_excess, args=(libc,), name="release-freed-memory",
                                 daemon=True).start()
        logger.debug("malloc keeps freed blocks: %s", _malloc_tuned)
    return _malloc_tuned


def _release_excess(libc: ctypes.CDLL) -> None:
    """Forever: give the heap's free pages back whenever it holds more than `KEPT_FREE_BYTES` free."""
    while True:
        time.sleep(RELEASE_CHECK_SECONDS)
        if libc.mallinfo2().fordblks > KEPT_FREE_BYTES:
            libc.malloc_trim(0)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bf16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as oneDNN detects it."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def check_precision(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype for `precision` ("fp32" or "bf16"); ValueError for an unknown name, RuntimeError
    for bf16 on a CPU without native bfloat16 (where it would only be emulated, slowly)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and torch.device(device).type == "cpu" and not bf16_supported():
        raise RuntimeError(f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16 "
                           "(AVX512-BF16 or AMX), where bf16 would be slower than fp32; use fp32")
    return PRECISIONS[precision]


class FastTagger(EvalOnly, AudioTagger):
    """Eval-only tagger with the AudioTagger interface: `stages` then `classifier` on
    channels_last activations in `dtype`; logits, embeddings and feature maps come out in float32."""

    def __init__(self, model: AudioTagger, stages: list[nn.Module], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(stages)
        self.classifier, self.dtype = model.classifier, dtype
        self.head_type, self.head_args = model.head_type, model.head_args
        self.num_classes, self.embedding_dim = model.num_classes, model.embedding_dim
        self.to(dtype=dtype, memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    def stages(self) -> nn.ModuleList:
        return self.blocks

    def forward_features(self, x: torch.Tensor, return_fmaps: bool = False):
        return super().forward_features(x.to(self.dtype, memory_format=torch.channels_last), return_fmaps)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return super().forward_head(features, pre_logits).float()

    def forward(self, x: torch.Tensor, return_fmaps: bool = False):
        logits, second = super().forward(x, return_fmaps)
        return logits, [f.float() for f in second] if return_fmaps else second.float()


def fast_conv(conv: nn.Conv2d, activation: nn.Module | None) -> nn.Module:
    """A (folded) conv and its activation: a `PointwiseConv` for 1x1 kernels, else a `ConvActivation`."""
    return PointwiseConv(conv, activation) if is_pointwise(conv) else ConvActivation(conv, activation)


def fast_conv_layer(layer: ConvNormActivation) -> nn.Module:
    """A Conv-BN-Activation layer (stem, last conv, a block's convs) with its norm folded."""
    fold_batch_norms(layer)
    return fast_conv(layer[0], layer[2] if len(layer) > 2 else None)


class FoldedStage(nn.Module):
    """A stage without a fast twin: the original (norms after a conv folded in, otherwise
    unchanged), its output handed on channels_last like the twins'."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        fold_batch_norms(stage)
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x).contiguous(memory_format=torch.channels_last)


Twins = Mapping[type, Callable[[nn.Module], nn.Module]]
GENERIC_TWINS: dict[type, Callable[[nn.Module], nn.Module]] = {ConvNormActivation: fast_conv_layer}


def fast_stage(stage: nn.Module, twins: Twins) -> nn.Module:
    """The twin `twins` name for the stage's exact type (a subclass may compute something else),
    else the stage folded and otherwise unchanged (`FoldedStage`, logged)."""
    make = twins.get(type(stage)) or GENERIC_TWINS.get(type(stage))
    if make is None:
        logger.info("%s has no fast twin; it runs folded and otherwise unchanged", type(stage).__name__)
        fast = FoldedStage(stage)
    else:
        fast = make(stage)
    if hasattr(stage, "out_channels"):  # kept for code that picks layers by width
        fast.out_channels = stage.out_channels
    return fast


def fast_model(model: AudioTagger, precision: str = "fp32", twins: Twins | None = None) -> FastTagger:
    """The eval-only fast copy of a tagger (the original is left untouched), computing in
    `precision` ("fp32", or "bf16" on CPUs with native bfloat16; see `check_precision`): each
    stage replaced by the twin `twins` (block type -> builder; the families' records hold them)
    names for it, see `fast_stage`."""
    dtype = check_precision(precision, next(model.parameters()).device)
    keep_freed_memory()
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        stages = [fast_stage(stage, twins or {}) for stage in model.stages()]
        fold_batch_norms(model.classifier)  # the fully convolutional head's 1x1 conv and norm
        replace_pointwise_convs(model.classifier)
    return FastTagger(model, stages, dtype)
