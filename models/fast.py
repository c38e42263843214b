"""Eval-only fast paths for MN, DyMN and the mel frontend (CPU inference).

`fast_model(model)` (what `model.for_inference()` returns) is a copy of an MN or DyMN that
computes the same (logits, embedding) with less work: every batch norm folded into the convolution
before it (for DyMN's dynamic convolutions into each of the K kernels, exact because the softmax
weights sum to one), channels_last activations (oneDNN runs the other convolutions on them), 1x1
convolutions as one matrix product over channels (batched for DyMN's per-sample kernels), dynamic
ReLU as a running maximum of its pieces and coordinate attention in place. `FastMelFrontend` is
`AugmentMelSTFT` in eval mode with the pre-emphasis as one subtraction, the power spectrum without
a complex-to-real reduction and the mel projection over the frequency bins it uses.
`fast_inference(model, frontend)` picks the pair a command runs. All are for inference only:
`train()` raises; training uses the original modules.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.dymn.dy_block import (Context, ContextGen, CoordAtt, DynamicConv, DynamicInvertedResidual,
                                  DyReLUB, StaticWrapper)
from models.layers import AudioTagger
from models.preprocess import AugmentMelSTFT


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


class PointwiseConv(nn.Module):
    """A 1x1 convolution (stride 1, no groups) as one matrix product over the channels of
    channels_last activations (no layout conversion, no im2col)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().flatten(1))
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.permute(0, 2, 3, 1).contiguous()  # no copy when x is channels_last
        return nn.functional.linear(rows, self.weight, self.bias).permute(0, 3, 1, 2)


def _is_pointwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.padding == (0, 0))


def replace_pointwise_convs(module: nn.Module) -> None:
    """In place: every plain 1x1 Conv2d under `module` becomes a PointwiseConv."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if _is_pointwise(child):
                setattr(parent, name, PointwiseConv(child))


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
    becomes a bias. 1x1 convolutions run as one batched matrix product over channels_last
    activations; other kernels as one convolution per sample with that sample's mixed kernel."""

    def __init__(self, conv: DynamicConv, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        scale, shift = _bn_scale_shift(norm)
        shape = (conv.out_channels, conv.in_channels // conv.groups, conv.kernel_size, conv.kernel_size)
        kernels = conv.weight.detach().view(conv.k, *shape) * scale.view(1, -1, 1, 1, 1)
        self.register_buffer("weight", kernels.reshape(conv.k, -1))
        self.register_buffer("bias", shift.detach().clone())
        self.residuals, self.temperature = conv.residuals, conv.temperature
        self.kernel_shape, self.stride, self.padding, self.groups = shape, conv.stride, conv.padding, conv.groups
        self.pointwise = conv.kernel_size == 1 and conv.groups == 1 and conv.stride == 1 and conv.padding == 0

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        b, _, f, t = x.shape
        attention = torch.softmax(self.residuals(context[0]) / self.temperature, dim=-1)  # (B, K)
        kernels = torch.mm(attention, self.weight).view(b, *self.kernel_shape)
        if self.pointwise:
            rows = x.permute(0, 2, 3, 1).reshape(b, f * t, -1)  # a view for channels_last x
            out = torch.baddbmm(self.bias, rows, kernels.flatten(2).transpose(1, 2))
            return out.view(b, f, t, -1).permute(0, 3, 1, 2)
        outs = [nn.functional.conv2d(x[i:i + 1], kernels[i], self.bias, self.stride, self.padding,
                                     groups=self.groups) for i in range(b)]
        return outs[0] if b == 1 else torch.cat(outs)


class FastDyReLU(nn.Module):
    """`DyReLUB` as the running maximum of its M affine pieces (no (B, C, M, F, T) tensor)."""

    def __init__(self, relu: DyReLUB) -> None:
        super().__init__()
        self.relu = relu

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        r = self.relu
        theta = 2 * torch.sigmoid(r.coef_net(context[0])) - 1
        coefs = (theta.view(-1, r.channels, 2 * r.M) * r.lambdas + r.init_v)[..., None, None]
        out = torch.addcmul(coefs[:, :, r.M], x, coefs[:, :, 0], out=torch.empty_like(x))  # keeps x's layout
        piece = torch.empty_like(x)
        for m in range(1, r.M):
            torch.maximum(out, torch.addcmul(coefs[:, :, r.M + m], x, coefs[:, :, m], out=piece), out=out)
        return out


class FastCoordAtt(nn.Module):
    """`CoordAtt` in place (its input is the block's own intermediate tensor)."""

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        return x.mul_(context[1].sigmoid()).mul_(context[2].sigmoid())


class FastDynamicInvertedResidual(nn.Module):
    """`DynamicInvertedResidual` with every norm folded into the convolution before it."""

    def __init__(self, block: DynamicInvertedResidual) -> None:
        super().__init__()
        self.use_res_connect, self.has_expansion = block.use_res_connect, block.has_expansion
        gen: ContextGen = block.context_gen
        gen.joint_conv = fuse_conv_bn_eval(gen.joint_conv, gen.joint_norm)
        gen.joint_norm = nn.Identity()
        self.context_gen = gen
        if self.has_expansion:
            self.exp_conv, self.exp_act = _fold_block_conv(block.exp_conv, block.exp_norm), block.exp_act
        self.depth_conv = _fold_block_conv(block.depth_conv, block.depth_norm)
        self.depth_act = FastDyReLU(block.depth_act) if isinstance(block.depth_act, DyReLUB) else block.depth_act
        self.ca = FastCoordAtt() if isinstance(block.ca, CoordAtt) else block.ca
        self.proj_conv = _fold_block_conv(block.proj_conv, block.proj_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context_gen(x)
        out = x
        if self.has_expansion:
            out = self.exp_act(self.exp_conv(out, context))
        out = self.ca(self.depth_act(self.depth_conv(out, context), context), context)
        out = self.proj_conv(out, context)
        return out.add_(x) if self.use_res_connect else out


def _fold_block_conv(conv: nn.Module, norm: nn.BatchNorm2d) -> nn.Module:
    """A dynamic block's conv (DynamicConv, or a static one in a StaticWrapper) with `norm` folded in."""
    if isinstance(conv, DynamicConv):
        return FastDynamicConv(conv, norm)
    return StaticWrapper(fuse_conv_bn_eval(conv.module, norm))


def fast_model(model: AudioTagger, precision: str = "fp32") -> FastTagger:
    """The eval-only fast copy of an MN or DyMN (the original is left untouched), computing in
    `precision` ("fp32", or "bf16" on CPUs with native bfloat16; see `check_precision`)."""
    dtype = check_precision(precision, next(model.parameters()).device)
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        stages = [FastDynamicInvertedResidual(m) if isinstance(m, DynamicInvertedResidual) else m
                  for m in model.stages()]
        parts = nn.ModuleList([*stages, model.classifier])
        fold_batch_norms(parts)
        replace_pointwise_convs(parts)
    return FastTagger(model, stages, dtype)


class FastMelFrontend(_EvalOnly, AugmentMelSTFT):
    """`AugmentMelSTFT` in eval mode (same settings and attributes), computed with fewer passes
    over the data (same result within float rounding): (B, L) waveforms -> (B, n_mels, frames)."""

    def __init__(self, frontend: AugmentMelSTFT) -> None:
        AugmentMelSTFT.__init__(self, frontend.n_mels, frontend.sr, frontend.win_length, frontend.hopsize,
                                frontend.n_fft, frontend.freqm, frontend.timem, frontend.fmin, frontend.fmax,
                                frontend.fmin_aug_range, frontend.fmax_aug_range)
        used = torch.nonzero(self.mel_basis.abs().sum(dim=0) > 0).flatten()
        self.first_bin, self.end_bin = int(used[0]), int(used[-1]) + 1
        self.preemphasis = float(-self.preemphasis_coefficient[0, 0, 0])
        self.register_buffer("used_mel_basis", self.mel_basis[:, self.first_bin:self.end_bin].clone(),
                             persistent=False)
        self.to(frontend.mel_basis.device)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[-1] < 2:
            raise ValueError(f"expected waveforms shaped (batch, samples >= 2), got {tuple(x.shape)}")
        x = x.float()
        x = x[:, 1:] - self.preemphasis * x[:, :-1]
        length = x.shape[-1]
        if length <= self.n_fft // 2:
            x = nn.functional.pad(x, (0, self.n_fft // 2 + 1 - length))
        spec = torch.stft(x, self.n_fft, hop_length=self.hopsize, win_length=self.win_length,
                          window=self.window, center=True, pad_mode="reflect", normalized=False,
                          onesided=True, return_complex=True)
        spec = spec[:, self.first_bin:self.end_bin, :1 + length // self.hopsize]
        power = spec.real.square() + spec.imag.square()
        mel = torch.matmul(self.used_mel_basis, power)
        return mel.add_(0.00001).log_().add_(4.5).div_(5.0)


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
