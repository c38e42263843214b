"""An mp3 HDF5 writer whose unfinished file survives an interruption (Ctrl-C, a kill, a full
disk) and is continued by the next run for the same output, so a long preparation never starts
from zero again."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from types import TracebackType
from typing import Optional

import h5py
import numpy as np

from common.errors import InputError
from common.files import publish, stale_temporaries, temp_path
from datasets.hdf5 import REQUIRED_DATASETS, Mp3HDF5Writer

logger = logging.getLogger(__name__)
COMMIT_EVERY = 64  # rows between flushes: what a kill can lose at most


class ResumableMp3Writer(Mp3HDF5Writer):
    """`Mp3HDF5Writer` into a temporary file (common.files.temp_path) that is kept when the block
    ends by an interruption, with the rows committed so far (flushed every COMMIT_EVERY rows, their
    number in the attribute complete_rows); on entry it takes over such a file that a dead process
    left for the same output (`count` rows already there, `stored()` says which). Bad input
    (InputError, ValueError) still deletes it. The finished file is renamed to the output."""

    def __enter__(self) -> "ResumableMp3Writer":
        if not self._take_over():
            self._tmp = temp_path(self.path)
            self._file = h5py.File(self._tmp, "w")
            self._create_datasets(self._file)
            self.commit()
        return self

    def _take_over(self) -> bool:
        """Continue the newest file an interrupted run left (the others are deleted); False if
        there is none or it is unusable (deleted, with a warning)."""
        stale = sorted(stale_temporaries(self.path.parent, self.path.name), key=lambda p: p.stat().st_mtime)
        for old in stale[:-1]:
            old.unlink(missing_ok=True)
        if not stale:
            return False
        self._tmp = temp_path(self.path)
        stale[-1].replace(self._tmp)
        try:
            self._file = f = h5py.File(self._tmp, "a")
            if (f["audio_name"].dtype != np.dtype(f"S{self.name_length}")
                    or f["target"].shape[1:] != (self.target_width,) or f["target"].dtype != self.target_dtype):
                raise ValueError("another layout")
            self.count = int(f.attrs["complete_rows"])
            for key in REQUIRED_DATASETS:
                f[key].resize(self.count, axis=0)
        except (OSError, KeyError, ValueError) as e:
            logger.warning("%s: left by an interrupted run but unusable (%s); starting over", stale[-1].name, e)
            self._close()
            self._tmp.unlink(missing_ok=True)
            return False
        logger.warning("continuing the %d clips an interrupted run wrote (%s)", self.count, stale[-1].name)
        return True

    def append(self, name: str, mp3: bytes, target: np.ndarray) -> None:
        super().append(name, mp3, target)
        if self.count % COMMIT_EVERY == 0:
            self.commit()

    def commit(self) -> None:
        """Flush the rows written so far to disk and record their number."""
        self._file.attrs["complete_rows"] = self.count
        self._file.flush()
        self._unflushed = 0

    def stored(self) -> tuple[list[str], np.ndarray]:
        """(names, target rows) of the rows in the file."""
        names = [n.decode() for n in self._file["audio_name"][:self.count]]
        return names, self._file["target"][:self.count]

    def restart(self) -> None:
        """Drop every row (a taken-over file whose rows are not those of this run)."""
        for key in REQUIRED_DATASETS:
            self._file[key].resize(0, axis=0)
        self.count = 0
        self.commit()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if exc_type is None:
            self.commit()
            self._close()
            publish(self._tmp, self.path)
            return
        if issubclass(exc_type, (InputError, ValueError)):
            self._close()
            self._tmp.unlink(missing_ok=True)
            return
        with contextlib.suppress(Exception):  # best effort: the rows of the last commit stay
            self.commit()
        self._close()
        logger.warning("kept the %d clips written so far in %s: the same command continues from there",
                       self.count, self._tmp)
