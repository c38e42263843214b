"""Windows of a stream of audio, tagged as soon as they are complete: `WindowEngine`.

Windows of `window` samples start every `hop` samples (hop > window leaves gaps). At the end of
the stream the last window is zero-padded; a stream shorter than one window is one window of its
own length (padding would dilute its tags with silence). Two modes:
- "exact": every window through the whole network on its own (today's windowed inference);
- "shared": the network runs once over the stream (`helpers.inference.shared_pass`, for models
  whose family supports it: `Family.shared_pass`) and each window is the head applied to the
  average of the last feature map's frames that lie in it.
Memory is bounded: the engine holds at most one window (exact) or one chunk with its margins
(shared) of audio, and the frames the next windows still need.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from helpers.inference.shared_pass import MovingFrames, SharedPass, unsupported_reason
from helpers.inference.tagging import LoadedModel


MODES = ("exact", "shared")
# new audio one shared pass covers (on top of its margins); larger is faster, later and bigger
SHARED_CHUNK_SECONDS = 120.0
# the moving window of a frame probability (--frame_window): measured in docs/long-recordings.md
FRAME_WINDOW_SECONDS = 3.0
HEAD_BATCH = 512  # shared windows through the head at once (the head alone is cheap)


def frame_count(window_seconds: float, frame_seconds: float) -> int:
    """The odd number of frames closest to `window_seconds` (at least one)."""
    return max(1, 2 * round((window_seconds / frame_seconds - 1) / 2) + 1)


def num_windows(num_samples: int, window: int, hop: int) -> int:
    """Windows needed for `num_samples` samples: one for a stream up to a window long; then every
    full window, and a zero-padded one if samples after the last full window are not in a gap."""
    if num_samples <= 0:
        return 0
    if num_samples <= window:
        return 1
    full = (num_samples - window) // hop + 1
    return full + int((full - 1) * hop + window < num_samples and full * hop < num_samples)


def shared_support(tagger: LoadedModel) -> Optional[str]:
    """Why `tagger` cannot share windows (None if it can)."""
    if tagger.model_takes_waveforms:
        return "an exported (ONNX) model runs exact windows"
    return unsupported_reason(tagger.model)


class SampleBuffer:
    """The samples of a stream still needed: appended at the end, forgotten at the front, each
    sample copied O(1) times on average (a stream of many small blocks is not re-copied whole at
    every block)."""

    def __init__(self) -> None:
        self._data = np.zeros(0, np.float32)
        self._begin = self._end = 0
        self.start = 0  # stream index of held[0]

    @property
    def held(self) -> np.ndarray:
        """The held samples (a view: valid until the next append or drop)."""
        return self._data[self._begin:self._end]

    def append(self, samples: np.ndarray) -> None:
        if self._end + len(samples) > len(self._data):  # move to the front, and grow if still short
            held = self._end - self._begin
            data = self._data if held + len(samples) <= len(self._data) // 2 else \
                np.empty(2 * (held + len(samples)), np.float32)
            data[:held] = self._data[self._begin:self._end]
            self._data, self._begin, self._end = data, 0, held
        self._data[self._end:self._end + len(samples)] = samples
        self._end += len(samples)

    def drop(self, count: int) -> None:
        """Forget the first `count` held samples (fewer if fewer are held; none if count <= 0)."""
        count = min(max(0, count), self._end - self._begin)
        self._begin += count
        self.start += count


class WindowEngine:
    """Tag the windows of a stream fed block by block (`push`, then `finish`).

    mode "exact" returns each window from `push` as soon as its last sample arrives. mode "shared"
    needs look-ahead: a window comes out at the latest once the audio reaches `lookahead` samples
    past its end (the pass's margin plus `chunk` samples of new audio per pass: about 143 s for
    10-s windows with mn04/mn10 at the default chunk); `finish` returns the rest at once. With frames=True the
    shared pass also gives per-frame probabilities (`take_frames`), in either mode: the head on
    the mean embedding of the `frame_window` samples (rounded to an odd count of frames; default
    `FRAME_WINDOW_SECONDS`) centred on each frame.
    """

    def __init__(self, tagger: LoadedModel, window: int, hop: int, mode: str = "exact", batch_size: int = 8,
                 frames: bool = False, frame_window: Optional[int] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if window < 2 or hop < 1 or batch_size < 1:
            raise ValueError(f"need window >= 2, hop >= 1 and batch_size >= 1 samples, got {window}, {hop}, "
                             f"{batch_size}")
        self.tagger, self.window, self.hop, self.mode = tagger, window, hop, mode
        self.batch_size, self.frames = batch_size, frames
        self.num_samples = 0
        self._next = 0  # index of the next window
        self._samples = SampleBuffer()
        self._shared: Optional[SharedPass] = None
        if mode == "shared" or frames:
            self._shared = SharedPass(tagger, context=window)
            self.chunk = math.ceil(SHARED_CHUNK_SECONDS * tagger.sample_rate / self._shared.frame) * self._shared.frame
            self._emb = torch.zeros(0, 0)
            self._emb_start = 0  # frame index of _emb[0]
            self._frames_done = 0  # frames computed (valid) so far
            self._frame_out: list[np.ndarray] = []
            self._frame_out_start = 0
            seconds = FRAME_WINDOW_SECONDS if frame_window is None else frame_window / tagger.sample_rate
            self._smoother = MovingFrames(frame_count(seconds, self._shared.frame / tagger.sample_rate))

    @property
    def lookahead(self) -> int:
        """The most samples of audio past a window's end (mode "shared") or a frame's (frames=True)
        before `push` returns it: the shared pass runs when that much audio is in. 0 for exact
        windows without frames."""
        return 0 if self._shared is None else self._shared.margin + self.chunk

    def push(self, samples: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Feed mono float32 samples; returns the windows completed so far, (index, probabilities)."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.num_samples += len(samples)
        self._samples.append(samples)
        if self._shared is not None:
            frame = self._shared.frame
            while self.num_samples >= self._frames_done * frame + self.lookahead:
                self._compute_frames((self._frames_done * frame + self.chunk) // frame)
        out = self._shared_windows() if self.mode == "shared" else self._exact_windows(final=False)
        self._drop_audio()
        return out

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """End of the stream: the remaining windows (the last zero-padded)."""
        total = num_windows(self.num_samples, self.window, self.hop)
        if self.num_samples <= self.window and self._next == 0 and total:  # one window of its own length
            out = self._exact_windows(final=True, last=1)
            if self._shared is not None:
                self._finish_frames(self.num_samples)
            return out
        end = (total - 1) * self.hop + self.window if total else self.num_samples
        pad = max(0, end - self.num_samples)
        self._samples.append(np.zeros(pad, np.float32))
        if self._shared is not None:
            self._finish_frames(end)
        if self.mode == "exact":
            return self._exact_windows(final=True, last=total)
        return self._shared_windows(last=total)

    def take_frames(self) -> tuple[np.ndarray, np.ndarray]:
        """Frames computed since the last call (frames=True): their centre times in seconds (n,)
        and probabilities (n, classes): the head applied to each frame's embedding alone."""
        if self._shared is None:
            raise ValueError("frames were not asked for (frames=True)")
        probs = np.concatenate(self._frame_out) if self._frame_out else np.zeros((0, len(self.tagger.class_names)),
                                                                                  np.float32)
        times = (self._frame_out_start + np.arange(len(probs))) * self._shared.frame / self.tagger.sample_rate
        self._frame_out, self._frame_out_start = [], self._frame_out_start + len(probs)
        return times, probs

    # exact windows

    def _exact_windows(self, final: bool, last: Optional[int] = None) -> list[tuple[int, np.ndarray]]:
        out: list[tuple[int, np.ndarray]] = []
        batch: list[np.ndarray] = []
        while last is None or self._next + len(batch) < last:
            audio = self._samples.held
            start = (self._next + len(batch)) * self.hop - self._samples.start
            if start + self.window <= len(audio):
                batch.append(audio[start:start + self.window])
            elif final and start < len(audio):  # a stream shorter than a window: its own length
                rest = audio[start:]
                batch.append(np.pad(rest, (0, max(0, 2 - len(rest)))))  # the frontend needs two samples
            else:
                break
            if len(batch) == self.batch_size:
                out += self._tag(batch)
                batch = []
        return out + self._tag(batch) if batch else out

    def _tag(self, batch: list[np.ndarray]) -> list[tuple[int, np.ndarray]]:
        probs = self.tagger.predict(np.stack(batch))
        first, self._next = self._next, self._next + len(batch)
        return [(first + k, row) for k, row in enumerate(probs)]

    def _drop_audio(self) -> None:
        """Forget the audio no future window or shared pass needs."""
        keep = self._next * self.hop
        if self._shared is not None:
            keep = min(keep, self._frames_done * self._shared.frame - self._shared.margin)
        self._samples.drop(keep - self._samples.start)

    # shared pass

    def _compute_frames(self, stop: int, end: Optional[int] = None) -> None:
        """Frames up to `stop` (exclusive) from a pass over the audio around them (up to `end`)."""
        frame, margin = self._shared.frame, self._shared.margin
        first = max(0, self._frames_done * frame - margin)
        last = end if end is not None else stop * frame + margin
        audio = self._samples.held[first - self._samples.start:last - self._samples.start]
        emb = self._shared.embeddings(audio if len(audio) >= 2 else np.pad(audio, (0, 2 - len(audio))))
        new = emb[self._frames_done - first // frame:stop - first // frame]
        self._emb = new if self._emb.numel() == 0 else torch.cat([self._emb, new])
        self._frames_done += len(new)
        if self.frames:
            self._add_frames(self._smoother.push(new))

    def _add_frames(self, embeddings: torch.Tensor) -> None:
        if len(embeddings):
            self._frame_out.append(self.tagger.probabilities(self._shared.logits(embeddings)))

    def _finish_frames(self, end: int) -> None:
        frame = self._shared.frame
        while self._frames_done < math.ceil(end / frame):
            stop = min(math.ceil(end / frame), self._frames_done + self.chunk // frame)
            self._compute_frames(stop, end=min(end, stop * frame + self._shared.margin))
        if self.frames:
            self._add_frames(self._smoother.push(torch.zeros(0, 0), final=True))

    def _shared_windows(self, last: Optional[int] = None) -> list[tuple[int, np.ndarray]]:
        """The windows whose frames are all computed (and, mid-stream, whose audio is all in): the
        head on the overlap-weighted mean of their frames (frame j covers [j, j + 1) * frame)."""
        frame = self._shared.frame
        bound = (self._frames_done * frame - self.window) // self.hop  # last window with all frames
        if last is None:
            bound = min(bound, (self.num_samples - self.window) // self.hop)
        else:
            bound = min(bound, last - 1)
        count = max(0, bound - self._next + 1)
        if not count:
            return []
        # the mean over [start, end) is the difference of the embedding's running integral
        sums = torch.nn.functional.pad(self._emb.double().cumsum(0), (0, 0, 1, 0))
        rows = torch.nn.functional.pad(self._emb.double(), (0, 0, 0, 1))

        def integral(at: torch.Tensor) -> torch.Tensor:
            j = torch.div(at, frame, rounding_mode="floor")
            return sums[j - self._emb_start] * frame + rows[j - self._emb_start] * (at - j * frame)[:, None]

        starts = (self._next + torch.arange(count, dtype=torch.int64)) * self.hop
        pooled = ((integral(starts + self.window) - integral(starts)) / self.window).float()
        probs = np.concatenate([self.tagger.probabilities(self._shared.logits(pooled[k:k + HEAD_BATCH]))
                                for k in range(0, count, HEAD_BATCH)])
        out = [(self._next + k, row) for k, row in enumerate(probs)]
        self._next += count
        first_needed = (self._next * self.hop) // frame
        if first_needed > self._emb_start:
            self._emb = self._emb[first_needed - self._emb_start:]
            self._emb_start = first_needed
        return out
