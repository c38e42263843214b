"""The eval-mode twins of `AugmentMelSTFT`, built from the original's settings and using its
`log_compress` / `normalize`: `FastMelFrontend` (the CPU fast path) and `DFTMelFrontend` (ONNX
export, where torch.stft's complex output does not export)."""
from __future__ import annotations

import math

import torch
from torch import nn

from models.fast import EvalOnly, keep_freed_memory
from models.preprocess import AugmentMelSTFT, log_compress, normalize


class FastMelFrontend(EvalOnly, AugmentMelSTFT):
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
        AugmentMelSTFT.__init__(self, **frontend.settings())
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
        return normalize(log_compress(mel, inplace=True), inplace=True)


def _nonzero_span(flags: torch.Tensor, empty_at: int = 0) -> tuple[int, int]:
    """[first, last + 1) of the True entries of a 1-D mask ((empty_at, empty_at) if there are none)."""
    where = torch.nonzero(flags).flatten()
    return (int(where[0]), int(where[-1]) + 1) if len(where) else (empty_at, empty_at)


class DFTMelFrontend(nn.Module):
    """Eval-mode `AugmentMelSTFT` for ONNX export: the same pre-emphasis, reflect padding and
    windowed one-sided DFT, written as a strided conv1d whose kernels are the window times cosine
    and sine rows (only the frequency bins the mel filterbank uses), then power, mel projection,
    `log_compress` and `normalize`."""

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
        return normalize(log_compress(mel))
