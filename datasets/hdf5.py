"""HDF5 containers of mp3 clips (AudioSet, FSD50K, OpenMIC): reading, writing, mp3 coding.

Layout (one row per clip, all datasets of length N):
    audio_name  fixed-length bytes (S20 by default)    clip file name, e.g. b"Y--4gqARaEJE.mp3"
    mp3         variable-length uint8                   the complete bytes of one mp3 file
    target      uint8 (N, ceil(C / 8)) packed bits      multi-hot labels (big-endian bit order),
                or float32 (N, P)                       or plain float targets (OpenMIC)

mp3 clips are 32 kHz mono, encoded with LAME at 128 kbit/s (FFmpeg's default) and decoded to
float32 without resampling, by libsndfile where it gives FFmpeg's samples, else by PyAV.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

import av
import h5py
import numpy as np
import soundfile as sf

from common.errors import InputError
from common.files import atomic_path

logger = logging.getLogger(__name__)

REQUIRED_DATASETS = ("audio_name", "mp3", "target")
MP3_BITRATE = 128_000
SPACE_MARGIN = 64 * 1024  # bytes kept free beside a row: HDF5's chunk index and metadata on close


class Mp3DecodeError(ValueError):
    """The bytes of one row are not a decodable mp3 (corrupt, truncated or empty)."""


class CorruptRowError(ValueError):
    """HDF5 cannot read a row of the file (its data is corrupt)."""


SNDFILE_MP3 = "MP3" in sf.available_formats()  # libsndfile >= 1.1 decodes mp3 (mpg123)


def decode_mp3(data: np.ndarray | bytes, length: Optional[int] = None) -> np.ndarray:
    """Decode the bytes of an mp3 file to a mono float32 1-D array in [-1, 1] at the file's own
    rate: the first audio stream's frames in order, channels averaged (the original laid the
    channels of a multi-channel file end to end). With `length`, exactly `length` samples: the
    first ones, zero-padded at the end (what `datasets.augment.fit_length` makes of the whole clip).

    libsndfile (mpg123) decodes straight into the output buffer when the file's header states its
    exact length (the Xing/LAME header that LAME and FFmpeg write) and the decoder delivers it; it
    matches FFmpeg's decoder within 1e-5 at the same alignment. Other files (no exact length,
    truncated, not readable by libsndfile) are decoded by PyAV (FFmpeg), as the original did."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if not raw:
        raise Mp3DecodeError("empty mp3 data")
    if SNDFILE_MP3:
        waveform = _decode_sndfile(raw, length)
        if waveform is not None:
            return waveform
    waveform = _decode_pyav(raw)
    return waveform if length is None else np.pad(waveform[:length], (0, max(0, length - len(waveform))))


def _decode_sndfile(raw: bytes, length: Optional[int]) -> Optional[np.ndarray]:
    """libsndfile decode of a complete mp3 into a fresh buffer, or None where PyAV must decide."""
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            if f.format != "MP3" or f.frames <= 0:
                return None
            wanted = f.frames if length is None else min(length, f.frames)
            shape = (f.frames if length is None else length,) + ((f.channels,) if f.channels > 1 else ())
            out = np.zeros(shape, dtype=np.float32)
            if len(f.read(out=out[:wanted])) != wanted:
                return None  # shorter than its header says (truncated): PyAV decodes what is there
    except (RuntimeError, ValueError):  # sf.LibsndfileError is a RuntimeError
        return None
    return out.mean(axis=1, dtype=np.float32) if out.ndim == 2 else out


def _decode_pyav(raw: bytes) -> np.ndarray:
    """PyAV (FFmpeg) decode of the first audio stream, frame by frame, channels averaged."""
    chunks = []
    try:
        with av.open(io.BytesIO(raw), format="mp3") as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if not streams:
                raise Mp3DecodeError("no audio stream")
            for packet in container.demux(streams[0]):
                for frame in packet.decode():
                    if frame.format.name not in ("flt", "fltp"):
                        raise Mp3DecodeError(f"decoded sample format {frame.format.name}, "
                                             "expected float32")
                    samples = frame.to_ndarray()  # planar: (channels, n); packed: (1, n * channels)
                    if frame.format.is_planar:
                        chunks.append(samples.mean(axis=0) if samples.shape[0] > 1 else samples[0])
                    else:
                        chunks.append(samples.reshape(-1, len(frame.layout.channels)).mean(axis=1))
    except (av.FFmpegError, OSError, ValueError) as e:
        if isinstance(e, Mp3DecodeError):
            raise
        raise Mp3DecodeError(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else e}") from None
    if not chunks:
        raise Mp3DecodeError("no audio frames")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def encode_mp3(waveform: np.ndarray, sample_rate: int = 32000, bitrate: int = MP3_BITRATE,
               xing_header: bool = True) -> bytes:
    """Encode a float waveform, mono (samples,) or stereo (2, samples), as mp3 file bytes (LAME
    through PyAV), as `ffmpeg -i x -codec:a mp3 -ar 32000` does. `xing_header=False` leaves out the
    Xing/LAME header that states the exact length (as FFmpeg writing to a pipe does)."""
    samples = np.ascontiguousarray(np.clip(waveform, -1.0, 1.0), dtype=np.float32)
    samples = samples.reshape(-1 if samples.ndim == 2 else 1, samples.shape[-1])
    if samples.shape[0] not in (1, 2):
        raise ValueError(f"expected a mono or stereo waveform, got shape {waveform.shape}")
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp3", options={"write_xing": str(int(xing_header))}) as container:
        stream = container.add_stream("mp3", rate=sample_rate)
        stream.layout = layout
        stream.bit_rate = bitrate
        frame_size = stream.codec_context.frame_size or 1152
        for start in range(0, samples.shape[1], frame_size):
            frame = av.AudioFrame.from_ndarray(samples[:, start:start + frame_size], format="fltp",
                                               layout=layout)
            frame.sample_rate = sample_rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def pack_targets(multi_hot: np.ndarray) -> np.ndarray:
    """Multi-hot rows (..., C) -> packed uint8 (..., ceil(C / 8)), class 0 in the top bit."""
    return np.packbits(np.asarray(multi_hot) > 0.5, axis=-1)


def unpack_targets(packed: np.ndarray, num_classes: int) -> np.ndarray:
    """Packed uint8 rows -> float32 multi-hot rows (..., num_classes)."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=num_classes).astype(np.float32)


class Mp3HDF5:
    """Read access to one mp3 HDF5 file. The file is checked when the object is made and opened
    lazily in each process that reads it (h5py handles must not cross fork), so one object can be
    shared with DataLoader workers. `in_mem` loads the whole file into memory when opened."""

    def __init__(self, path: str | os.PathLike, in_mem: bool = False) -> None:
        self.path = Path(path)
        self.in_mem = in_mem
        if not self.path.is_file():
            raise InputError(f"{self.path}: dataset file not found")
        try:
            with h5py.File(self.path, "r") as f:
                missing = [k for k in REQUIRED_DATASETS if k not in f]
                if missing:
                    raise InputError(f"{self.path}: not an mp3 dataset file (no {', '.join(missing)} "
                                     "dataset)")
                lengths = {k: len(f[k]) for k in REQUIRED_DATASETS}
                self.target_shape = tuple(f["target"].shape[1:])
                self.target_dtype = f["target"].dtype
        except OSError as e:
            raise InputError(f"{self.path}: not a readable HDF5 file ({e})") from None
        if len(set(lengths.values())) != 1:
            raise InputError(f"{self.path}: datasets have different lengths {lengths}")
        self.length = lengths["audio_name"]
        self._file: Optional[h5py.File] = None
        self._pid: Optional[int] = None

    def _open(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r", driver="core" if self.in_mem else None)
            self._pid = os.getpid()
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_pid": None}

    def __len__(self) -> int:
        return self.length

    def _row(self, key: str, index: int) -> Any:
        try:
            return self._open()[key][index]
        except OSError as e:
            raise CorruptRowError(f"HDF5 error reading {key}: {_first_line(e)}") from None

    def _column(self, key: str) -> np.ndarray:
        """All rows of dataset `key`; in a corrupt file, rows HDF5 cannot read are zero (logged)."""
        data = self._open()[key]
        try:
            return data[:]
        except OSError:
            pass
        out = np.zeros(data.shape, dtype=data.dtype)
        step = data.chunks[0] if data.chunks else 1024
        bad = 0
        for start in range(0, len(data), step):
            try:
                out[start:start + step] = data[start:start + step]
            except OSError:
                for i in range(start, min(start + step, len(data))):
                    try:
                        out[i] = data[i]
                    except OSError:
                        bad += 1
        logger.warning("%s: %d row(s) of %s cannot be read (corrupt file); they are left empty",
                       self.path, bad, key)
        return out

    def name(self, index: int) -> str:
        """Stored name of row `index`; CorruptRowError if HDF5 cannot read it."""
        return self._row("audio_name", index).decode(errors="replace")

    def names(self) -> list[str]:
        return [n.decode(errors="replace") for n in self._column("audio_name")]

    def describe(self, index: int) -> str:
        """'<file>: row <index> (<name>)' for messages, also where the name is unreadable."""
        try:
            name = self.name(index)
        except CorruptRowError:
            name = "name unreadable"
        return f"{self.path}: row {index} ({name})"

    def mp3(self, index: int) -> np.ndarray:
        """The mp3 bytes of row `index`; CorruptRowError if HDF5 cannot read them."""
        return self._row("mp3", index)

    def target(self, index: int) -> np.ndarray:
        """The target row `index` as stored; CorruptRowError if HDF5 cannot read it."""
        return self._row("target", index)

    def targets(self) -> np.ndarray:
        """All target rows as stored (packed bytes or floats); unreadable rows are zero."""
        return self._column("target")


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class Mp3HDF5Writer:
    """Write an mp3 HDF5 file row by row into a temp file beside `path`, renamed to `path` when the
    `with` block ends without error (deleted otherwise), so readers never see a partial file.
    `target_width` and `target_dtype` give the target row (66 uint8 for packed AudioSet labels).
    `name_length` is the fixed byte length of audio_name (20 as in the original files; longer
    for longer names)."""

    def __init__(self, path: str | os.PathLike, target_width: int, target_dtype: Any = np.uint8,
                 name_length: int = 20) -> None:
        self.path = Path(path)
        self.target_width = target_width
        self.target_dtype = np.dtype(target_dtype)
        self.name_length = name_length
        self.count = 0
        self._file: Optional[h5py.File] = None
        self._tmp = self.path
        self._unflushed = 0  # bytes appended since HDF5 last wrote its cache to disk
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Mp3HDF5Writer":
        # a temp path (common.files.atomic_path): HDF5 reads back chunks it wrote as datasets grow
        with self._stack as stack:
            self._tmp = tmp = stack.enter_context(atomic_path(self.path))
            self._file = f = stack.enter_context(h5py.File(tmp, "w"))
            self._create_datasets(f)
            self._stack = stack.pop_all()  # keep both open until __exit__; on error both close here
        return self

    def _create_datasets(self, f: h5py.File) -> None:
        # fletcher32: HDF5 checksums the chunks of names and targets, so corrupt ones fail to read
        # (CorruptRowError) instead of reading as wrong labels (variable-length data takes no filter)
        f.create_dataset("audio_name", shape=(0,), maxshape=(None,), dtype=f"S{self.name_length}",
                         chunks=(1024,), fletcher32=True)
        f.create_dataset("mp3", shape=(0,), maxshape=(None,), dtype=h5py.vlen_dtype(np.uint8),
                         chunks=(64,))
        f.create_dataset("target", shape=(0, self.target_width), maxshape=(None, self.target_width),
                         dtype=self.target_dtype, chunks=(1024, self.target_width), fletcher32=True)

    def append(self, name: str, mp3: bytes, target: np.ndarray) -> None:
        """Add one clip: its file name, the mp3 file bytes and its (packed or float) target row."""
        encoded = name.encode()
        if len(encoded) > self.name_length:
            raise ValueError(f"name {name!r} is longer than {self.name_length} bytes")
        target = np.asarray(target, dtype=self.target_dtype).reshape(-1)
        if target.shape != (self.target_width,):
            raise ValueError(f"target of {name!r} has {target.size} values, expected {self.target_width}")
        self._check_space(len(mp3) + len(encoded) + target.nbytes)
        f, i = self._file, self.count
        for key in REQUIRED_DATASETS:
            f[key].resize(i + 1, axis=0)
        f["audio_name"][i] = encoded
        f["mp3"][i] = np.frombuffer(mp3, dtype=np.uint8)
        f["target"][i] = target
        self.count += 1

    def _check_space(self, nbytes: int) -> None:
        """OSError ENOSPC naming the output before a row that would not fit beside the rows HDF5
        still holds in memory (flushed first when room gets short) and its own bookkeeping: HDF5
        meeting a full disk prints its error stack and may crash on close."""
        if shutil.disk_usage(self._tmp.parent).free < self._unflushed + nbytes + SPACE_MARGIN:
            self._file.flush()
            self._unflushed = 0
            if shutil.disk_usage(self._tmp.parent).free < nbytes + SPACE_MARGIN:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        self._unflushed += nbytes

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self._stack.__exit__(exc_type, exc, tb)  # close the file, then rename it (or delete it on error)
