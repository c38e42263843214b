"""Where released files (checkpoints, the AudioSet label table) come from: shipped, cached, downloaded.

A file shipped with the repository in `resources/` (the default model and the label table) is used
first, if it passes its check. Every other file lives in the cache, `$EFFICIENTAT_MODEL_DIR` if
set, else the user cache (`$XDG_CACHE_HOME/efficientat`, by default `~/.cache/efficientat`). A file
already in the cache is used as it is, without any network access. A missing file is streamed into
a temporary file next to its destination, checked, and only then renamed into place, so an
interrupted or failed download never leaves a partial file behind.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm import tqdm

from common.errors import DownloadError  # noqa: F401  (re-exported)
from common.files import atomic_path

logger = logging.getLogger(__name__)

CACHE_ENV = "EFFICIENTAT_MODEL_DIR"
# files committed with the repository (resources/README.md lists them with their licences)
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "resources"


def default_cache_dir() -> Path:
    """The user cache for downloads: $XDG_CACHE_HOME/efficientat, else ~/.cache/efficientat."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "efficientat"


def cache_dir() -> Path:
    """Folder holding downloaded checkpoints and label files: $EFFICIENTAT_MODEL_DIR or the user
    cache. DownloadError if $EFFICIENTAT_MODEL_DIR names a file."""
    folder = Path(os.environ.get(CACHE_ENV) or default_cache_dir())
    if folder.exists() and not folder.is_dir():
        raise DownloadError(f"{CACHE_ENV}={folder} is a file, not a folder: point it to the folder "
                            "for checkpoints (it is created if missing)")
    return folder


def _check_writable(folder: Path, filename: str) -> None:
    """DownloadError unless a file can be created in `folder` (made if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DownloadError(f"cannot write to the checkpoint cache {folder} ({e.strerror or e}): set {CACHE_ENV} "
                            f"to a writable folder, or put {filename} there by hand") from None


def sha256sum(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> str:
    info = path.stat()
    return f"{info.st_size} {info.st_mtime_ns}"


def check_sha256(path: Path, sha256: str) -> None:
    """DownloadError unless the file at `path` has the digest `sha256`. A match is remembered
    beside the file (.<name>.verified: size, modification time, digest), so an unchanged file is
    not read again; a file changed since (same size or not) is checked anew."""
    record = path.with_name(f".{path.name}.verified")
    try:
        if record.read_text().split() == [*_stamp(path).split(), sha256]:
            return
    except OSError:
        pass
    if sha256sum(path) != sha256:
        raise DownloadError(f"{path}: not the released file (its sha256 differs: changed or corrupt); delete it "
                            "to download it again")
    try:
        record.write_text(f"{_stamp(path)} {sha256}\n")
    except OSError:  # a read-only cache: checked again next time
        pass


def _fetch(url: str, dest: Path, timeout: float, progress: bool) -> None:
    """Stream `url` into `dest`; raise if the transfer is shorter than announced."""
    request = urllib.request.Request(url, headers={"User-Agent": "EfficientAT"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name[:40],
                  disable=not progress, leave=False) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise DownloadError(f"connection closed after {received} of {total} bytes")


def download(urls: str | Sequence[str], dest: Path, sha256: Optional[str] = None,
             validate: Optional[Callable[[Path], None]] = None, timeout: float = 60.0,
             progress: bool = True) -> Path:
    """Download the first of `urls` that works into `dest` (atomically) and return `dest`.

    `sha256`, when given, must match; otherwise `validate(path)` may raise to reject the file.
    Raises DownloadError naming the URL(s) and the path where the file can be put by hand.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    dest = Path(dest)
    problems = []
    for url in urls:
        try:
            with atomic_path(dest) as tmp:
                logger.info("downloading %s to %s", url, dest)
                _fetch(url, tmp, timeout, progress)
                if sha256 is not None:
                    actual = sha256sum(tmp)
                    if actual != sha256:
                        raise DownloadError(f"sha256 mismatch (expected {sha256}, got {actual})")
                if validate is not None:
                    validate(tmp)
            return dest
        except urllib.error.HTTPError as e:
            problems.append(f"{url}: HTTP {e.code} {e.reason}")
        except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError, ValueError) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            problems.append(f"{url}: {reason}")
    raise DownloadError(f"could not download {dest.name} ({'; '.join(problems)}); "
                        f"download it by hand and put it at {dest}")


def shipped_file(filename: str, sha256: Optional[str] = None,
                 validate: Optional[Callable[[Path], None]] = None) -> Optional[Path]:
    """The copy of `filename` shipped in resources/, if there is one that passes the same check as a
    download (`sha256`, else `validate`); a copy that fails it is logged and passed over."""
    path = SHIPPED_DIR / filename
    if not path.is_file():
        return None
    try:
        if sha256 is not None and sha256sum(path) != sha256:
            raise ValueError(f"sha256 is not {sha256}")
        if sha256 is None and validate is not None:
            validate(path)
    except (OSError, ValueError) as e:
        logger.warning("shipped file %s fails its check (%s); using the cache instead", path, e)
        return None
    return path


def cached_file(filename: str, urls: str | Sequence[str], sha256: Optional[str] = None,
                validate: Optional[Callable[[Path], None]] = None, progress: bool = True) -> Path:
    """Path of `filename`: the shipped copy (`shipped_file`), else the cached one, downloaded into
    the cache first if it is not there yet."""
    shipped = shipped_file(filename, sha256, validate)
    if shipped is not None:
        return shipped
    path = cache_dir() / filename
    if path.is_file():
        if sha256 is not None:
            check_sha256(path, sha256)
        return path
    _check_writable(path.parent, filename)
    return download(urls, path, sha256=sha256, validate=validate, progress=progress)
