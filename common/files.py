"""Writing files so that a reader never sees a half-written one."""
from __future__ import annotations

import codecs
import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from common.errors import InputError

logger = logging.getLogger(__name__)
LOCK_NAME = ".efficientat.lock"


TEMP_TAG = "efficientat"  # in every temporary file name this project writes: .<name>.efficientat-<pid>.tmp
_TEMP_NAME = re.compile(rf"^\..+\.{TEMP_TAG}-(\d+)(?:-\d+)?\.tmp$")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temp_path(path: str | os.PathLike) -> Path:
    """A new, empty temporary file beside `path`, named .<name>.efficientat-<pid>.tmp (a counter
    is added when this process already has one): recognisably ours, and the pid tells a later
    run whether its writer still lives (`remove_stale_temporaries`). Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1000):
        tmp = path.with_name(f".{path.name}.{TEMP_TAG}-{os.getpid()}{f'-{k}' if k else ''}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: too many temporary files of this process beside it")


def disk_full(error: OSError, path: str | os.PathLike) -> OSError:
    """`error` (ENOSPC or EDQUOT) as an OSError naming `path` (a write on an open file names
    none), for `common.errors.run_cli`'s one line."""
    return OSError(error.errno, os.strerror(error.errno), str(path))


def publish(tmp: Path, path: Path) -> None:
    """Rename the finished temporary file `tmp` to `path`, with an ordinary new file's
    permissions (not the temporary file's owner-only 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path` to write to (`temp_path`); renamed to `path` (with an
    ordinary new file's permissions) when the block finishes without an exception, removed
    otherwise, so an existing `path` is never left half-written. Parent folders are created. A
    full disk (or quota) is raised as an OSError naming `path`."""
    path = Path(path)
    try:
        tmp = temp_path(path)
    except OSError as e:
        raise (disk_full(e, path) if e.errno in DISK_FULL else e) from None
    try:
        yield tmp
        publish(tmp, path)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full(e, path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a file for writing that appears at `path` only when the block finishes without an
    exception (see `atomic_path`; the file is flushed and closed before the rename, so a full
    disk found then is raised too)."""
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


def check_not_input(option: str, path: str | os.PathLike | None, inputs: Iterable[str | os.PathLike]) -> None:
    """InputError unless output `path` (given as `option`) is none of the `inputs` (files; folders
    and "-" are skipped): the same file under any spelling (a relative path, a symbolic or hard
    link: same device and inode), which writing the output would destroy. An output that does not
    exist yet is no input."""
    if path is None or str(path) == "-":
        return
    try:
        out = os.stat(path)
    except OSError:
        return
    for source in inputs:
        if str(source) == "-":
            continue
        try:
            given = os.stat(source)
        except OSError:
            continue
        if (given.st_dev, given.st_ino) == (out.st_dev, out.st_ino) and not stat.S_ISDIR(given.st_mode):
            raise InputError(f"{path}: {option} is also an input ({source}): writing it would destroy that input; "
                             "give another output path")


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temporaries(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """This project's temporary files in `folder` (for `name`, default any) whose writing
    process has died: left by a kill or a crash. Other files, such as a user's .notes.tmp,
    never match."""
    stale = []
    for tmp in sorted(Path(folder).glob(f".{name}.{TEMP_TAG}-*.tmp")):
        match = _TEMP_NAME.match(tmp.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            stale.append(tmp)
    return stale


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete `stale_temporaries(folder)`; returns them."""
    stale = stale_temporaries(folder)
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


_LOCKS: dict[Path, int] = {}  # folder -> descriptor of its held lock file, for this process's life


def lock_folder(folder: str | os.PathLike, what: str = "run") -> None:
    """Take the OS lock of `folder` (flock on <folder>/.efficientat.lock, holding this pid) for
    this process: InputError naming the holder's pid when another process holds it. The OS
    releases it when the process ends, however it ends; `unlock_folder` releases it sooner.
    Taking a lock this process holds already does nothing."""
    folder = Path(folder).resolve()
    if folder in _LOCKS:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InputError(f"{folder}: another {what} is writing into this folder (pid {holder}); "
                         "wait for it to end or use another folder") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[folder] = fd


def unlock_folder(folder: str | os.PathLike) -> None:
    """Release `lock_folder`'s lock of `folder` if this process holds it."""
    fd = _LOCKS.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor releases the flock


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
