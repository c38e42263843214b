"""Shared test fixtures. Reference data (golden outputs of the original code, a released checkpoint,
the AudioSet label table, a real recording) lives in ../shared beside the repository; tests that
need it skip with a clear reason where it is absent (a user's clone)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EFFICIENTAT_SHARED", REPO.parent / "shared"))
SKIP_REASON = f"reference data folder {SHARED} not found (it sits beside the repository in CI)"


def shared_path(*parts: str) -> Path:
    """Path inside ../shared; skips the calling test if the file is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{SKIP_REASON}: missing {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the checkpoint/label cache at a temp folder holding copies of ../shared's released
    checkpoint and label table, so no test touches resources/ or the network."""
    cache = tmp_path_factory.mktemp("model_cache")
    for sub in ("weights", "metadata"):
        folder = SHARED / sub
        if folder.is_dir():
            for f in folder.iterdir():
                shutil.copy(f, cache / f.name)
    old = os.environ.get("EFFICIENTAT_MODEL_DIR")
    os.environ["EFFICIENTAT_MODEL_DIR"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("EFFICIENTAT_MODEL_DIR", None)
    else:
        os.environ["EFFICIENTAT_MODEL_DIR"] = old


def _cached(cache: Path, filename: str) -> Path:
    path = cache / filename
    if not path.exists():
        pytest.skip(f"{SKIP_REASON}: no {filename}")
    return path


@pytest.fixture(scope="session")
def mn04_checkpoint(model_cache: Path) -> Path:
    """The released mn04_as checkpoint in the test cache (skips where ../shared is absent)."""
    return _cached(model_cache, "mn04_as_mAP_432.pt")


@pytest.fixture(scope="session")
def labels_file(model_cache: Path) -> Path:
    """The AudioSet label table in the test cache (skips where ../shared is absent)."""
    return _cached(model_cache, "class_labels_indices.csv")
