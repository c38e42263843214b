"""The project's one audio loader: any common audio file -> mono float32 at a target rate.

soundfile reads wav/flac/ogg (and the other libsndfile formats); PyAV (FFmpeg) reads mp3, m4a and
everything else. Channels are averaged, and a different rate is converted with soxr at quality
"HQ" (librosa's default resampler), which reproduces the waveforms the released models were
evaluated on.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import av
import numpy as np
import soundfile as sf
import soxr

SOUNDFILE_EXTENSIONS = {".wav", ".wave", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".aifc", ".au",
                        ".snd", ".caf", ".w64", ".rf64"}
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | {".mp3", ".m4a", ".mp4", ".aac", ".opus", ".wma", ".webm",
                                           ".mka", ".mkv", ".ac3", ".amr", ".3gp"}


class AudioLoadError(ValueError):
    """A file could not be read as audio; the message names the file and the problem."""


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (frames, channels)
    return data.T, rate


def _read_pyav(path: Path) -> tuple[np.ndarray, int]:
    with av.open(str(path)) as container:
        streams = [s for s in container.streams if s.type == "audio"]
        if not streams:
            raise AudioLoadError(f"{path}: no audio stream in file")
        stream = streams[0]
        # planar float keeps channels apart; rate and layout are left as they are
        resampler = av.AudioResampler(format="fltp")
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
        rate = stream.rate or stream.codec_context.sample_rate
    if not chunks:
        return np.zeros((1, 0), dtype=np.float32), rate
    return np.concatenate(chunks, axis=1).astype(np.float32, copy=False), rate


def load_audio(path: str | os.PathLike, sample_rate: int = 32000) -> np.ndarray:
    """Mono float32 waveform of `path` at `sample_rate` (1-D array).

    Raises AudioLoadError with a one-line message for missing, empty, unreadable or silent-length
    (zero samples) files."""
    path = Path(path)
    if not path.exists():
        raise AudioLoadError(f"{path}: no such file")
    if path.is_dir():
        raise AudioLoadError(f"{path}: is a folder, not an audio file")
    if path.stat().st_size == 0:
        raise AudioLoadError(f"{path}: file is empty")
    try:
        if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
            try:
                data, rate = _read_soundfile(path)
            except sf.LibsndfileError:
                data, rate = _read_pyav(path)  # e.g. an mp3 or exotic codec in a .wav container
        else:
            data, rate = _read_pyav(path)
    except AudioLoadError:
        raise
    except (sf.LibsndfileError, av.FFmpegError, OSError, RuntimeError, ValueError) as e:
        raise AudioLoadError(f"{path}: not a readable audio file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unknown error'})") from None
    if data.shape[1] == 0:
        raise AudioLoadError(f"{path}: contains no audio samples")
    mono = data.mean(axis=0) if data.shape[0] > 1 else data[0]
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def find_audio_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (searched recursively for known audio extensions, sorted) into a
    list of files. Files given explicitly are kept whatever their extension. Raises
    AudioLoadError for a missing path or a folder without audio files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                raise AudioLoadError(f"{p}: folder contains no audio files "
                                     f"({', '.join(sorted(AUDIO_EXTENSIONS))})")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise AudioLoadError(f"{p}: no such file or folder")
    return files
