"""DyMN's inference twins: the eval-only fast block (see models/fast.py) and the batch-free
dynamic convolution ONNX export uses.

`FastDynamicInvertedResidual` computes a `DynamicInvertedResidual` with every norm folded into the
convolution before it, the context sequences reduced over channels_last rows, every
context-driven layer of a block (attention of each dynamic conv, dynamic ReLU coefficients) in
one matrix product, dynamic ReLU as a running maximum of its pieces and coordinate attention in
place. `BatchFreeDynamicConv` is `DynamicConv` without the batch folded into the channel axis
(which would fix the batch size in an exported graph).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.dymn.dy_block import (Context, ContextGen, CoordAtt, DynamicConv, DynamicInvertedResidual,
                                  DyReLUB, StaticWrapper, batched_pointwise)
from models.fast import fast_conv, pointwise_activation


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
    return StaticWrapper(fast_conv(fuse_conv_bn_eval(conv.module, norm), activation))


class BatchFreeDynamicConv(nn.Module):
    """`DynamicConv` without batch-dependent groups (same parameters, same result): a batched
    matrix product with the per-sample mixed kernel for 1x1 convolutions, and for grouped
    (depthwise) ones the K static kernels' outputs mixed by the attention weights (convolution is
    linear in the kernel)."""

    def __init__(self, conv: DynamicConv) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        c = self.conv
        attention = torch.softmax(c.residuals(context[0]) / c.temperature, dim=-1)  # (B, K)
        if c.groups == 1 and c.kernel_size == 1:
            kernels = torch.matmul(attention, c.weight.view(c.k, -1))  # (B, out * in)
            return batched_pointwise(x, kernels.view(-1, c.out_channels, c.in_channels))
        g, per_group = c.groups, c.out_channels // c.groups
        # the K kernels regrouped so that each group's K * per_group outputs are adjacent
        kernels = c.weight.view(c.k, g, per_group, c.in_channels // g, c.kernel_size, c.kernel_size)
        kernels = kernels.transpose(0, 1).reshape(g * c.k * per_group, c.in_channels // g,
                                                  c.kernel_size, c.kernel_size)
        out = nn.functional.conv2d(x, kernels, stride=c.stride, padding=c.padding, groups=g)
        f, t = out.shape[2], out.shape[3]
        out = out.view(-1, g, c.k, per_group, f, t) * attention.view(-1, 1, c.k, 1, 1, 1)
        return out.sum(dim=2).view(-1, c.out_channels, f, t)


FAST_TWINS = {DynamicInvertedResidual: FastDynamicInvertedResidual}
EXPORT_TWINS = {DynamicConv: BatchFreeDynamicConv}
