"""Live audio from a pipe: standard input read as it arrives, never held whole.

Three kinds of stream: a WAV stream whose header may give no length (`arecord -t wav`, `ffmpeg -f wav -`
write data size 0 or 0xFFFFFFFF), headerless PCM (`--raw s16le|s32le|f32le` with a rate and a
channel count), and any container FFmpeg decodes from a pipe (mp3, ogg/opus, flac), through PyAV.
`open_stream` returns a `Stream` whose `blocks(rate)` are mono float32 at the model's rate: channels
averaged and resampled with soxr's streaming resampler block by block, as the file loader does, so
a stream and the same audio as a file give the same samples.
"""
from __future__ import annotations

import logging
import os
import select
import struct
from typing import Iterator, Optional

import av
import numpy as np

from common.errors import AudioLoadError
from datasets.audio import Resampler

logger = logging.getLogger(__name__)

READ_BYTES = 1 << 16  # at most this much per read: a read returns what has arrived, never waits to fill it
# PCM sample formats: NumPy dtype and the scale to [-1, 1) libsndfile uses for integers
RAW_FORMATS = {"s16le": ("<i2", 1 << 15), "s32le": ("<i4", 1 << 31), "f32le": ("<f4", 1)}
_WAV_FORMATS = {(1, 8): ("u1", 1 << 7), (1, 16): ("<i2", 1 << 15), (1, 24): ("s24", 1 << 23),
                (1, 32): ("<i4", 1 << 31), (3, 32): ("<f4", 1), (3, 64): ("<f8", 1)}
_UNKNOWN_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)  # data sizes that streaming writers put in the header


class StreamStalled(AudioLoadError):
    """No data arrived for the stall timeout; the message says so."""


class PipeReader:
    """Reads a file descriptor as data arrives: a read returns what is there (up to `n` bytes), b""
    at the end. With `stall_timeout`, waiting longer than that raises StreamStalled."""

    def __init__(self, fd: int, name: str, stall_timeout: Optional[float] = None) -> None:
        self.fd, self.name, self.stall_timeout = fd, name, stall_timeout
        self._pending = b""

    def read(self, n: int = READ_BYTES) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:n], self._pending[n:]
            return data
        if self.stall_timeout is not None and not select.select([self.fd], [], [], self.stall_timeout)[0]:
            raise StreamStalled(f"{self.name}: no data for {self.stall_timeout:g} s (--stall_timeout)")
        return os.read(self.fd, n)

    def read_exactly(self, n: int) -> bytes:
        """`n` bytes, fewer only at the end of the stream."""
        parts, size = [], 0
        while size < n:
            part = self.read(n - size)
            if not part:
                break
            parts.append(part)
            size += len(part)
        return b"".join(parts)

    def unread(self, data: bytes) -> None:
        """Put `data` back in front of what is still to be read."""
        self._pending = data + self._pending


def pcm_to_float(data: bytes, dtype: str, scale: int, channels: int) -> np.ndarray:
    """(channels, frames) float32 from interleaved PCM bytes (whole frames), scaled as libsndfile does."""
    if dtype == "s24":  # 3-byte little-endian integers, widened to int32 in the top bytes
        raw = np.frombuffer(data, np.uint8).reshape(-1, 3)
        wide = np.zeros((len(raw), 4), np.uint8)
        wide[:, 1:] = raw
        samples = wide.view("<i4")[:, 0].astype(np.float32) / np.float32(1 << 31)
    elif dtype == "u1":
        samples = (np.frombuffer(data, np.uint8).astype(np.float32) - 128) / np.float32(scale)
    else:
        samples = np.frombuffer(data, dtype).astype(np.float32)
        if scale != 1:
            samples /= np.float32(scale)
    return samples.reshape(-1, channels).T


def _pcm_blocks(reader: PipeReader, dtype: str, scale: int, channels: int,
                limit: Optional[int] = None) -> Iterator[np.ndarray]:
    """(channels, n) float32 blocks of interleaved PCM as it arrives (up to `limit` bytes); bytes
    that make no whole frame at the end are reported and left out."""
    frame = (3 if dtype == "s24" else np.dtype(dtype).itemsize) * channels
    left, remaining = b"", limit
    while remaining is None or remaining > 0:
        data = reader.read(READ_BYTES if remaining is None else min(READ_BYTES, remaining))
        if not data:
            break
        if remaining is not None:
            remaining -= len(data)
        data = left + data
        whole = len(data) - len(data) % frame
        left = data[whole:]
        if whole:
            yield pcm_to_float(data[:whole], dtype, scale, channels)
    if left:
        logger.warning("%s: the stream ends with %d byte(s) that make no whole sample frame (%d bytes); "
                       "left out", reader.name, len(left), frame)


def _wav_header(reader: PipeReader) -> tuple[tuple[str, int], int, int, Optional[int]]:
    """Sample format, rate, channels and data size (None: unknown, read to the end) of a WAV
    stream, read up to the start of its data."""
    head = reader.read_exactly(12)
    fmt = None
    while True:
        chunk = reader.read_exactly(8)
        if len(chunk) < 8:
            raise AudioLoadError(f"{reader.name}: WAV stream ends before its audio data")
        name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if name == b"data":
            break
        if name == b"fmt ":
            body = reader.read_exactly(size + size % 2)
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the GUID
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, bits, channels, rate)
        else:  # LIST, fact, ds64 ...: not needed
            reader.read_exactly(size + size % 2)
    if fmt is None:
        raise AudioLoadError(f"{reader.name}: WAV stream has no format chunk before its data")
    tag, bits, channels, rate = fmt
    if (tag, bits) not in _WAV_FORMATS or channels < 1 or rate < 1:
        raise AudioLoadError(f"{reader.name}: unsupported WAV stream (format {tag}, {bits} bits, "
                             f"{channels} channel(s), {rate} Hz)")
    known = head[:4] == b"RIFF" and size not in _UNKNOWN_SIZES
    return _WAV_FORMATS[(tag, bits)], rate, channels, size if known else None


def _pyav_blocks(reader: PipeReader) -> tuple[int, int, Iterator[np.ndarray]]:
    """Rate, channels and (channels, n) float32 blocks of a container FFmpeg reads from the pipe."""
    try:
        container = av.open(reader, mode="r")
    except av.FFmpegError as e:
        raise AudioLoadError(f"{reader.name}: not a readable audio stream ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unknown error'})") from None
    streams = [s for s in container.streams if s.type == "audio"]
    if not streams or not (streams[0].rate or streams[0].codec_context.sample_rate):
        container.close()
        raise AudioLoadError(f"{reader.name}: no audio in the stream")
    stream = streams[0]

    def blocks() -> Iterator[np.ndarray]:
        with container:
            resampler = av.AudioResampler(format="fltp")  # planar float; rate and layout kept
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    yield out.to_ndarray()
            for out in resampler.resample(None):
                yield out.to_ndarray()

    return stream.rate or stream.codec_context.sample_rate, stream.codec_context.channels, blocks()


class Stream:
    """Mono float32 blocks at `sample_rate` (`blocks(sample_rate)`) of a stream of (channels, n)
    blocks at `rate`. NaN or infinite samples become zeros; the ranges they touch (in samples at
    `sample_rate`, with the resampler's reach) are appended to `bad` for the caller to skip."""

    def __init__(self, name: str, rate: int, channels: int, native: Iterator[np.ndarray]) -> None:
        self.name, self.rate, self.channels, self.sample_rate = name, rate, channels, rate
        self.bad: list[tuple[int, int]] = []
        self._native = native

    def _mark_bad(self, mono: np.ndarray, start: int) -> np.ndarray:
        bad = ~np.isfinite(mono)
        if not bad.any():
            return mono
        where = np.flatnonzero(bad)
        reach = self.sample_rate // 100  # 10 ms: more than the HQ resampler's filter reaches
        ratio = self.sample_rate / self.rate
        self.bad.append((max(0, int((start + where[0]) * ratio) - reach), int((start + where[-1] + 1) * ratio) + reach))
        return np.where(bad, np.float32(0), mono)

    def blocks(self, sample_rate: int) -> Iterator[np.ndarray]:
        self.sample_rate = sample_rate
        resampler = Resampler(self.rate, self.sample_rate)
        seen, ended = 0, None
        try:
            for block in self._native:
                mono = np.ascontiguousarray(block.mean(axis=0) if block.shape[0] > 1 else block[0])
                mono = self._mark_bad(mono, seen)
                seen += len(mono)
                mono = resampler(mono)
                if len(mono):
                    yield np.ascontiguousarray(mono, dtype=np.float32)
        except Exception as e:  # a stall or a signal: what was received still ends the stream
            ended = e
        if seen == 0 and ended is None:
            raise AudioLoadError(f"{self.name}: the stream holds no audio samples")
        if seen:
            tail = resampler(np.zeros(0, dtype=np.float32), last=True)
            if len(tail):
                yield np.ascontiguousarray(tail, dtype=np.float32)
        if ended is not None:
            raise ended


def _check_given(name: str, option: str, header: int, given: Optional[int]) -> None:
    if given is not None and given != header:
        raise AudioLoadError(f"{name}: the stream's header says {option.lstrip('-')} {header}, {option} says {given}")


def open_stream(fd: int, name: str, raw: Optional[str] = None, rate: Optional[int] = None,
                channels: Optional[int] = None, stall_timeout: Optional[float] = None) -> Stream:
    """The audio arriving on `fd` (named `name` in messages) as a Stream: headerless
    PCM in `raw` format at `rate` with `channels`, else a WAV stream or any container FFmpeg reads,
    whose header must agree with `rate` and `channels` where they are given. AudioLoadError for a
    stream that is not audio; StreamStalled when nothing arrives for `stall_timeout` seconds."""
    reader = PipeReader(fd, name, stall_timeout)
    if raw is not None:
        if raw not in RAW_FORMATS or not rate or rate < 1 or (channels or 1) < 1:
            raise AudioLoadError(f"{name}: raw PCM needs a format ({', '.join(RAW_FORMATS)}), a sample rate "
                                 "and at least one channel")
        return Stream(name, rate, channels or 1, _pcm_blocks(reader, *RAW_FORMATS[raw], channels or 1))
    head = reader.read_exactly(12)
    if not head:
        raise AudioLoadError(f"{name}: the stream is empty (no header, no audio)")
    reader.unread(head)
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        (dtype, scale), header_rate, header_channels, size = _wav_header(reader)
        native = _pcm_blocks(reader, dtype, scale, header_channels, size)
    else:
        header_rate, header_channels, native = _pyav_blocks(reader)
    _check_given(name, "--input_rate", header_rate, rate)
    _check_given(name, "--channels", header_channels, channels)
    return Stream(name, header_rate, header_channels, native)
