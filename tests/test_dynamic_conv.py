"""DyMN's dynamic convolution (1x1 as a batched matrix product, depthwise over batch x channels)
gives the outputs and gradients of the reference form: one grouped conv with groups x batch groups."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.dymn.dy_block import Context, DynamicConv
from models.dymn.model import get_model


def grouped_reference(conv: DynamicConv, x: torch.Tensor, context: Context) -> torch.Tensor:
    """The original's DynamicConv forward: the batch folded into the channel axis for every kernel."""
    b, _, f, t = x.shape
    attention = torch.softmax(conv.residuals(context[0]) / conv.temperature, dim=-1)
    kernels = torch.mm(attention, conv.weight.view(conv.k, -1))
    kernels = kernels.view(b * conv.out_channels, conv.in_channels // conv.groups, conv.kernel_size,
                           conv.kernel_size)
    out = nn.functional.conv2d(x.reshape(1, -1, f, t), kernels, stride=conv.stride, padding=conv.padding,
                               groups=conv.groups * b)
    return out.view(b, conv.out_channels, out.shape[-2], out.shape[-1])


def _grads(module: nn.Module, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()] + [i.grad.clone() for i in inputs]


def _zero(module: nn.Module, *inputs: torch.Tensor) -> None:
    module.zero_grad()
    for i in inputs:
        i.grad = None


@pytest.mark.parametrize("cin,cout,kernel,stride,groups", [
    (16, 48, 1, 1, 1), (48, 24, 1, 1, 1), (32, 32, 3, 1, 32), (40, 40, 5, 2, 40), (8, 12, 3, 2, 2)])
@pytest.mark.parametrize("temperature", [30.0, 1.0])
def test_matches_grouped_form_forward_and_backward(cin, cout, kernel, stride, groups, temperature):
    torch.manual_seed(0)
    conv = DynamicConv(cin, cout, context_dim=16, kernel_size=kernel, stride=stride,
                       padding=(kernel - 1) // 2, groups=groups)
    conv.temperature = temperature
    x = torch.randn(3, cin, 11, 17, requires_grad=True)
    h = torch.randn(3, 16, requires_grad=True)
    context = (h, torch.empty(0), torch.empty(0))
    weights = torch.randn(3, cout, (11 - 1) // stride + 1, (17 - 1) // stride + 1)

    (conv(x, context) * weights).sum().backward()
    ours, ours_grads = conv(x, context).detach(), _grads(conv, x, h)
    _zero(conv, x, h)
    (grouped_reference(conv, x, context) * weights).sum().backward()
    torch.testing.assert_close(ours, grouped_reference(conv, x, context).detach(), rtol=0, atol=1e-5)
    for a, b in zip(ours_grads, _grads(conv, x, h)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_pointwise_keeps_channels_last():
    torch.manual_seed(0)
    conv = DynamicConv(24, 40, context_dim=8, kernel_size=1)
    x = torch.randn(2, 24, 9, 13)
    context = (torch.randn(2, 8), torch.empty(0), torch.empty(0))
    with torch.no_grad():
        out = conv(x.to(memory_format=torch.channels_last), context)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, grouped_reference(conv, x, context), rtol=0, atol=1e-5)


def test_dymn_matches_grouped_form(monkeypatch):
    """A whole DyMN in training mode: same logits and parameter gradients as with the grouped form."""
    torch.manual_seed(0)
    model = get_model(width_mult=0.2).train()
    x = torch.randn(2, 1, 64, 100)
    states = torch.get_rng_state()

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.set_rng_state(states)  # same dropout draws
        model.zero_grad()
        logits = model(x)[0]
        logits.sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    ours, ours_grads = run()
    monkeypatch.setattr(DynamicConv, "forward", grouped_reference)
    reference, reference_grads = run()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    # float32 sums in another order: the error scales with the largest gradient (AVX-512 kernels
    # differ from AVX2 ones by 1.5e-5 where gradients reach 2.9)
    scale = max(float(b.abs().max()) for b in reference_grads)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)
