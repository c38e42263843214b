"""common/files.py: atomic writes leave either the complete new file or the old state."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.files import atomic_write


def test_atomic_write_replaces_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "table.csv"
    with atomic_write(target, newline="") as f:
        f.write("a,b\n")
        assert not target.exists()  # invisible until the block ends
    assert target.read_text() == "a,b\n"
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "a,b\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]  # no temporary file left

    with atomic_write(tmp_path / "image.png", "wb") as f:
        f.write(b"\x89PNG")
    assert (tmp_path / "image.png").read_bytes() == b"\x89PNG"
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(tmp_path / "x", "a"):
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
