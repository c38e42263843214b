"""ONNX export of MN and DyMN models, optionally with the mel frontend, and an onnxruntime check.

Two parts of the PyTorch graph do not export as they are, so the export works on equivalent
export-only modules:

- The frontend's torch.stft (complex output) becomes `DFTMelFrontend`: the same pre-emphasis,
  reflect padding and windowed one-sided DFT, written as a strided conv1d whose kernels are the
  window times cosine and sine rows (only the frequency bins the mel filterbank uses), then power,
  mel projection, log and normalization.
- DyMN's `DynamicConv` folds the batch into the channel axis (groups = groups x batch), which
  fixes the batch size in the graph. `BatchFreeDynamicConv` computes the same thing with the batch
  kept apart: a batched matrix product with the per-sample mixed kernel for 1x1 convolutions, and
  for grouped (depthwise) ones the K static kernels' outputs mixed by the attention weights
  (convolution is linear in the kernel).

The exported graph takes waveforms (batch, samples) with the frontend, or spectrograms
(batch, 1, n_mels, frames) without, and returns raw logits (batch, classes) and the pooled
embedding (batch, D); batch and time axes are dynamic. The TorchScript-based exporter is used
(the dynamo exporter needs onnxscript, which this project does not install).
"""
from __future__ import annotations

import copy
import io
import math
import os
import warnings
from typing import Optional

import numpy as np
import torch
from torch import nn

from helpers.common.files import atomic_write
from models.dymn.dy_block import Context, DynamicConv
from models.preprocess import AugmentMelSTFT

DEFAULT_OPSET = 17


class DFTMelFrontend(nn.Module):
    """Eval-mode `AugmentMelSTFT` with the STFT as a conv1d over a precomputed DFT basis."""

    def __init__(self, frontend: AugmentMelSTFT) -> None:
        super().__init__()
        n_fft, win = frontend.n_fft, frontend.win_length
        self.n_fft, self.hop = n_fft, frontend.hopsize
        window = torch.zeros(n_fft, dtype=torch.float64)
        left = (n_fft - win) // 2  # torch.stft centres a shorter window inside the frame
        window[left:left + win] = frontend.window.double()
        used = torch.nonzero(frontend.mel_basis.abs().sum(dim=0) > 0).flatten()  # bins with mel weight
        n = torch.arange(n_fft, dtype=torch.float64)
        angle = 2 * math.pi * ((used.double().unsqueeze(1) * n) % n_fft) / n_fft
        basis = torch.cat([window * torch.cos(angle), -window * torch.sin(angle)])
        self.num_bins = len(used)
        self.register_buffer("basis", basis.float().unsqueeze(1))  # (2 * bins, 1, n_fft)
        self.register_buffer("mel_basis", frontend.mel_basis[:, used].clone())
        self.register_buffer("preemphasis", frontend.preemphasis_coefficient.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.conv1d(x.unsqueeze(1), self.preemphasis)  # (B, 1, L - 1)
        x = nn.functional.pad(x, (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        spec = nn.functional.conv1d(x, self.basis, stride=self.hop)  # (B, 2 * bins, T)
        power = spec[:, :self.num_bins].pow(2) + spec[:, self.num_bins:].pow(2)
        mel = torch.matmul(self.mel_basis, power)
        return (torch.log(mel + 0.00001) + 4.5) / 5.0


class BatchFreeDynamicConv(nn.Module):
    """`DynamicConv` without batch-dependent groups (same parameters, same result)."""

    def __init__(self, conv: DynamicConv) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor, context: Context) -> torch.Tensor:
        c = self.conv
        attention = torch.softmax(c.residuals(context[0]) / c.temperature, dim=-1)  # (B, K)
        if c.groups == 1 and c.kernel_size == 1:
            kernels = torch.matmul(attention, c.weight.view(c.k, -1))  # (B, out * in)
            kernels = kernels.view(-1, c.out_channels, c.in_channels)
            out = torch.matmul(kernels, x.flatten(2))  # (B, out, F * T)
            return out.view(out.shape[0], c.out_channels, x.shape[2], x.shape[3])
        g, per_group = c.groups, c.out_channels // c.groups
        # the K kernels regrouped so that each group's K * per_group outputs are adjacent
        kernels = c.weight.view(c.k, g, per_group, c.in_channels // g, c.kernel_size, c.kernel_size)
        kernels = kernels.transpose(0, 1).reshape(g * c.k * per_group, c.in_channels // g,
                                                  c.kernel_size, c.kernel_size)
        out = nn.functional.conv2d(x, kernels, stride=c.stride, padding=c.padding, groups=g)
        f, t = out.shape[2], out.shape[3]
        out = out.view(-1, g, c.k, per_group, f, t) * attention.view(-1, 1, c.k, 1, 1, 1)
        return out.sum(dim=2).view(-1, c.out_channels, f, t)


def exportable_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every DynamicConv replaced by BatchFreeDynamicConv."""
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DynamicConv):
                setattr(parent, name, BatchFreeDynamicConv(child))
    return model


class ExportWrapper(nn.Module):
    """(waveforms or spectrograms) -> (logits, embedding) for export."""

    def __init__(self, model: nn.Module, frontend: Optional[AugmentMelSTFT] = None) -> None:
        super().__init__()
        self.frontend = DFTMelFrontend(frontend) if frontend is not None else None
        self.model = exportable_model(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frontend is not None:
            x = self.frontend(x).unsqueeze(1)
        return self.model(x)


def export_onnx(model: nn.Module, path: str | os.PathLike, frontend: Optional[AugmentMelSTFT] = None,
                opset: int = DEFAULT_OPSET, n_mels: int = 128) -> None:
    """Export `model` (with `frontend` in front when given) to `path`, written atomically, with
    dynamic batch and time axes; the graph is checked with onnx.checker before it is written."""
    import onnx

    wrapper = ExportWrapper(model, frontend).eval()
    if frontend is not None:  # a dummy input of an odd size, so no size is taken for a constant
        dummy, name, axes = torch.randn(2, 3 * frontend.sr + 17) * 0.1, "waveform", {0: "batch", 1: "samples"}
    else:
        dummy, name, axes = torch.randn(2, 1, n_mels, 301), "spectrogram", {0: "batch", 3: "frames"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1")  # reflect padding's Slice
        torch.onnx.export(wrapper, (dummy,), buffer, dynamo=False, opset_version=opset,
                          input_names=[name], output_names=["logits", "embedding"],
                          dynamic_axes={name: axes, "logits": {0: "batch"}, "embedding": {0: "batch"}})
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()), full_check=True)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getvalue())


def run_onnx(path: str | os.PathLike, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embedding) of the exported model at `path` on `inputs`, with onnxruntime on CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, embedding = session.run(["logits", "embedding"],
                                    {session.get_inputs()[0].name: inputs.astype(np.float32)})
    return logits, embedding


@torch.no_grad()
def compare_with_torch(path: str | os.PathLike, model: nn.Module, waveforms: np.ndarray,
                       frontend: AugmentMelSTFT, with_frontend: bool) -> tuple[dict[str, float], np.ndarray]:
    """Largest absolute differences between onnxruntime and the eval-mode PyTorch model (with the
    original frontend) on waveforms (B, L) — keys `logits` and `embedding` — and onnxruntime's
    logits."""
    x = torch.from_numpy(np.ascontiguousarray(waveforms, dtype=np.float32))
    spec = frontend.eval()(x)
    ref_logits, ref_embedding = model.eval()(spec.unsqueeze(1))
    onnx_input = x.numpy() if with_frontend else spec.unsqueeze(1).numpy()
    logits, embedding = run_onnx(path, onnx_input)
    diffs = {"logits": float(np.abs(logits - ref_logits.numpy()).max()),
             "embedding": float(np.abs(embedding - ref_embedding.numpy()).max())}
    return diffs, logits
