"""Waveform -> normalized log-mel spectrogram, the input every MN and DyMN model expects.

Bit-exact with the original EfficientAT frontend in eval mode: pre-emphasis, centered STFT with a
symmetric Hann window, Kaldi-style mel filterbank, `log_compress`, `normalize`. In training mode
the filterbank edges are randomized per call and optional frequency/time masks are drawn
independently for every example.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn


LOG_OFFSET, NORM_SHIFT, NORM_SCALE = 0.00001, 4.5, 5.0  # log(mel + offset), (x + shift) / scale
EVAL_SETTINGS = ("n_mels", "sr", "win_length", "hopsize", "n_fft", "fmin", "fmax")
SPECTROGRAM_SHAPE = ("n_mels", "sr", "win_length", "hopsize", "n_fft")  # what a trained model fixes


def log_compress(mel: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """log(mel + LOG_OFFSET): the mel power's logarithm (in place when `inplace`)."""
    return mel.add_(LOG_OFFSET).log_() if inplace else (mel + LOG_OFFSET).log()


def normalize(log_mel: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """(log_mel + NORM_SHIFT) / NORM_SCALE: the fixed normalization every released model expects."""
    return log_mel.add_(NORM_SHIFT).div_(NORM_SCALE) if inplace else (log_mel + NORM_SHIFT) / NORM_SCALE


def _check_band_edges(n_mels: int, n_fft: int, sr: float, fmin: float, fmax: float) -> None:
    if n_mels <= 3:
        raise ValueError(f"n_mels must be greater than 3, got {n_mels}")
    if n_fft % 2:
        raise ValueError(f"n_fft must be even, got {n_fft}")
    nyquist = 0.5 * sr
    fmax = fmax + nyquist if fmax <= 0.0 else fmax
    if not (0.0 <= fmin < nyquist and 0.0 < fmax <= nyquist and fmin < fmax):
        raise ValueError(f"invalid mel band edges fmin={fmin}, fmax={fmax} for sample rate {sr}")


def kaldi_mel_banks(n_mels: int, n_fft: int, sr: float, fmin: float, fmax: float) -> torch.Tensor:
    """Kaldi's triangular mel filterbank (natural-log mel scale, triangles in the mel domain, no
    area normalization), shape (n_mels, n_fft // 2 + 1); the Nyquist column is all zeros. fmax <= 0
    counts from the Nyquist frequency.

    Computed in float32 the way Kaldi/torchaudio compute it, which the released models were
    trained with."""
    _check_band_edges(n_mels, n_fft, sr, fmin, fmax)
    return mel_banks(n_mels, n_fft, sr, torch.tensor(float(fmin), dtype=torch.float64),
                     torch.tensor(float(fmax), dtype=torch.float64))


def mel_banks(n_mels: int, n_fft: int, sr: float, fmin: torch.Tensor, fmax: torch.Tensor) -> torch.Tensor:
    """`kaldi_mel_banks` for band edges given as 0-dim float64 tensors, built on their device
    without checking them, so without a host-device sync."""
    fmax = torch.where(fmax <= 0.0, fmax + 0.5 * sr, fmax)
    mel_low, mel_high = (1127.0 * (1.0 + edge / 700.0).log() for edge in (fmin, fmax))
    mel_delta = (mel_high - mel_low) / (n_mels + 1)
    band = torch.arange(n_mels, dtype=torch.float32, device=fmin.device).unsqueeze(1)
    left = mel_low + band * mel_delta
    center = mel_low + (band + 1.0) * mel_delta
    right = mel_low + (band + 2.0) * mel_delta
    bin_freqs = (sr / n_fft) * torch.arange(n_fft // 2, dtype=torch.float32, device=fmin.device)
    bin_mels = (1127.0 * (1.0 + bin_freqs / 700.0).log()).unsqueeze(0)
    up = (bin_mels - left) / (center - left)
    down = (right - bin_mels) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return nn.functional.pad(banks, (0, 1))  # zero weight for the Nyquist bin


def _random_band_mask(spec: torch.Tensor, max_width: int, axis: int) -> torch.Tensor:
    """Boolean mask (broadcastable to spec) of one band per example along `axis` (1 = mel,
    2 = time): width floor(u1 * max_width), start floor(u2 * (size - width_real))."""
    batch, size = spec.shape[0], spec.shape[axis]
    width = torch.rand(batch, 1, device=spec.device) * max_width
    start = (torch.rand(batch, 1, device=spec.device) * (size - width)).floor()
    end = start + width.floor()
    idx = torch.arange(size, device=spec.device).unsqueeze(0)
    mask = (idx >= start) & (idx < end)  # (B, size)
    return mask.unsqueeze(2) if axis == 1 else mask.unsqueeze(1)


class AugmentMelSTFT(nn.Module):
    """Log-mel frontend with train-time fmin/fmax jitter and SpecAugment-style masking.

    Input (B, L) float waveforms at `sr` (L >= 2); output (B, n_mels, 1 + (L - 1) // hopsize).
    Waveforms too short for reflect padding (L <= n_fft // 2 + 1) are zero-extended first.
    """

    def __init__(self, n_mels: int = 128, sr: int = 32000, win_length: int = 800,
                 hopsize: int = 320, n_fft: int = 1024, freqm: int = 48, timem: int = 192,
                 fmin: float = 0.0, fmax: Optional[float] = None, fmin_aug_range: int = 10,
                 fmax_aug_range: int = 2000) -> None:
        super().__init__()
        if fmin_aug_range < 1 or fmax_aug_range < 1:
            raise ValueError("fmin_aug_range and fmax_aug_range must be at least 1 (1 = no jitter)")
        if win_length > n_fft:
            raise ValueError(f"win_length ({win_length}) must not exceed n_fft ({n_fft})")
        if hopsize < 1:
            raise ValueError(f"hopsize must be positive, got {hopsize}")
        self.n_mels, self.sr, self.win_length, self.hopsize, self.n_fft = n_mels, sr, win_length, hopsize, n_fft
        self.freqm, self.timem = freqm, timem
        self.fmin = fmin
        self.fmax = sr // 2 - fmax_aug_range // 2 if fmax is None else fmax
        self.fmin_aug_range, self.fmax_aug_range = fmin_aug_range, fmax_aug_range
        self.register_buffer("window", torch.hann_window(win_length, periodic=False), persistent=False)
        self.register_buffer("preemphasis_coefficient", torch.tensor([[[-0.97, 1.0]]]), persistent=False)
        # the most extreme jittered edges are valid (training does not check them per call)
        high = self.fmax + fmax_aug_range // 2
        _check_band_edges(n_mels, n_fft, sr, self.fmin + fmin_aug_range - 1, high - fmax_aug_range + 1)
        _check_band_edges(n_mels, n_fft, sr, self.fmin, high)
        # eval-mode filterbank, built once; training builds one per call with jittered edges
        self.register_buffer("mel_basis", kaldi_mel_banks(n_mels, n_fft, sr, self.fmin, self.fmax),
                             persistent=False)

    def eval_settings(self) -> dict[str, Any]:
        """Every argument that changes the eval-mode output (fmax resolved): equal settings, equal
        spectrograms. The fast and ONNX twins are built from it; caches key on it."""
        return {key: getattr(self, key) for key in EVAL_SETTINGS}

    def settings(self) -> dict[str, Any]:
        """All constructor arguments (fmax resolved): `AugmentMelSTFT(**f.settings())` is f again."""
        return {**self.eval_settings(), "freqm": self.freqm, "timem": self.timem,
                "fmin_aug_range": self.fmin_aug_range, "fmax_aug_range": self.fmax_aug_range}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.settings().items())

    def num_frames(self, num_samples: int) -> int:
        """Number of spectrogram frames produced for a waveform of `num_samples` samples."""
        return 1 + (num_samples - 1) // self.hopsize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"expected waveforms shaped (batch, samples), got {tuple(x.shape)}")
        if x.shape[-1] < 2:
            raise ValueError("waveform must have at least 2 samples")
        x = x.float()
        x = nn.functional.conv1d(x.unsqueeze(1), self.preemphasis_coefficient).squeeze(1)
        length = x.shape[-1]
        if length <= self.n_fft // 2:  # too short to reflect-pad: zero-extend, keep the frames it has
            x = nn.functional.pad(x, (0, self.n_fft // 2 + 1 - length))
        spec = torch.stft(x, self.n_fft, hop_length=self.hopsize, win_length=self.win_length,
                          window=self.window, center=True, pad_mode="reflect", normalized=False,
                          onesided=True, return_complex=True)[..., :1 + length // self.hopsize]
        power = torch.view_as_real(spec).pow(2).sum(-1)  # (B, n_fft // 2 + 1, T)

        if self.training:  # edges drawn on the device: no host-device sync
            jitter = torch.randint(self.fmin_aug_range, (), device=power.device)
            fmin = self.fmin + jitter.double()
            jitter = torch.randint(self.fmax_aug_range, (), device=power.device)
            fmax = self.fmax + self.fmax_aug_range // 2 - jitter.double()
            mel_basis = mel_banks(self.n_mels, self.n_fft, self.sr, fmin, fmax)
        else:
            mel_basis = self.mel_basis
        with torch.autocast(device_type=power.device.type, enabled=False):
            melspec = torch.matmul(mel_basis, power)
        melspec = log_compress(melspec)

        if self.training:
            if self.freqm > 0:
                melspec = melspec.masked_fill(_random_band_mask(melspec, self.freqm, axis=1), 0.0)
            if self.timem > 0:
                melspec = melspec.masked_fill(_random_band_mask(melspec, self.timem, axis=2), 0.0)
        return normalize(melspec)
