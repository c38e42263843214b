"""Checkpoint / label download and cache, against a local HTTP server on 127.0.0.1."""
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

from common import download as download_module, labels
from common.download import DownloadError, cached_file, default_cache_dir, download
from models import pretrained
from tests.conftest import REPO

PAYLOAD = bytes(range(256)) * 400


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/drop":  # announces the full length, sends half, hangs up
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/nothing"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_download_success_is_checked_and_atomic(server, tmp_path):
    Handler.files["/file.bin"] = PAYLOAD
    dest = download(f"{server}/file.bin", tmp_path / "file.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest(),
                    progress=False)
    assert dest.read_bytes() == PAYLOAD and leftovers(tmp_path) == ["file.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by other users of a shared cache


@pytest.mark.parametrize("path, problem", [("/drop", "connection closed after"), ("/missing", "HTTP 404"),
                                           ("/file.bin", "sha256 mismatch")])
def test_failed_download_leaves_nothing_and_says_where_to_put_the_file(server, tmp_path, path, problem):
    Handler.files["/file.bin"] = PAYLOAD
    dest = tmp_path / "model.pt"
    with pytest.raises(DownloadError) as err:
        download(f"{server}{path}", dest, sha256="0" * 64, progress=False)
    message = str(err.value)
    assert problem in message and f"{server}{path}" in message and str(dest) in message
    assert "\n" not in message and leftovers(tmp_path) == []


def test_no_network(tmp_path):
    url = closed_port_url()
    with pytest.raises(DownloadError, match="download it by hand and put it at"):
        download(url, tmp_path / "x.pt", progress=False)
    assert leftovers(tmp_path) == []


def test_cached_file_is_used_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path))
    (tmp_path / "present.pt").write_bytes(b"anything")
    assert cached_file("present.pt", closed_port_url()) == tmp_path / "present.pt"


@pytest.fixture
def nothing_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone without the files shipped in resources/ (so the cache and downloads are used)."""
    monkeypatch.setattr(download_module, "SHIPPED_DIR", tmp_path / "no_shipped_files")


def test_shipped_files_come_before_the_cache_and_are_checked(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path / "cache"))
    shipped = REPO / "resources" / "mn04_as_mAP_432.pt"
    assert pretrained.checkpoint_path("mn04_as") == shipped  # no cache folder made, no network
    labels._load.cache_clear()
    assert len(labels.class_names()) == 527 and not (tmp_path / "cache").exists()
    # a shipped copy that fails its sha256 is passed over (logged) for the cache
    monkeypatch.setattr(download_module, "SHIPPED_DIR", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / shipped.name).write_bytes(shipped.read_bytes()[:-1] + b"x")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / shipped.name).write_bytes(shipped.read_bytes())
    assert pretrained.checkpoint_path("mn04_as") == tmp_path / "cache" / shipped.name
    assert "fails its check (sha256 is not 899a8c62" in caplog.text


def test_default_cache_is_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("EFFICIENTAT_MODEL_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert download_module.cache_dir() == default_cache_dir() == tmp_path / "efficientat"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "efficientat"


def test_checkpoint_download_through_the_registry(server, tmp_path, monkeypatch, mn04_checkpoint, nothing_shipped):
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrained, "RELEASE_URL", f"{server}/release/")
    Handler.files["/release/mn04_as_mAP_432.pt"] = mn04_checkpoint.read_bytes()
    path = pretrained.checkpoint_path("mn04_as", progress=False)
    assert path == tmp_path / "cache" / "mn04_as_mAP_432.pt" and path.read_bytes() == mn04_checkpoint.read_bytes()
    # tampered bytes under the same name fail the known sha256
    Handler.files["/release/mn04_as_mAP_432.pt"] = mn04_checkpoint.read_bytes()[:-10] + b"0123456789"
    path.unlink()
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        pretrained.checkpoint_path("mn04_as", progress=False)
    assert not path.exists()


def test_checkpoint_without_known_hash_must_load_as_a_state_dict(server, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path))
    monkeypatch.setattr(pretrained, "RELEASE_URL", f"{server}/release/")
    Handler.files["/release/mn01_as_mAP_298.pt"] = b"<html>not a checkpoint</html>"
    with pytest.raises(DownloadError, match="not a PyTorch checkpoint"):
        pretrained.checkpoint_path("mn01_as", progress=False)
    assert leftovers(tmp_path) == []
    buffer = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(2)}, buffer)
    Handler.files["/release/mn01_as_mAP_298.pt"] = buffer.read_bytes()
    assert pretrained.checkpoint_path("mn01_as", progress=False).exists()


def test_label_table_falls_back_and_is_validated(server, tmp_path, monkeypatch, labels_file, nothing_shipped):
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path))
    labels._load.cache_clear()
    Handler.files["/repo/labels.csv"] = labels_file.read_bytes()
    monkeypatch.setattr(labels, "LABELS_URLS", (f"{server}/audioset/missing.csv", f"{server}/repo/labels.csv"))
    names = labels.class_names()
    assert len(names) == 527 and names[0] == "Speech" and names[137] == "Music"
    # a broken table from every source is rejected and not cached
    (tmp_path / "class_labels_indices.csv").unlink()
    labels._load.cache_clear()
    Handler.files["/repo/labels.csv"] = labels_file.read_bytes()[:5000]
    with pytest.raises(DownloadError, match="expected 527 classes"):
        labels.class_names()
    assert leftovers(tmp_path) == []
    labels._load.cache_clear()


def test_label_table_checks(tmp_path, labels_file):
    rows = labels_file.read_text().splitlines()
    assert len(labels.read_label_table(labels_file)) == 527
    bad = tmp_path / "dup.csv"
    bad.write_text("\n".join(rows[:2] + [rows[2].replace(rows[2].split(",")[1], rows[1].split(",")[1])] + rows[3:]))
    with pytest.raises(ValueError, match="MIDs are not unique"):
        labels.read_label_table(bad)
    bad.write_text("id,mid,name\n" + "\n".join(rows[1:]))
    with pytest.raises(ValueError, match="header"):
        labels.read_label_table(bad)


def test_cache_folder_problems_are_one_line(tmp_path, monkeypatch):
    """EFFICIENTAT_MODEL_DIR naming a file, or a folder that cannot be written, is said before any
    download is tried."""
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path / "file"))
    with pytest.raises(DownloadError, match=rf"EFFICIENTAT_MODEL_DIR={tmp_path / 'file'} is a file, not a folder"):
        cached_file("x.pt", closed_port_url())
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path / "file" / "sub"))
    with pytest.raises(DownloadError, match=rf"cannot write to the checkpoint cache {tmp_path / 'file' / 'sub'} "
                                            r"\(Not a directory\): set EFFICIENTAT_MODEL_DIR"):
        cached_file("x.pt", closed_port_url())
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path / "ro"))
        with pytest.raises(DownloadError, match="Permission denied.*or put x.pt there by hand"):
            cached_file("x.pt", closed_port_url())


def test_tests_never_reach_other_hosts_without_opting_in(request):
    """tests/conftest.py: without --run-network, a lookup of another host skips the test."""
    if request.config.getoption("--run-network"):
        pytest.skip("--run-network given")
    with pytest.raises(pytest.skip.Exception, match="run with --run-network"):
        socket.getaddrinfo("github.com", 443)
    assert socket.getaddrinfo("127.0.0.1", 80)  # this machine stays reachable
