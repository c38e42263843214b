"""The probe's on-disk cache of clip features (`--embedding_cache`), so that a second run with other head
settings reads them back instead of running the network again.

Where. `--embedding_cache`, by default `$EFFICIENTAT_CACHE/embeddings` or the user cache folder
(`$XDG_CACHE_HOME` or `~/.cache`)/efficientat/embeddings: never the working directory.

Key. A folder per feature extractor, named by a hash of everything that changes a feature besides
the clip (the model's weights except the final classifier layer, the frontend's `eval_settings()`,
the crop settings, the feature version), and in it one `.npz` per clip, named by a hash of the
clip's identity (path, size, modification time, sample rate).

Failures never stop a run: an unreadable or truncated file is computed again (warning); a cache
folder that cannot be written (read-only, under a file, disk full) is given up with one warning and
the run goes on without a cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from common.files import atomic_write

logger = logging.getLogger(__name__)

CACHE_ENV = "EFFICIENTAT_CACHE"


def default_cache_dir() -> Path:
    """$EFFICIENTAT_CACHE/embeddings, else <user cache folder>/efficientat/embeddings."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "embeddings"
    user_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(user_cache).expanduser() / "efficientat" / "embeddings"


def folder_size(folder: Path) -> tuple[int, int]:
    """(files, bytes) under `folder` (0, 0 when it does not exist)."""
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def clear_cache(folder: Path) -> tuple[int, int]:
    """Delete every cached feature under `folder`; returns the (files, bytes) freed."""
    freed = folder_size(folder)
    if folder.is_dir():
        for entry in folder.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return freed


class EmbeddingCache:
    """Clip features stored as `<root>/<key>/<hash of the clip key>.npz` (a dict of arrays).
    `root` None: nothing is stored."""

    def __init__(self, root: Optional[str | os.PathLike], key: str) -> None:
        self.folder: Optional[Path] = None
        if root is not None:
            self.folder = Path(root).expanduser().resolve() / key
            self._check_writable()

    def _disable(self, why: str) -> None:
        logger.warning("embedding cache %s: %s; running without a cache", self.folder, why)
        self.folder = None

    def _check_writable(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.folder / ".write_test", "wb") as f:
                f.write(b"ok")
            (self.folder / ".write_test").unlink()
        except OSError as e:
            self._disable(f"cannot be written ({e.strerror or e})")

    def path(self, clip_key: str) -> Optional[Path]:
        if self.folder is None:
            return None
        return self.folder / (hashlib.sha256(clip_key.encode()).hexdigest()[:32] + ".npz")

    def load(self, clip_key: str) -> Optional[dict[str, np.ndarray]]:
        """The stored arrays of a clip, or None (absent, or unreadable: logged)."""
        path = self.path(clip_key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            logger.warning("%s: unreadable cached embedding (%s), computing it again", path, e)
            return None

    def store(self, clip_key: str, arrays: dict[str, np.ndarray]) -> None:
        """Write a clip's arrays atomically; on a write error give the cache up (warning)."""
        path = self.path(clip_key)
        if path is None:
            return
        try:
            with atomic_write(path, "wb") as f:
                np.savez(f, **arrays)
        except OSError as e:
            self._disable(f"writing failed ({e.strerror or e})")

    def report(self) -> str:
        """One line: where the cache is and how large it is."""
        if self.folder is None:
            return "embedding cache: off"
        files, size = folder_size(self.folder.parent)
        return f"embedding cache {self.folder.parent}: {files} files, {size / 1e6:.1f} MB"
