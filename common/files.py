"""Writing files so that a reader never sees a half-written one."""
from __future__ import annotations

import codecs
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from common.errors import InputError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to `path` to write to; renamed to `path` (with an ordinary new
    file's permissions) when the block finishes without an exception, removed otherwise, so an
    existing `path` is never left half-written. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # not mkstemp's owner-only 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a file for writing that appears at `path` only when the block finishes without an
    exception (see `atomic_path`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def check_output(path: str | os.PathLike, option: str) -> None:
    """InputError unless a file can be written at `path` (given as `option`): it is not a
    folder, no folder on its way is a file, and a file can be created in the nearest existing
    folder (tried, then removed). Scripts call this before their work starts."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: {option} is a folder, not a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{path}: {option} lies under {folder}, which is a file")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"{path}: {option} cannot be written ({e.strerror or e} in {folder})") from None


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `atomic_path` leaves in `folder` when a process is killed while
    writing (.<name>.<random>.tmp); returns them. Call it where no other process writes."""
    stale = sorted(Path(folder).glob(".*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def read_text(path: Path) -> str:
    """The text of a CSV as common tools save it: UTF-8 (with or without BOM), UTF-16 with BOM
    (Excel's "Unicode text"), or else Windows-1252 (Excel's "CSV" on Western Windows), which is
    logged. InputError naming the line if none fits."""
    data = path.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise InputError(f"{path}: starts like UTF-16 text but is not; save it as UTF-8") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f"byte 0x{data[e.start]:02x} on line {line}"
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text ({where}); save it as UTF-8") from None
    logger.warning("%s: not UTF-8 (%s); read as Windows-1252", path, where)
    return text
