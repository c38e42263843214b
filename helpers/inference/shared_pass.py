"""One pass of a model over a long stretch of audio, shared by every window that overlaps it.

A window's exact output needs the network run over that window alone, because a channel gate
(MN's squeeze-excitation, SE) scales its channels by a context pooled over all the frames it sees.
A family says which of its stages have such a gate and how to run them (`Family.shared_pass`). Run
once over a long input, a plain SE would pool over the whole input instead. Here each SE frame
gets the context of a moving window of the analysis window's length, centred on that frame, at
that layer's own time resolution (what an exact window around that frame would pool), so the
last feature map can be computed once and cut into windows (`window_logits`). Measured against
exact windows in docs/long-recordings.md.

Everything before the head is local, so a stretch computed with `margin` samples of audio on
each side that are thrown away gives the same frames as one pass over the whole recording (up
to float rounding). Formally each SE adds half a window to the reach of the layers after it (45 s
for 10-s windows with mn04's 8 SE blocks), but a sample's weight in a moving mean is one frame in
a window's worth, and it shrinks again at every later SE: measured on real recordings, a margin of
the convolutions' reach plus two windows (23 s for 10-s windows) already gives the one-pass result
to float rounding (largest probability difference 3e-6; 15 s: 1e-4). `margin` is the smaller of
the two.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from models.factory import FAMILIES
from models.family import SharedStage
from models.fast import ConvActivation, FoldedStage, PointwiseConv
from models.layers import ConvNormActivation

# stage type -> how the shared pass runs it, of every family (Family.shared_pass)
SHARED_STAGES = {stage: shared for family in FAMILIES.values() for stage, shared in family.shared_pass.items()}
# stages of convolutions and pointwise activations only: local in time
LOCAL_STAGES = (ConvNormActivation, PointwiseConv, ConvActivation)
Gate = Callable[[torch.Tensor], torch.Tensor]


def _local(stage: nn.Module) -> bool:
    return isinstance(stage, LOCAL_STAGES) or isinstance(stage, FoldedStage) and _local(stage.stage)


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why `model` cannot run the shared pass (None if it can): every stage must be local in time
    or of a type its family runs in the shared pass (`Family.shared_pass`, e.g. an MN block whose
    SE is channel-only, as in every released MN), and the head must pool the last feature map."""
    if getattr(model, "head_type", None) not in ("mlp", "fully_convolutional") or not hasattr(model, "stages"):
        return "only models with a pooling head (mlp, fully convolutional) share windows"
    for stage in model.stages():
        shared = SHARED_STAGES.get(type(stage))
        if shared is not None and shared.refusal(stage):
            return shared.refusal(stage)
        if shared is None and not _local(stage):
            kind = type(stage.stage if isinstance(stage, FoldedStage) else stage).__name__
            return f"{kind} stages have no shared-pass support in their family; they run exact windows"
    return None


def _gate(stage: nn.Module) -> Optional[Gate]:
    """The stage's channel gate (pooled context -> scale), None for a stage local in time."""
    shared: Optional[SharedStage] = SHARED_STAGES.get(type(stage))
    return None if shared is None else shared.gate(stage)


def _moving_scale(gate: Gate, x: torch.Tensor, half: float) -> torch.Tensor:
    """The gate's scale (B, C, 1, T) of x (B, C, F, T) with each frame's context the mean over
    frames within `half` frames of it (clipped at the ends of x); `half` inf pools over everything."""
    means = _frequency_mean(x).transpose(1, 2)  # (B, C, T)
    t = means.shape[-1]
    sums = nn.functional.pad(means.cumsum(-1), (1, 0))
    centre = torch.arange(t, device=x.device)
    lo = (centre - math.floor(half) if math.isfinite(half) else centre * 0).clamp(0, t)
    hi = (centre + math.ceil(half) if math.isfinite(half) else centre * 0 + t).clamp(0, t)
    context = (sums[..., hi] - sums[..., lo]) / (hi - lo).clamp(min=1)
    scale = gate(context.transpose(1, 2))  # (B, T, C)
    return scale.transpose(1, 2).unsqueeze(2).to(x.dtype)


def _frequency_mean(x: torch.Tensor) -> torch.Tensor:
    """x (B, C, F, T) averaged over frequency, as (B, T, C) float32: reduced along the innermost
    dimension of a channels-last tensor (x.mean(2) strides across memory: ~25x slower)."""
    return x.permute(0, 3, 1, 2).float().mean(3)


def _in_pieces(compute: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, total: int, step: int,
               piece: int, reach: int) -> torch.Tensor:
    """`compute` over the last dimension of x, `piece` outputs at a time: output j is centred at
    input j * step and reads inputs within `reach` of it, so each piece gets that much more input
    on both sides (rounded up to a step, keeping outputs aligned) and the joined pieces equal one
    call on all of x (up to float rounding) while holding only a piece's intermediate tensors."""
    pad = -(-reach // step) * step
    pieces = []
    for first in range(0, total, piece):
        last = min(total, first + piece)
        start = max(0, first * step - pad)
        out = compute(x[..., start:x.shape[-1] if last == total else last * step + pad])
        skip = first - start // step
        pieces.append(out[..., skip:] if last == total else out[..., skip:skip + last - first])
    return torch.cat(pieces, -1) if len(pieces) > 1 else pieces[0]


class SharedPass:
    """The last feature map of a model over stretches of audio, pooled over frequency: one
    embedding per frame of `frame` samples, frame j centred at sample j * frame of the stretch's
    start (stretches start at multiples of `frame`). The model's stages run as their families'
    `Family.shared_pass` says. `context` is the SE's moving window in samples (the analysis
    window); None pools each SE over the whole stretch (for comparison)."""

    SPECTROGRAM_PIECE = 2000  # frames (20 s at the released 10-ms hop)
    LOCAL_PIECE = 2048  # spectrogram frames; a multiple of every time stride

    def __init__(self, tagger, context: Optional[int]) -> None:
        reason = unsupported_reason(tagger.model)
        if reason or tagger.model_takes_waveforms:
            raise ValueError(reason or "an exported (ONNX) model runs exact windows")
        self.tagger, self.model, self.context = tagger, tagger.model, context
        self.stages = list(self.model.stages())
        self.strides = self._stage_strides()  # time stride of each stage's input, in spectrogram frames
        self.hop = tagger.frontend.hopsize
        self.gates = [_gate(stage) for stage in self.stages]
        self.local = next((i for i, gate in enumerate(self.gates) if gate is not None), len(self.stages))
        self.frame = self.hop * self.strides[-1]
        reach = tagger.frontend.n_fft // 2 + 1 + self._conv_reach() * self.hop
        if context is not None:
            formal = sum(context // 2 + self.hop * s for s, gate in zip(self.strides, self.gates) if gate is not None)
            reach += min(formal, 2 * context)
        self.margin = math.ceil(reach / self.frame) * self.frame

    def _stage_strides(self) -> list[int]:
        """Time stride at each stage's input and, last, at the output (probed on a short input)."""
        x = torch.zeros(1, 1, self.tagger.frontend.n_mels, 256, device=self.tagger.device)
        strides = []
        with torch.no_grad():
            for stage in self.stages:
                strides.append(256 // x.shape[-1])
                x = stage(x)
        return strides + [256 // x.shape[-1]]

    def _conv_reach(self, stages: Optional[int] = None) -> int:
        """Frames of spectrogram on each side that the convolutions alone look at (of the first
        `stages` stages; all by default)."""
        reach = 0
        for stride, stage in zip(self.strides, self.stages[:stages]):
            for m in stage.modules():
                weight = getattr(m, "weight", None)
                if isinstance(weight, torch.Tensor) and weight.dim() == 4 and weight.shape[-1] > 1:
                    dilation = getattr(m, "dilation", (1, 1))
                    reach += (weight.shape[-1] - 1) // 2 * dilation[-1] * stride
        return reach + self.strides[-1 if stages is None else stages]

    def _half(self, x: torch.Tensor, out: torch.Tensor, stride: int) -> float:
        """Half the SE's moving window in frames of `out` (a block's input x at time `stride`)."""
        if self.context is None:
            return math.inf
        return self.context / 2 / (self.hop * stride * round(x.shape[-1] / out.shape[-1]))

    def _block(self, index: int, x: torch.Tensor, stride: int) -> torch.Tensor:
        """Stage `index`, which has a moving-window gate, on its input x at time `stride`, run as
        its family's `SharedStage` says."""
        stage, gate = self.stages[index], self.gates[index]
        scale = lambda out: _moving_scale(gate, out, self._half(x, out, stride))  # noqa: E731
        return SHARED_STAGES[type(stage)].run(stage, x, scale)

    @torch.no_grad()
    def embeddings(self, audio: np.ndarray) -> torch.Tensor:
        """Per-frame embeddings (T', C) float32 of a stretch of audio (its first frame centred at
        its first sample)."""
        x = self._local_stages(self._spectrogram(audio))
        for i in range(self.local, len(self.stages)):
            x = self.stages[i](x) if self.gates[i] is None else self._block(i, x, self.strides[i])
        return _frequency_mean(x)[0].contiguous()

    def _local_stages(self, x: torch.Tensor) -> torch.Tensor:
        """The stages before the first SE (convolutions only: local in time) over a spectrogram
        (1, 1, n_mels, T), in pieces (`_in_pieces`): they run at the highest resolution, where a
        whole stretch held ~250 MB for mn10."""
        if hasattr(self.model, "dtype"):  # the fast copy's compute precision and layout
            x = x.to(self.model.dtype, memory_format=torch.channels_last)

        def stages(y: torch.Tensor) -> torch.Tensor:
            for stage in self.stages[:self.local]:
                y = stage(y)
            return y

        stride = self.strides[self.local]  # 'same'-padded convolutions: ceil(T / stride) outputs
        return _in_pieces(stages, x, -(-x.shape[-1] // stride), stride, self.LOCAL_PIECE // stride,
                          self._conv_reach(self.local))

    def _spectrogram(self, audio: np.ndarray) -> torch.Tensor:
        """The model's input (1, 1, n_mels, T) for a stretch, computed in pieces (`_in_pieces`):
        every frame is local (pre-emphasis, one windowed FFT, mel, log), and the FFT's buffers for
        a whole stretch (~1.3 MB per second of audio) would be the pass's largest."""
        waveform = torch.from_numpy(audio)[None].to(self.tagger.device)
        total = 1 + (len(audio) - 1) // self.hop  # frames (after pre-emphasis, which drops a sample)
        return _in_pieces(self.tagger.spectrograms, waveform, total, self.hop, self.SPECTROGRAM_PIECE,
                          self.tagger.frontend.n_fft // 2 + 2)

    @torch.no_grad()
    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head on pooled embeddings (N, C): logits (N, classes)."""
        features = pooled.to(self.tagger.device)[:, :, None, None]
        if hasattr(self.model, "dtype"):
            features = features.to(self.model.dtype, memory_format=torch.channels_last)
        return self.model.forward_head(features).float()



class MovingFrames:
    """Centred moving means of `count` (odd) consecutive frame embeddings, fed in order in any
    pieces: a frame comes out once the `count // 2` frames after it are in (or at the end, where
    the window is clipped, as at the start). Holds at most `count` + one piece of frames.

    The released models' head was trained on the mean of ~31 frames (10 s); one frame alone is
    a poor input for it: on the real sequence of docs/long-recordings.md, frame-level average
    precision of the clips' classes is 0.26 for single frames, 0.58 for 9 frames (~3 s), 0.62 for
    15 and 0.37 for 31 (as 10-s windows)."""

    def __init__(self, count: int) -> None:
        if count < 1 or count % 2 == 0:
            raise ValueError(f"the moving window needs an odd number of frames, got {count}")
        self.half = count // 2
        self._held = torch.zeros(0, 0)
        self._first = 0  # frame index of _held[0]
        self._next = 0  # next frame to give out

    def push(self, frames: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Add frames (n, C); returns the smoothed frames now complete (all of them if `final`)."""
        held = self._held if len(frames) == 0 else frames if len(self._held) == 0 else torch.cat([self._held, frames])
        known = self._first + len(held)
        stop = known if final else max(self._next, known - self.half)
        centre = torch.arange(self._next, stop)
        lo = (centre - self.half).clamp(min=self._first) - self._first
        hi = (centre + self.half + 1).clamp(max=known) - self._first
        sums = torch.nn.functional.pad(held.double().cumsum(0), (0, 0, 1, 0))
        out = ((sums[hi] - sums[lo]) / (hi - lo)[:, None]).to(held.dtype)
        keep = max(0, stop - self.half - self._first)  # frames still inside a coming window
        self._held, self._first, self._next = held[keep:], self._first + keep, stop
        return out
