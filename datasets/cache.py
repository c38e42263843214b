"""On-disk cache of decoded, resampled waveforms (`--cache_path`), so that only the first epoch
pays for decoding and resampling.

One file per clip. The file name is a hash of the clip's source signature (path, size and
modification time of the source, the sample rate), so an edited source file is decoded again
instead of being served stale. Each file starts with a header (magic, sample rate, number of
samples, CRC-32 of the samples) that is checked on every read; a truncated or corrupt file is
decoded again and rewritten. Files are written to a temporary name in the same folder and renamed,
so concurrent DataLoader workers and interrupted runs never leave a half-written file behind.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from common.errors import InputError
from common.files import atomic_write

logger = logging.getLogger(__name__)

_MAGIC = b"EATWAV01"
_HEADER = struct.Struct("<8sIQI")  # magic, sample rate, number of float32 samples, crc32


def file_signature(path: str | os.PathLike) -> str:
    """Identity of a source file for cache keys: absolute path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


class WaveformCache:
    """Mono float32 waveforms stored under `root/namespace_r<sample_rate>/`."""

    def __init__(self, root: str | os.PathLike, namespace: str, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.folder = Path(root) / f"{namespace}_r{sample_rate}"
        self.writable = True
        try:  # a folder that cannot be created or written is a one-line error before any work
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.folder / ".write_test", "wb") as f:
                f.write(b"ok")
            (self.folder / ".write_test").unlink()
        except OSError as e:
            raise InputError(f"{self.folder}: --cache_path cannot be written ({e.strerror or e})") from None

    def path(self, key: str) -> Path:
        digest = hashlib.sha1(f"{key}|{self.sample_rate}".encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.wav32"

    def load(self, key: str) -> Optional[np.ndarray]:
        """The cached waveform for `key`, or None if absent or invalid (invalid files are logged)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            logger.warning("%s: unreadable cache file (%s); decoding the source again", path, e.strerror or e)
            return None
        problem = None
        if len(data) < _HEADER.size:
            problem = "shorter than its header"
        else:
            magic, rate, length, crc = _HEADER.unpack_from(data)
            payload = memoryview(data)[_HEADER.size:]
            if magic != _MAGIC:
                problem = "not a waveform cache file"
            elif rate != self.sample_rate:
                problem = f"sample rate {rate}, expected {self.sample_rate}"
            elif len(payload) != 4 * length:
                problem = f"{len(payload)} data bytes, header says {4 * length}"
            elif zlib.crc32(payload) != crc:
                problem = "checksum mismatch"
        if problem:
            logger.warning("%s: invalid cache file (%s); decoding the source again", path, problem)
            return None
        return np.frombuffer(payload, dtype="<f4").astype(np.float32)

    def store(self, key: str, waveform: np.ndarray) -> None:
        """Write `waveform` atomically (temporary file in the same folder, then rename); after a
        failed write (disk full, folder made read-only) the cache only reads (warned once)."""
        if not self.writable:
            return
        path = self.path(key)
        payload = np.ascontiguousarray(waveform, dtype="<f4").tobytes()
        header = _HEADER.pack(_MAGIC, self.sample_rate, len(payload) // 4, zlib.crc32(payload))
        try:
            with atomic_write(path, "wb") as f:  # creates the sub-folder
                f.write(header)
                f.write(payload)
        except OSError as e:  # e.g. the disk filled up during the run: go on without storing
            logger.warning("%s: waveform cache not written (%s); decoding without storing from now on",
                           self.folder, e.strerror or e)
            self.writable = False

    def get(self, key: str, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """Cached waveform for `key`; on a miss, `decode()` it and store the result."""
        waveform = self.load(key)
        if waveform is None:
            waveform = np.asarray(decode(), dtype=np.float32)
            self.store(key, waveform)
        return waveform
