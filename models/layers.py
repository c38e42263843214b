"""Building blocks shared by MN and DyMN: channel rounding, Conv-BN-Act, weight init."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn

# BatchNorm settings used everywhere inside the networks (stem, blocks, last conv, context generators).
BN_EPS = 0.001
BN_MOMENTUM = 0.01


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of `divisor` (ties up, at least `divisor`),
    adding one `divisor` if rounding lost more than 10 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def norm_layer(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class ConvNormActivation(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm -> optional activation; children are indexed 0, 1, 2 as in
    the released checkpoints."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, dilation: int = 1,
                 activation: Optional[Callable[..., nn.Module]] = nn.ReLU) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation=dilation,
                      groups=groups, bias=False),
            norm_layer(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {"RE": nn.ReLU, "HS": nn.Hardswish}


def init_weights(model: nn.Module) -> None:
    """Initialization for training from scratch: Kaiming-normal (fan_out) convs, unit norms,
    N(0, 0.01) linears, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv_output_size(size: int, kernel_size: int, stride: int, dilation: int = 1) -> int:
    """Output length of a 'same'-padded convolution (padding (k-1)//2 * d)."""
    padding = (kernel_size - 1) // 2 * dilation
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def classification_head(head_type: str, in_channels: int, hidden_channels: int, num_classes: int,
                        attention_heads: int = 4, dropout: float = 0.2) -> nn.Module:
    """The three heads of the released models; child indices match the checkpoints."""
    if head_type == "mlp":
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, hidden_channels),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(hidden_channels, num_classes),
        )
    if head_type == "fully_convolutional":
        return nn.Sequential(
            nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=False),
            nn.BatchNorm2d(num_classes),  # PyTorch defaults (eps 1e-5) here, as in the checkpoints
            nn.AdaptiveAvgPool2d((1, 1)),
        )
    if head_type == "multihead_attention_pooling":
        return MultiHeadAttentionPooling(in_channels, num_classes, attention_heads)
    raise ValueError(f"unknown head_type {head_type!r}; choose mlp, fully_convolutional or "
                     "multihead_attention_pooling")


class MultiHeadAttentionPooling(nn.Module):
    """PSLA-style attention pooling over time: per head, a sigmoid attention normalized over
    frames weights a linear value path; heads are combined with learned weights."""

    def __init__(self, in_channels: int, num_classes: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.num_classes = num_classes
        self.subspace_proj = nn.Linear(in_channels, num_classes * 2 * heads)
        self.head_weight = nn.Parameter(torch.full((1, heads, 1), 1.0 / heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=2).transpose(1, 2)  # (B, T, C): average over frequency
        b, t, _ = x.shape
        x = self.subspace_proj(x).view(b, t, 2, self.heads, self.num_classes)
        attention = torch.sigmoid(x[:, :, 0]).clamp(1e-7, 1 - 1e-7)
        attention = attention / attention.sum(dim=1, keepdim=True)
        pooled = (attention * x[:, :, 1]).sum(dim=1)  # (B, heads, N)
        return (pooled * self.head_weight).sum(dim=1)


class AudioTagger(nn.Module):
    """The interface MN and DyMN share: `forward_features` (spectrograms (B, 1, F, T) -> last
    feature map), `forward_head` (feature map -> logits (B, N)), `reset_classifier(n)` (a fresh
    final layer for n classes), `update_params(epoch)` (per-epoch settings; a no-op here).
    forward(x) returns (logits, embedding = global average of the last feature map), or with
    return_fmaps=True (logits, list of every stage's output). Subclasses set `classifier`,
    `head_type`, `num_classes`, `embedding_dim` and `head_args` and list their `stages`."""

    classifier: nn.Module
    head_type: str
    num_classes: int
    head_args: tuple[int, int, float]  # hidden width, attention heads, dropout

    def stages(self) -> Iterable[nn.Module]:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor, return_fmaps: bool = False):
        """The last feature map (B, C, F', T'), or the list of every stage's output."""
        fmaps = []
        for stage in self.stages():
            x = stage(x)
            if return_fmaps:
                fmaps.append(x)
        return fmaps if return_fmaps else x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of a last feature map."""
        return self.classifier(features).flatten(1)

    def forward(self, x: torch.Tensor, return_fmaps: bool = False):
        if return_fmaps:
            fmaps = self.forward_features(x, return_fmaps=True)
            return self.forward_head(fmaps[-1]), fmaps
        features = self.forward_features(x)
        return self.forward_head(features), features.mean(dim=(2, 3))

    def update_params(self, epoch: int) -> None:
        """Per-epoch settings (DyMN's temperature); nothing to do for a static model."""

    def classes_in(self, state: dict[str, torch.Tensor]) -> int:
        """Number of classes of a state dict of this architecture (read off its classifier)."""
        if self.head_type == "mlp":
            return state["classifier.5.bias"].shape[0]
        if self.head_type == "fully_convolutional":
            return state["classifier.1.weight"].shape[0]
        return state["classifier.subspace_proj.bias"].shape[0] // (2 * self.head_args[1])

    def reset_classifier(self, num_classes: int) -> list[str]:
        """Replace the final classifier layer (mlp head) or the whole classifier (other heads)
        by a freshly initialized one for `num_classes`; returns the replaced state-dict keys."""
        if self.head_type == "mlp":
            prefix = "classifier.5."
            self.classifier[5] = nn.Linear(self.classifier[5].in_features, num_classes)
            init_weights(self.classifier[5])
        else:
            prefix = "classifier."
            hidden, heads, dropout = self.head_args
            self.classifier = classification_head(self.head_type, self.embedding_dim, hidden, num_classes,
                                                  heads, dropout)
            init_weights(self.classifier)
        self.num_classes = num_classes
        return sorted(k for k in self.state_dict() if k.startswith(prefix))
