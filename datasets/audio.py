"""The project's one audio loader: any common audio file -> mono float32 at a target rate.

soundfile reads wav/flac/ogg (and the other libsndfile formats); PyAV (FFmpeg) reads mp3, m4a and
everything else. Channels are averaged, and a different rate is converted with soxr at quality
"HQ" (librosa's default resampler), which reproduces the waveforms the released models were
evaluated on. `load_audio` returns a whole file; `stream_audio` yields it block by block (decoded
and resampled incrementally, the same samples) for recordings too long to hold in memory.
"""
from __future__ import annotations

import io
import itertools
import logging
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Iterator, Optional

import av
import numpy as np
import soundfile as sf

import soxr

from common.errors import AudioLoadError  # noqa: F401  (re-exported: datasets.audio.AudioLoadError)

logger = logging.getLogger(__name__)

# A pipe or device can be read only once, so it is read whole into memory (up to this size) and
# both decoders are given that copy: opening it a second time would block forever.
MAX_PIPE_BYTES = 2 << 30
# float audio whose peak exceeds this is not in the [-1, 1] the models were trained on (int16 values
# stored unscaled in a float file, say): warned about, as the tags it gets are meaningless
PEAK_WARNING = 4.0
APPLEDOUBLE_PREFIX = "._"  # macOS resource-fork companions: named like audio, hold no audio

SOUNDFILE_EXTENSIONS = {".wav", ".wave", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".aifc", ".au",
                        ".snd", ".caf", ".w64", ".rf64"}
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | {".mp3", ".m4a", ".mp4", ".aac", ".opus", ".wma", ".webm",
                                           ".mka", ".mkv", ".ac3", ".amr", ".3gp"}


class Resampler:
    """The project's one resampler: mono float32 from `rate_in` to `rate_out` Hz, block by block
    (soxr's streaming resampler at quality "HQ", librosa's default). Blocks of any sizes give
    exactly the samples of the whole signal resampled at once; the last block is passed with
    last=True so the filter's tail comes out. Equal rates pass the samples through."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        self.rate_in, self.rate_out = int(rate_in), int(rate_out)
        self._soxr = soxr.ResampleStream(self.rate_in, self.rate_out, 1, dtype="float32", quality="HQ") \
            if self.rate_in != self.rate_out else None

    def __call__(self, mono: np.ndarray, last: bool = False) -> np.ndarray:
        mono = np.ascontiguousarray(mono, dtype=np.float32)
        return mono if self._soxr is None else self._soxr.resample_chunk(mono, last=last)


def resample(mono: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """A whole mono signal from `rate_in` to `rate_out` Hz (`Resampler`, in one block)."""
    return Resampler(rate_in, rate_out)(mono, last=True)


def _checked_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        info = path.stat()  # once: a file read from a network share costs a round trip per call
    except (FileNotFoundError, NotADirectoryError):
        raise AudioLoadError(f"{path}: no such file") from None
    if stat.S_ISDIR(info.st_mode):
        raise AudioLoadError(f"{path}: is a folder, not an audio file")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise AudioLoadError(f"{path}: file is empty")
    return path


def _is_regular(path: Path) -> bool:
    """False for pipes and devices (/dev/stdin, a FIFO): their size says nothing, and they can be
    read only once, from the start."""
    return stat.S_ISREG(path.stat().st_mode)


def _unreadable(path: Path, e: Exception) -> AudioLoadError:
    first_line = str(e).splitlines()[0] if str(e) else "unknown error"
    return AudioLoadError(f"{path}: not a readable audio file ({type(e).__name__}: {first_line})")


_DECODE_ERRORS = (sf.LibsndfileError, av.FFmpegError, OSError, RuntimeError, ValueError)


def _soundfile_blocks(f: sf.SoundFile, frames: int) -> Iterator[np.ndarray]:
    with f:
        while True:
            block = f.read(frames, dtype="float32", always_2d=True)  # (frames, channels)
            if not len(block):
                return
            yield block.T


def _pyav_blocks(container: av.container.InputContainer, stream: av.AudioStream) -> Iterator[np.ndarray]:
    with container:
        # planar float keeps channels apart; rate and layout are left as they are
        resampler = av.AudioResampler(format="fltp")
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                yield out.to_ndarray()
        for out in resampler.resample(None):
            yield out.to_ndarray()


def _read_pipe(path: Path) -> io.BytesIO:
    """The whole content of a pipe or device (read once, at most MAX_PIPE_BYTES)."""
    with open(path, "rb") as f:
        data = f.read(MAX_PIPE_BYTES + 1)
    if len(data) > MAX_PIPE_BYTES:
        raise AudioLoadError(f"{path}: a pipe of more than {MAX_PIPE_BYTES >> 20} MiB; save it to a file first")
    return io.BytesIO(data)


def _usable_rate(path: Path, rate: Optional[int]) -> int:
    """`rate` if it is a sample rate; AudioLoadError otherwise (FFmpeg reports 0 Hz for some
    files that hold no audio, e.g. macOS AppleDouble `._*` files)."""
    if not rate or rate <= 0:
        raise AudioLoadError(f"{path}: not a readable audio file (the decoder reports a sample rate of {rate} Hz)")
    return int(rate)


def _truncation_note(path: Path, f: sf.SoundFile) -> None:
    """Log a warning when a WAV header announces more audio than the file holds (libsndfile
    reads what is there and notes `data : <header> (should be <actual>)`)."""
    found = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", f.extra_info, re.MULTILINE)
    if found and int(found.group(1)) > int(found.group(2)) > 0:
        held = f.frames / f.samplerate
        logger.warning("%s: truncated: the header announces %.2f s of audio, the file holds %.2f s "
                       "(the %.2f s present are used)", path, held * int(found.group(1)) / int(found.group(2)),
                       held, held)


def _open_blocks(path: Path, block_seconds: Optional[float]) -> tuple[int, Iterator[np.ndarray]]:
    """Native sample rate and an iterator of (channels, n) float32 blocks of the decoded file:
    soundfile blocks of `block_seconds` (None: the whole file at once), or PyAV's codec frames.
    A pipe is read once into memory and both decoders try that copy."""
    source: str | io.BytesIO = str(path) if _is_regular(path) else _read_pipe(path)
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        try:
            f = sf.SoundFile(source)
        except sf.LibsndfileError:
            pass  # e.g. an mp3 or exotic codec in a .wav container: let FFmpeg try
        else:
            rate = _usable_rate(path, f.samplerate)
            _truncation_note(path, f)
            frames = -1 if block_seconds is None else max(1, round(block_seconds * rate))
            return rate, _soundfile_blocks(f, frames)
        if isinstance(source, io.BytesIO):
            source.seek(0)
    container = av.open(source)
    streams = [s for s in container.streams if s.type == "audio"]
    if not streams:
        container.close()
        raise AudioLoadError(f"{path}: no audio stream in file")
    stream = streams[0]
    try:
        rate = _usable_rate(path, stream.rate or stream.codec_context.sample_rate)
    except AudioLoadError:
        container.close()
        raise
    return rate, _pyav_blocks(container, stream)


def _decoded(path: Path, sample_rate: int, block_seconds: Optional[float]) -> Iterator[np.ndarray]:
    """Mono float32 blocks at `sample_rate` (see stream_audio); path problems raise at once."""
    try:
        rate, blocks = _open_blocks(path, block_seconds)
    except AudioLoadError:
        raise
    except _DECODE_ERRORS as e:
        raise _unreadable(path, e) from None
    min_frames = 1 << 62 if block_seconds is None else max(1, round(block_seconds * rate))
    return _mono_resampled(path, rate, blocks, sample_rate, min_frames)


def _mono_resampled(path: Path, rate: int, blocks: Iterator[np.ndarray], sample_rate: int,
                    min_frames: int) -> Iterator[np.ndarray]:
    """Average channels and convert to `sample_rate` block by block. soxr's streaming resampler
    gives exactly the samples its one-shot resampler gives for the whole signal, whatever the
    block sizes. Small decoder frames are gathered into blocks of at least `min_frames`."""
    total, peak = 0, 0.0
    pending: list[np.ndarray] = []
    pending_frames = 0
    try:
        resampler = Resampler(rate, sample_rate)
        for block in itertools.chain(blocks, [None]):
            last = block is None
            if not last:
                pending.append(block)
                pending_frames += block.shape[1]
                if pending_frames < min_frames:
                    continue
            if pending:
                data = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
                mono = np.ascontiguousarray(data.mean(axis=0) if data.shape[0] > 1 else data[0])
                pending, pending_frames = [], 0
            else:
                mono = np.zeros(0, dtype=np.float32)
            check_finite(path, mono, rate, total)
            peak = max(peak, float(np.abs(mono).max())) if len(mono) else peak
            total += len(mono)
            mono = resampler(mono, last=last)
            if len(mono):
                yield np.ascontiguousarray(mono, dtype=np.float32)
    except AudioLoadError:
        raise
    except _DECODE_ERRORS as e:
        raise _unreadable(path, e) from None
    if total == 0:
        raise AudioLoadError(f"{path}: contains no audio samples")
    if peak > PEAK_WARNING:
        logger.warning("%s: samples reach %.3g, far outside [-1, 1] (integer values stored unscaled in a float "
                       "file?): the tags are not meaningful", path, peak)


def check_finite(source: str | os.PathLike, samples: np.ndarray, rate: int, start: int = 0) -> np.ndarray:
    """`samples` (from sample `start` of `source` at `rate` Hz); AudioLoadError naming `source` if
    they hold NaN or infinity, of which a single one makes every output of a model NaN."""
    if not np.isfinite(samples).all():
        first = start + int(np.flatnonzero(~np.isfinite(samples))[0])
        raise AudioLoadError(f"{source}: contains non-finite samples (NaN or infinity), the first at "
                             f"{first / rate:.3f} s")
    return samples


def stream_audio(path: str | os.PathLike, sample_rate: int = 32000,
                 block_seconds: float = 30.0) -> Iterator[np.ndarray]:
    """Mono float32 blocks of `path` at `sample_rate` (about `block_seconds` each), decoded and
    resampled incrementally, so a recording of any length is never held in memory whole.
    Concatenated, the blocks equal `load_audio(path, sample_rate)` exactly.

    Problems with the path or the file header raise AudioLoadError here; decoding errors later in
    the file raise it while iterating."""
    if block_seconds <= 0:
        raise ValueError(f"block_seconds must be positive, got {block_seconds}")
    return _decoded(_checked_path(path), sample_rate, block_seconds)


def load_audio(path: str | os.PathLike, sample_rate: int = 32000) -> np.ndarray:
    """Mono float32 waveform of `path` at `sample_rate` (1-D array).

    Raises AudioLoadError with a one-line message for missing, empty, unreadable or silent-length
    (zero samples) files."""
    chunks = list(_decoded(_checked_path(path), sample_rate, None))
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def native_length(path: str | os.PathLike) -> Optional[tuple[int, int]]:
    """(frames, sample rate) of a file libsndfile reads, from its header; None for other files and
    for pipes (which reading the header would consume)."""
    path = Path(path)
    if path.suffix.lower() not in SOUNDFILE_EXTENSIONS or not path.is_file():
        return None
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError):
        return None
    return (info.frames, info.samplerate) if info.samplerate > 0 else None


def audio_duration(path: str | os.PathLike) -> Optional[float]:
    """Duration of `path` in seconds from its header (None where the container does not say);
    meant for progress bars, not for sample-exact work. None for a pipe, which reading the header
    would consume."""
    path = _checked_path(path)
    if not _is_regular(path):
        return None
    try:
        length = native_length(path)
        if length is not None:
            return length[0] / length[1]
        with av.open(str(path)) as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if streams and streams[0].duration is not None and streams[0].time_base is not None:
                return float(streams[0].duration * streams[0].time_base)
            return container.duration / 1e6 if container.duration else None
    except _DECODE_ERRORS as e:
        raise _unreadable(path, e) from None


def find_audio_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (searched recursively for known audio extensions, sorted) into a
    list of files. Files given explicitly are kept whatever their extension. Raises
    AudioLoadError for a missing path or a folder without audio files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
            companions = [f for f in found if f.name.startswith(APPLEDOUBLE_PREFIX)]
            if companions:
                logger.warning("%s: skipped %d macOS metadata file(s) named %s* (no audio inside)", p,
                               len(companions), APPLEDOUBLE_PREFIX)
                found = [f for f in found if not f.name.startswith(APPLEDOUBLE_PREFIX)]
            if not found:
                raise AudioLoadError(f"{p}: folder contains no audio files "
                                     f"({', '.join(sorted(AUDIO_EXTENSIONS))})")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise AudioLoadError(f"{p}: no such file or folder")
    return _unique(files)


def _unique(files: list[Path]) -> list[Path]:
    """`files` without repeats of one file (by any spelling of its path), first ones kept; logged."""
    seen: dict[Path, Path] = {}
    for f in files:
        seen.setdefault(f.resolve(), f)
    if len(seen) < len(files):
        logger.warning("%d repeated path(s) left out: each file is analyzed once", len(files) - len(seen))
    return list(seen.values())
