"""Shared test fixtures. The suite passes in any clone, without network.

Reference data (golden outputs of the original code, the released mn04_as checkpoint, the AudioSet
label table, a real recording) lives in ../shared beside the repository (or $EFFICIENTAT_SHARED).
Small expected outputs derived from it are committed under tests/expect/, so architecture and
frontend parity are checked everywhere. A test that needs a released file gets it from ../shared,
the files shipped in resources/ (the mn04_as checkpoint and the label table) or the user's own
cache ($EFFICIENTAT_MODEL_DIR or ~/.cache/efficientat); otherwise it downloads it with
`--run-network`, or skips with the reason. Without `--run-network`, a test that tries to reach
another host skips instead of failing.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest

from common.download import default_cache_dir, shipped_file

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EFFICIENTAT_SHARED", REPO.parent / "shared"))
EXPECT = Path(__file__).resolve().parent / "expect"
SKIP_REASON = f"reference data folder {SHARED} not found (it sits beside the repository in CI)"
# the user's cache as configured before the tests point EFFICIENTAT_MODEL_DIR at a temporary one
USER_CACHE = Path(os.environ.get("EFFICIENTAT_MODEL_DIR") or default_cache_dir())
LABELS_FILE = "class_labels_indices.csv"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-network", action="store_true",
                     help="download released checkpoints and the label table that tests need when they "
                          "are neither in ../shared nor in the cache")


def shared_path(*parts: str) -> Path:
    """Path inside ../shared; skips the calling test if the file is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{SKIP_REASON}: missing {path}")
    return path


def expect_path(name: str) -> Path:
    """A committed expected output under tests/expect/ (see tests/expect/derive.py)."""
    return EXPECT / name


@pytest.fixture(scope="session", autouse=True)
def no_network(request: pytest.FixtureRequest) -> Iterator[None]:
    """Without --run-network, looking up or connecting to any host but this one skips the test
    (in-process code only: tests that run scripts ask for the files they need through the fixtures
    below)."""
    if request.config.getoption("--run-network"):
        yield
        return
    lookup, connect = socket.getaddrinfo, socket.socket.connect

    def guarded_lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        _check_host(host)
        return lookup(host, *args, **kwargs)

    def guarded_connect(sock: socket.socket, address: Any) -> Any:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            _check_host(address[0])
        return connect(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", guarded_lookup)
        patch.setattr(socket.socket, "connect", guarded_connect)
        yield


def _check_host(host: Any) -> None:
    local = ("localhost", "::1", "0.0.0.0", "", socket.gethostname())
    if isinstance(host, str) and host not in local and not host.startswith("127."):
        pytest.skip(f"needs the network (tried to reach {host}); run with --run-network")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the checkpoint/label cache at a temp folder holding copies of ../shared's released
    checkpoint and label table, so no test touches the user's cache."""
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


def released_file(request: pytest.FixtureRequest, cache: Path, filename: str, model_name: str = "") -> Path:
    """`filename` in the test cache: from ../shared (copied at start), shipped in resources/, from the
    user's cache, or, with --run-network, downloaded (the label table, or the checkpoint of
    `model_name`); else skip."""
    path = cache / filename
    if path.is_file():
        return path
    shipped = shipped_file(filename)
    if shipped is not None:
        shutil.copy(shipped, path)
        return path
    if (USER_CACHE / filename).is_file():
        shutil.copy(USER_CACHE / filename, path)
        return path
    if not request.config.getoption("--run-network"):
        pytest.skip(f"needs {filename}: not in {SHARED} nor in {USER_CACHE} (run with --run-network to "
                    "download it)")
    if model_name:
        from models.pretrained import checkpoint_path
        return checkpoint_path(model_name, progress=False)
    from common.labels import label_table
    label_table()
    return path


@pytest.fixture(scope="session")
def mn04_checkpoint(request: pytest.FixtureRequest, model_cache: Path) -> Path:
    """The released mn04_as checkpoint in the test cache (see `released_file`)."""
    return released_file(request, model_cache, "mn04_as_mAP_432.pt", "mn04_as")


@pytest.fixture(scope="session")
def labels_file(request: pytest.FixtureRequest, model_cache: Path) -> Path:
    """The AudioSet label table in the test cache (see `released_file`)."""
    return released_file(request, model_cache, LABELS_FILE)
