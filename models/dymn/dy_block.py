"""DyMN building blocks: dynamic convolution, dynamic ReLU, coordinate attention, the context
generator that drives them, and the dynamic inverted residual block."""
from __future__ import annotations

import torch
from torch import nn

from models.layers import ACTIVATIONS, norm_layer
from models.mn.block_types import InvertedResidualConfig

# The per-block context passed to every dynamic module: (h, g_f, g_t) = global context vector
# (B, H), frequency attention sequence (B, E, F', 1), time attention sequence (B, E, 1, T').
Context = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class DynamicConv(nn.Module):
    """Convolution whose kernel is a per-sample softmax mixture of K kernels, the mixture
    computed from the context vector and sharpened by a temperature that is annealed over epochs."""

    def __init__(self, in_channels: int, out_channels: int, context_dim: int, kernel_size: int,
                 stride: int = 1, padding: int = 0, groups: int = 1, k: int = 4,
                 temp_schedule: tuple[float, float, float, float] = (30.0, 1.0, 1.0, 0.05)) -> None:
        super().__init__()
        if in_channels % groups:
            raise ValueError("in_channels must be divisible by groups")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups, self.k = kernel_size, stride, padding, groups, k
        self.T_max, self.T_min, self.T0_slope, self.T1_slope = temp_schedule
        self.temperature = self.T_max
        self.residuals = nn.Sequential(nn.Linear(context_dim, k))
        kernel_numel = out_channels * (in_channels // groups) * kernel_size * kernel_size
        self.weight = nn.Parameter(torch.empty(1, 1, k, kernel_numel))
        self.reset_kernels()

    def reset_kernels(self) -> None:
        """Kaiming-normal (fan_out) init of each of the K kernels on its conv-shaped view."""
        with torch.no_grad():
            for i in range(self.k):
                nn.init.kaiming_normal_(self.weight[0, 0, i].view(self._kernel_shape()), mode="fan_out")

    def _kernel_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, self.kernel_size, self.kernel_size)

    def update_params(self, epoch: int) -> None:
        """Temperature for `epoch`: linear decay from T_max, then a slower slope, floored at T_min."""
        t0 = self.T_max - self.T0_slope * epoch
        t1 = 1 + self.T1_slope * (self.T_max - 1) / self.T0_slope - self.T1_slope * epoch
        self.temperature = max(t0, t1, self.T_min)

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        attention = torch.softmax(self.residuals(context[0]) / self.temperature, dim=-1)  # (B, K)
        kernels = torch.mm(attention, self.weight.view(self.k, -1))  # (B, kernel numel)
        if self.kernel_size == 1 and self.groups == 1 and self.stride == 1 and self.padding == 0:
            return batched_pointwise(x, kernels.view(-1, self.out_channels, self.in_channels))
        # depthwise (or other grouped) kernels: fold the batch into the channel axis, so that one
        # conv with groups x batch groups applies each sample's kernel (for depthwise kernels a
        # depthwise conv over batch x channels)
        b, _, f, t = x.shape
        kernels = kernels.view(b * self.out_channels, *self._kernel_shape()[1:])
        out = nn.functional.conv2d(x.reshape(1, -1, f, t), kernels, stride=self.stride,
                                   padding=self.padding, groups=self.groups * b)
        return out.view(b, self.out_channels, out.shape[-2], out.shape[-1])


def batched_pointwise(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample 1x1 convolution as one batched matrix product: x (B, Cin, F, T) with kernels
    (B, Cout, Cin) -> (B, Cout, F, T), in x's memory format (channels_last stays channels_last)."""
    b, c, f, t = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = torch.bmm(x.permute(0, 2, 3, 1).reshape(b, f * t, c), kernels.transpose(1, 2))
        return out.view(b, f, t, -1).permute(0, 3, 1, 2)
    return torch.bmm(kernels, x.reshape(b, c, f * t)).view(b, -1, f, t)


class StaticWrapper(nn.Module):
    """Wraps a static module so it takes (x, context) like the dynamic ones (ablations)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        return self.module(x)


class DyReLUB(nn.Module):
    """Dynamic ReLU (variant B): per channel the max of M affine pieces whose slopes and
    intercepts are predicted from the context vector."""

    def __init__(self, channels: int, context_dim: int, M: int = 2) -> None:
        super().__init__()
        self.channels, self.M = channels, M
        self.coef_net = nn.Sequential(nn.Linear(context_dim, 2 * M * channels))
        self.sigmoid = nn.Sigmoid()
        self.register_buffer("lambdas", torch.tensor([1.0] * M + [0.5] * M))
        self.register_buffer("init_v", torch.tensor([1.0] + [0.0] * (2 * M - 1)))

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        theta = 2 * self.sigmoid(self.coef_net(context[0])) - 1
        coefs = theta.view(-1, self.channels, 2 * self.M) * self.lambdas + self.init_v  # (B, C, 2M)
        slopes = coefs[:, :, :self.M, None, None]
        intercepts = coefs[:, :, self.M:, None, None]
        return (x.unsqueeze(2) * slopes + intercepts).max(dim=2).values


class CoordAtt(nn.Module):
    """Coordinate attention: rescale by sigmoid(frequency sequence) * sigmoid(time sequence)."""

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        return x * context[1].sigmoid() * context[2].sigmoid()


class ContextGen(nn.Module):
    """Pools the block input along time and frequency, mixes the concatenated sequences with a
    1x1 conv, and derives the context vector and the coordinate-attention sequences from it."""

    def __init__(self, context_dim: int, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.joint_conv = nn.Conv2d(in_channels, context_dim, 1, bias=False)
        self.joint_norm = norm_layer(context_dim)
        self.joint_act = nn.Hardswish(inplace=True)
        self.conv_f = nn.Conv2d(context_dim, out_channels, 1)
        self.conv_t = nn.Conv2d(context_dim, out_channels, 1)
        if stride > 1:  # match the depthwise conv's output length; padded zeros are counted
            self.pool_f = nn.AvgPool2d((3, 1), stride=(stride, 1), padding=(1, 0))
            self.pool_t = nn.AvgPool2d((1, 3), stride=(1, stride), padding=(0, 1))
        else:
            self.pool_f = nn.Identity()
            self.pool_t = nn.Identity()

    def forward(self, x: torch.Tensor) -> Context:
        f, t = x.shape[2], x.shape[3]
        seq_f = x.mean(3, keepdim=True)  # (B, C, F, 1)
        seq_t = x.mean(2, keepdim=True).permute(0, 1, 3, 2)  # (B, C, T, 1)
        joint = self.joint_act(self.joint_norm(self.joint_conv(torch.cat([seq_f, seq_t], dim=2))))
        h = joint.mean(dim=(2, 3))  # plain mean over all F + T positions
        g_f, g_t = torch.split(joint, [f, t], dim=2)
        g_f = self.conv_f(self.pool_f(g_f))
        g_t = self.conv_t(self.pool_t(g_t.permute(0, 1, 3, 2)))
        return h, g_f, g_t


class DynamicInvertedResidual(nn.Module):
    """Inverted residual block with dynamic convs, dynamic ReLU after the depthwise conv and
    coordinate attention, all conditioned on the block's context."""

    def __init__(self, cnf: InvertedResidualConfig, context_dim: int, dyrelu_k: int = 2,
                 dyconv_k: int = 4, no_dyrelu: bool = False, no_dyconv: bool = False, no_ca: bool = False,
                 temp_schedule: tuple[float, float, float, float] = (30.0, 1.0, 1.0, 0.05)) -> None:
        super().__init__()
        if cnf.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {cnf.stride}")
        cin, exp, cout, k = cnf.input_channels, cnf.expanded_channels, cnf.out_channels, cnf.kernel
        stride = cnf.conv_stride
        self.use_res_connect = cnf.stride == 1 and cin == cout
        self.has_expansion = exp != cin
        activation = ACTIVATIONS[cnf.activation]

        def conv(c_in: int, c_out: int, kernel: int, conv_stride: int = 1, groups: int = 1) -> nn.Module:
            padding = (kernel - 1) // 2
            if no_dyconv:
                return StaticWrapper(nn.Conv2d(c_in, c_out, kernel, conv_stride, padding, groups=groups,
                                               bias=False))
            return DynamicConv(c_in, c_out, context_dim, kernel, conv_stride, padding, groups, dyconv_k,
                               temp_schedule)

        if self.has_expansion:
            self.exp_conv = conv(cin, exp, 1)
            self.exp_norm = norm_layer(exp)
            self.exp_act = activation(inplace=True)
        self.depth_conv = conv(exp, exp, k, stride, groups=exp)
        self.depth_norm = norm_layer(exp)
        self.depth_act = (StaticWrapper(activation(inplace=True)) if no_dyrelu
                          else DyReLUB(exp, context_dim, M=dyrelu_k))
        self.ca = StaticWrapper(nn.Identity()) if no_ca else CoordAtt()
        self.proj_conv = conv(exp, cout, 1)
        self.proj_norm = norm_layer(cout)
        self.context_gen = ContextGen(context_dim, cin, exp, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context_gen(x)
        out = x
        if self.has_expansion:
            out = self.exp_act(self.exp_norm(self.exp_conv(out, context)))
        out = self.depth_act(self.depth_norm(self.depth_conv(out, context)), context)
        out = self.ca(out, context)
        out = self.proj_norm(self.proj_conv(out, context))
        return out + x if self.use_res_connect else out
