"""Eval-only fast paths for MN, DyMN and the mel frontend (CPU inference).

`fast_model(model)` (what `model.for_inference()` returns) is a copy of an MN or DyMN that
computes the same (logits, embedding) with less work:
- every batch norm folded into the convolution before it (for DyMN's dynamic convolutions into
  each of the K kernels, exact because the softmax weights sum to one);
- channels_last activations throughout; 1x1 convolutions as one matrix product over channels, or
  as a oneDNN convolution where the layer is narrow (`pointwise`), and the largest layers as
  oneDNN convolutions with the activation fused (`conv_activation`);
- MN's channel squeeze-excitation folded into the projection's weights (no pass over the
  activations), the residual added in place;
- DyMN's context sequences reduced over (B, F, T, C) rows, every context-driven layer of a block
  (attention of each dynamic conv, dynamic ReLU coefficients) in one matrix product, dynamic ReLU
  as a running maximum of its pieces and coordinate attention in place.
`FastMelFrontend` is `AugmentMelSTFT` in eval mode with fewer passes over the data and a banded
mel projection. `fast_inference(model, frontend)` picks the pair a command runs, and the fast
path lets glibc's malloc keep freed blocks (`keep_freed_memory`), which alone saves thousands of
page faults per clip. All are for inference only: `train()` raises; training uses the original
modules.
"""
from __future__ import annotations

import copy
import ctypes
import logging
import platform
import sys
import threading
import time

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.dymn.dy_block import (Context, ContextGen, CoordAtt, DynamicConv, DynamicInvertedResidual,
                                  DyReLUB, StaticWrapper)
from models.layers import AudioTagger, ConvNormActivation
from models.mn.block_types import ConcurrentSEBlock, InvertedResidual, SqueezeExcitation
from models.preprocess import AugmentMelSTFT

logger = logging.getLogger(__name__)


class _EvalOnly(nn.Module):
    """Base of the fast modules: train(True) is refused."""

    def train(self, mode: bool = True) -> "_EvalOnly":
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


def _is_pointwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding == (0, 0))


def replace_pointwise_convs(module: nn.Module) -> None:
    """In place: every plain 1x1 Conv2d under `module` becomes a PointwiseConv."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _is_pointwise(child):
                setattr(parent, name, PointwiseConv(child))


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
        self.expand = fast_conv_layer(layers.pop(0)) if _is_pointwise(layers[0][0]) else None
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


class FastTagger(_EvalOnly, AudioTagger):
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

    def for_inference(self, precision: str = "fp32") -> "FastTagger":
        """Itself (already fast); a different precision needs the original model."""
        if PRECISIONS.get(precision) is not self.dtype:
            raise ValueError(f"this fast model computes in {self.dtype}; build {precision!r} from the original")
        return self

    def forward_features(self, x: torch.Tensor, return_fmaps: bool = False):
        return super().forward_features(x.to(self.dtype, memory_format=torch.channels_last), return_fmaps)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward_head(features).float()

    def forward(self, x: torch.Tensor, return_fmaps: bool = False):
        logits, second = super().forward(x, return_fmaps)
        return logits, [f.float() for f in second] if return_fmaps else second.float()


def _bn_scale_shift(norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) with norm(y) == y * scale + shift in eval mode."""
    scale = norm.running_var.add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    return scale, shift if norm.bias is None else shift + norm.bias


class FastDynamicConv(nn.Module):
    """`DynamicConv` followed by its batch norm, in one: the norm's scale is folded into each of
    the K kernels (the attention weights sum to one, so the mixture keeps it) and its shift
    becomes a bias. 1x1 convolutions run through `pointwise` with each sample's mixed kernel;
    other kernels as one convolution per sample. Its attention logits are computed by the block
    together with its other context-driven layers (`FastDynamicInvertedResidual`)."""

    def __init__(self, conv: DynamicConv, norm: nn.BatchNorm2d, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.activation = activation
        scale, shift = _bn_scale_shift(norm)
        shape = (conv.out_channels, conv.in_channels // conv.groups, conv.kernel_size, conv.kernel_size)
        kernels = conv.weight.detach().view(conv.k, *shape) * scale.view(1, -1, 1, 1, 1)
        self.register_buffer("weight", kernels.reshape(conv.k, -1))
        self.register_buffer("bias", shift.detach().clone())
        self.temperature = conv.temperature  # fixed at the model's temperature when it was copied
        self.kernel_shape, self.stride, self.padding, self.groups = shape, conv.stride, conv.padding, conv.groups
        self.pointwise = conv.kernel_size == 1 and conv.groups == 1 and conv.stride == 1 and conv.padding == 0

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """x with each sample's kernel mixture; `logits` (B, K) is this conv's slice of the block's heads."""
        b = x.shape[0]
        kernels = torch.mm(torch.softmax(logits, dim=-1), self.weight).view(b, *self.kernel_shape)
        if self.pointwise:
            return pointwise_activation(x, kernels.flatten(2), self.bias, self.activation)
        outs = [nn.functional.conv2d(x[i:i + 1], kernels[i], self.bias, self.stride, self.padding,
                                     groups=self.groups) for i in range(b)]
        out = outs[0] if b == 1 else torch.cat(outs)
        return out if self.activation is None else self.activation(out)


class FastDyReLU(nn.Module):
    """`DyReLUB` as the running maximum of its M affine pieces (no (B, C, M, F, T) tensor), with
    each piece's coefficients contiguous over channels (broadcast over channels_last activations
    at full vector speed; strided coefficients measured 4.6x slower). Its coefficient logits are
    computed by the block together with its other context-driven layers."""

    def __init__(self, relu: DyReLUB) -> None:
        super().__init__()
        self.channels, self.M = relu.channels, relu.M
        # coefs = (2 sigmoid(z) - 1) * lambdas + init_v = sigmoid(z) * 2 lambdas + (init_v - lambdas)
        self.register_buffer("coef_scale", 2 * relu.lambdas)
        self.register_buffer("coef_shift", relu.init_v - relu.lambdas)

    def forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        coefs = torch.addcmul(self.coef_shift, torch.sigmoid(logits).view(-1, self.channels, 2 * self.M),
                              self.coef_scale)
        coefs = coefs.permute(2, 0, 1).contiguous()[..., None, None]  # (2M, B, C, 1, 1): slopes, intercepts
        out = torch.addcmul(coefs[self.M], x, coefs[0], out=torch.empty_like(x))  # keeps x's layout
        piece = torch.empty_like(x)
        for m in range(1, self.M):
            torch.maximum(out, torch.addcmul(coefs[self.M + m], x, coefs[m], out=piece), out=out)
        return out


class FastCoordAtt(nn.Module):
    """`CoordAtt` in place (its input is the block's own intermediate tensor)."""

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        return x.mul_(context[1].sigmoid()).mul_(context[2].sigmoid())


class FastContextGen(nn.Module):
    """`ContextGen` on channels_last input: the frequency and time sequences are means over
    (B, F, T, C) rows (10x faster than reducing the strided NCHW view), the 1x1 convs matrix
    products over channels with the norm folded in, and the attention sequences are returned as
    views shaped like the original's, (B, E, F', 1) and (B, E, 1, T')."""

    def __init__(self, gen: ContextGen) -> None:
        super().__init__()
        joint = fuse_conv_bn_eval(gen.joint_conv, gen.joint_norm)
        for name, conv in (("joint", joint), ("f", gen.conv_f), ("t", gen.conv_t)):
            self.register_buffer(f"{name}_weight", conv.weight.detach().flatten(1).clone())
            self.register_buffer(f"{name}_bias", conv.bias.detach().clone())
        self.stride = gen.pool_f.stride[0] if isinstance(gen.pool_f, nn.AvgPool2d) else 1

    def _pool(self, seq: torch.Tensor) -> torch.Tensor:
        """The original's average pooling (kernel 3, padding 1, zeros counted) along a (B, L, H) sequence."""
        if self.stride == 1:
            return seq
        return nn.functional.avg_pool1d(seq.transpose(1, 2), 3, self.stride, 1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> Context:
        f = x.shape[2]
        rows = x.permute(0, 2, 3, 1)  # (B, F, T, C)
        joint = nn.functional.linear(torch.cat([rows.mean(2), rows.mean(1)], dim=1), self.joint_weight,
                                     self.joint_bias)
        joint = nn.functional.hardswish(joint, inplace=True)  # (B, F + T, H)
        g_f = nn.functional.linear(self._pool(joint[:, :f]), self.f_weight, self.f_bias)  # (B, F', E)
        g_t = nn.functional.linear(self._pool(joint[:, f:]), self.t_weight, self.t_bias)  # (B, T', E)
        return joint.mean(1), g_f.transpose(1, 2).unsqueeze(3), g_t.transpose(1, 2).unsqueeze(2)


class FastDynamicInvertedResidual(nn.Module):
    """`DynamicInvertedResidual` with every norm folded into the convolution before it, and the
    layers that read the context vector (each dynamic conv's attention, the dynamic ReLU's
    coefficients) stacked into one matrix product per block."""

    def __init__(self, block: DynamicInvertedResidual) -> None:
        super().__init__()
        self.use_res_connect, self.has_expansion = block.use_res_connect, block.has_expansion
        self.context_gen = FastContextGen(block.context_gen)
        if self.has_expansion:
            self.exp_conv = _fold_block_conv(block.exp_conv, block.exp_norm, block.exp_act)
        self.depth_conv = _fold_block_conv(block.depth_conv, block.depth_norm)
        self.depth_act = FastDyReLU(block.depth_act) if isinstance(block.depth_act, DyReLUB) else block.depth_act
        self.ca = FastCoordAtt() if isinstance(block.ca, CoordAtt) else block.ca
        self.proj_conv = _fold_block_conv(block.proj_conv, block.proj_norm)
        heads = {}  # name -> the original's layer reading the context vector, and its logits' divisor
        for name in (["exp_conv"] if self.has_expansion else []) + ["depth_conv", "depth_act", "proj_conv"]:
            layer = getattr(block, name)
            if isinstance(layer, DynamicConv):
                heads[name] = (layer.residuals[0], layer.temperature)
            elif isinstance(layer, DyReLUB):
                heads[name] = (layer.coef_net[0], 1.0)
        self.dynamic = list(heads)
        self.head_sizes = [linear.out_features for linear, _ in heads.values()]
        weights = [linear.weight.detach() / divisor for linear, divisor in heads.values()]
        biases = [linear.bias.detach() / divisor for linear, divisor in heads.values()]
        self.register_buffer("head_weight", torch.cat(weights) if weights else torch.empty(0))
        self.register_buffer("head_bias", torch.cat(biases) if biases else torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context_gen(x)
        heads: dict[str, torch.Tensor] = {}
        if self.dynamic:
            logits = nn.functional.linear(context[0], self.head_weight, self.head_bias)
            heads = dict(zip(self.dynamic, logits.split(self.head_sizes, dim=1)))
        out = x
        if self.has_expansion:
            out = self.exp_conv(out, heads.get("exp_conv"))
        out = self.depth_act(self.depth_conv(out, heads.get("depth_conv")), heads.get("depth_act"))
        out = self.proj_conv(self.ca(out, context), heads.get("proj_conv"))
        return out.add_(x) if self.use_res_connect else out


def _fold_block_conv(conv: nn.Module, norm: nn.BatchNorm2d, activation: nn.Module | None = None) -> nn.Module:
    """A dynamic block's conv (DynamicConv, or a static one in a StaticWrapper) with `norm` folded
    in, followed by `activation`."""
    if isinstance(conv, DynamicConv):
        return FastDynamicConv(conv, norm, activation)
    return StaticWrapper(_fast_conv(fuse_conv_bn_eval(conv.module, norm), activation))


def _fast_conv(conv: nn.Conv2d, activation: nn.Module | None) -> nn.Module:
    """A (folded) conv and its activation: a `PointwiseConv` for 1x1 kernels, else a `ConvActivation`."""
    return PointwiseConv(conv, activation) if _is_pointwise(conv) else ConvActivation(conv, activation)


def fast_conv_layer(layer: ConvNormActivation) -> nn.Module:
    """A Conv-BN-Activation layer (stem, last conv, a block's convs) with its norm folded."""
    fold_batch_norms(layer)
    return _fast_conv(layer[0], layer[2] if len(layer) > 2 else None)


FAST_BLOCKS = {InvertedResidual: FastInvertedResidual, DynamicInvertedResidual: FastDynamicInvertedResidual,
               ConvNormActivation: fast_conv_layer}


def fast_model(model: AudioTagger, precision: str = "fp32") -> FastTagger:
    """The eval-only fast copy of an MN or DyMN (the original is left untouched), computing in
    `precision` ("fp32", or "bf16" on CPUs with native bfloat16; see `check_precision`)."""
    dtype = check_precision(precision, next(model.parameters()).device)
    keep_freed_memory()
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        stages = []
        for stage in model.stages():
            stages.append(FAST_BLOCKS[type(stage)](stage))
            if hasattr(stage, "out_channels"):  # kept for code that picks layers by width
                stages[-1].out_channels = stage.out_channels
        fold_batch_norms(model.classifier)  # the fully convolutional head's 1x1 conv and norm
        replace_pointwise_convs(model.classifier)
    return FastTagger(model, stages, dtype)


class FastMelFrontend(_EvalOnly, AugmentMelSTFT):
    """`AugmentMelSTFT` in eval mode (same settings and attributes), computed with fewer passes
    over the data and about a quarter of the mel projection's work (the same result within float32
    rounding, and as close to a float64 computation): (B, L) waveforms -> (B, n_mels, frames).

    Pre-emphasis is written straight into the reflect-padded signal; each frame is only its
    `win_length` windowed samples, zero-extended to `n_fft` (a circular shift of torch.stft's
    centred window, which leaves the power spectrum unchanged); the FFT runs over contiguous rows;
    the mel projection runs in bands of `MEL_GROUP` filters over only the bins each band covers
    (the triangular filters are zero elsewhere)."""

    MEL_GROUP = 16

    def __init__(self, frontend: AugmentMelSTFT) -> None:
        AugmentMelSTFT.__init__(self, frontend.n_mels, frontend.sr, frontend.win_length, frontend.hopsize,
                                frontend.n_fft, frontend.freqm, frontend.timem, frontend.fmin, frontend.fmax,
                                frontend.fmin_aug_range, frontend.fmax_aug_range)
        self.preemphasis = float(-self.preemphasis_coefficient[0, 0, 0])
        self.window_offset = (self.n_fft - self.win_length) // 2  # torch.stft centres the window
        used = self.mel_basis.abs() > 0
        self.first_bin, self.end_bin = _nonzero_span(used.any(dim=0))
        self.mel_bands: list[tuple[int, int, int, int]] = []  # (first filter, end filter, first bin, end bin)
        for i, start in enumerate(range(0, self.n_mels, self.MEL_GROUP)):
            end = min(start + self.MEL_GROUP, self.n_mels)
            low, high = _nonzero_span(used[start:end].any(dim=0), self.first_bin)
            self.mel_bands.append((start, end, low, high))
            self.register_buffer(f"mel_band_{i}", self.mel_basis[start:end, low:high].clone(), persistent=False)
        keep_freed_memory()
        self.to(frontend.mel_basis.device)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[-1] < 2:
            raise ValueError(f"expected waveforms shaped (batch, samples >= 2), got {tuple(x.shape)}")
        x = x.float()
        batch, length = x.shape[0], x.shape[-1] - 1  # samples after pre-emphasis
        half, hop = self.n_fft // 2, self.hopsize
        size = max(length, half + 1)  # a shorter signal is zero-extended so that it can be reflected
        padded = x.new_empty(batch, size + 2 * half)
        torch.add(x[:, 1:], x[:, :-1], alpha=-self.preemphasis, out=padded[:, half:half + length])
        padded[:, half + length:half + size].zero_()
        padded[:, :half] = padded[:, half + 1:2 * half + 1].flip(-1)
        padded[:, half + size:] = padded[:, size - 1:half + size - 1].flip(-1)
        frames_count = 1 + length // hop
        frames = padded[:, self.window_offset:].unfold(-1, self.win_length, hop)[:, :frames_count]
        windowed = x.new_empty(batch, frames_count, self.n_fft)
        windowed[..., self.win_length:].zero_()
        torch.mul(frames, self.window, out=windowed[..., :self.win_length])
        spec = torch.fft.rfft(windowed.view(-1, self.n_fft))[:, self.first_bin:self.end_bin]
        real, imag = torch.view_as_real(spec).unbind(-1)
        power = torch.addcmul(real.square(), imag, imag).view(batch, frames_count, -1)  # (B, T, bins)
        mel = x.new_empty(batch, self.n_mels, frames_count)
        for i, (start, end, low, high) in enumerate(self.mel_bands):
            band = power[:, :, low - self.first_bin:high - self.first_bin].transpose(1, 2)
            torch.matmul(getattr(self, f"mel_band_{i}"), band, out=mel[:, start:end])
        return mel.add_(0.00001).log_().add_(4.5).div_(5.0)


def _nonzero_span(flags: torch.Tensor, empty_at: int = 0) -> tuple[int, int]:
    """[first, last + 1) of the True entries of a 1-D mask ((empty_at, empty_at) if there are none)."""
    where = torch.nonzero(flags).flatten()
    return (int(where[0]), int(where[-1]) + 1) if len(where) else (empty_at, empty_at)


def fast_inference(model: nn.Module, frontend: AugmentMelSTFT, precision: str = "fp32"
                   ) -> tuple[nn.Module, AugmentMelSTFT]:
    """The (model, frontend) pair to run inference with: on the CPU the fast eval-only copies
    (`model.for_inference(precision)`, `FastMelFrontend`); on a GPU, which runs the plain models
    under autocast, the eval-mode originals (there `precision` must be "fp32")."""
    if next(model.parameters()).device.type != "cpu":
        if precision != "fp32":
            raise ValueError(f"precision {precision!r} is for the CPU; the GPU path runs fp16 autocast")
        return model.eval(), frontend.eval()
    return model.for_inference(precision), FastMelFrontend(frontend)
