"""corpus.py on a real Ray cluster on this machine: a head and a second node (1 CPU each, on
127.0.0.1, `ray.cluster_utils.Cluster`), ~50 generated clips plus bad files through --address.

The numbers equal inference.py --all_classes / embeddings.py; both nodes do work; a model actor
killed mid-job is restarted and every file still lands in the table once; a driver stopped by
SIGINT leaves whole part files, a second job into the same folder is refused, and --resume
processes only the files the table lacks. The distillation round trip (corpus logits -> teacher
files -> ex_audioset.py trains against them) runs on an embedded Ray. Skipped where ray is absent.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ray = pytest.importorskip("ray", reason="ray[data] is not installed (pip install -r requirements-corpus.txt)")
pytest.importorskip("polars", reason="Ray Data's aggregations need polars (pip install -r requirements-corpus.txt)")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed")

from ray.cluster_utils import Cluster  # noqa: E402

from common.errors import run_cli  # noqa: E402
from datasets.hdf5 import encode_mp3  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.datagen import clip  # noqa: E402

# Ray quiet and local: no usage report, no token file in ~/.ray, 127.0.0.1 only, no log dedup delay
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_DEDUP_LOGS": "0", "RAY_worker_register_timeout_seconds": "120"}
# two actors that cannot share a 1-CPU node, decode and write tasks beside each
SMALL = ["--model_name", "mn04_as", "--actors", "2", "--cpus_per_actor", "0.6", "--cpus_per_decode", "0.25",
         "--batch_size", "4", "--decode_batch", "3", "--rows_per_part", "4", "--quiet"]
ACTOR_TITLE = b"ray::MapWorker(MapBatches(ModelStage))"


def _write_corpus(root: Path) -> tuple[Path, list[str]]:
    """~50 clips in several formats, rates and lengths (one longer than a chunk), 3 bad files,
    and a CSV manifest of them with relative paths, a missing file and a repeated line. Returns the
    manifest and its distinct lines."""
    rng = np.random.default_rng(7)
    audio = root / "audio"
    (audio / "sub").mkdir(parents=True)
    names = []
    for i in range(50):
        kind, folder = i % 2, audio / ("sub" if i % 5 == 0 else "")
        if i < 20:
            name, sr, seconds = f"a{i:02d}.wav", 32000, 1.0
            sf.write(folder / name, clip(kind, seconds, sr, rng), sr)
        elif i < 30:
            name, sr = f"s{i:02d}.wav", 44100
            sf.write(folder / name, np.stack([clip(kind, 2.0, sr, rng)] * 2, axis=1), sr)
        elif i < 40:
            name = f"f{i:02d}.flac"
            sf.write(folder / name, clip(kind, 1.5, 16000, rng), 16000)
        elif i < 49:
            name = f"m{i:02d}.mp3"
            (folder / name).write_bytes(encode_mp3(clip(kind, 1.2, 32000, rng)))
        else:
            name = "long.wav"
            sf.write(folder / name, clip(kind, 62.0, 8000, rng), 8000)
        names.append(str((folder / name).relative_to(root)))
    (audio / "empty.wav").write_bytes(b"")
    (audio / "text.wav").write_text("not audio at all\n")
    sf.write(audio / "nan.wav", np.full(8000, np.nan, dtype=np.float32), 8000, subtype="FLOAT")
    names += ["audio/empty.wav", "audio/text.wav", "audio/nan.wav", "audio/missing.wav"]
    manifest = root / "files.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "note"])
        writer.writerows([n, "x"] for n in names + names[:3])
    return manifest, names


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    return _write_corpus(root)


@pytest.fixture(scope="module")
def ray_env(mn04_checkpoint) -> dict[str, str]:
    """The environment of this module's Ray processes and drivers; Ray's session files in a
    temporary folder (short: Ray's socket paths are limited)."""
    tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    (Path(tmp) / "ray").mkdir()
    env = {**RAY_ENV, "RAY_TMPDIR": tmp}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield {**os.environ}
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_env) -> str:
    """A head and a second node, 1 CPU each, on 127.0.0.1; shut down after the module."""
    nodes = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 128 << 20}
    cluster = Cluster(initialize_head=True, head_node_args={**nodes, "include_dashboard": False})
    try:
        cluster.add_node(**nodes)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "corpus.py", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _table(folder: Path) -> dict[str, dict]:
    parts = sorted(folder.glob("part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    table = {r["file"]: r for r in rows}
    assert len(table) == len(rows), "a file is in the table twice"
    return table


def _wait_for_part(folder: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not list(folder.glob("part-*.parquet")):
        assert proc.poll() is None, f"the job ended before writing a part: {proc.communicate()}"
        assert time.monotonic() < end, "no part file appeared"
        time.sleep(0.05)


def _actor_titles() -> dict[int, bytes]:
    """Processes of the model stage and their titles (Ray names them in their command line; an
    actor running a batch is `...ModelStage)).submit`)."""
    titles = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                title = (entry / "cmdline").read_bytes()
                if title.startswith(ACTOR_TITLE):
                    titles[int(entry.name)] = title
        except OSError:
            continue
    return titles


def _kill_busy_actor(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, list[int]]:
    """SIGKILL a model actor while it runs a batch; returns its pid and the actors' pids then."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"the job ended before an actor ran a batch: {proc.communicate()}"
        titles = _actor_titles()
        busy = [pid for pid, title in titles.items() if b").submit" in title]
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            return busy[0], sorted(titles)
        time.sleep(0.01)
    raise AssertionError("no model actor ran a batch")


def _reference(root: Path, tmp: Path, capsys) -> tuple[dict, dict]:
    """inference.py --all_classes and embeddings.py on the same files, in this process."""
    import embeddings
    import inference
    audio = str(root / "audio")
    run_cli(lambda: inference.main(["--model_name", "mn04_as", "--audio_path", audio, "--all_classes",
                                    "--output", str(tmp / "ref.json")]))
    run_cli(lambda: embeddings.main(["--model_name", "mn04_as", "--audio_path", audio,
                                     "--output", str(tmp / "ref.npz")]))
    capsys.readouterr()
    probs = {}
    for record in json.loads((tmp / "ref.json").read_text())["results"]:
        vector = np.zeros(527, np.float32)
        for tag in record["tags"]:
            vector[tag["index"]] = tag["probability"]
        probs[os.path.relpath(os.path.abspath(record["file"]), root)] = vector
    with np.load(tmp / "ref.npz") as data:
        vectors = {os.path.relpath(os.path.abspath(f), root): e for f, e in zip(data["filenames"], data["embeddings"])}
    return probs, vectors


def test_cluster_job_equals_single_process_and_survives_a_killed_actor(cluster, ray_env, corpus, tmp_path,
                                                                       capsys, labels_file):
    manifest, names = corpus
    out = tmp_path / "table"
    proc = _start(["--manifest", str(manifest), "--output", str(out), "--address", cluster, "--all_classes",
                   "--embeddings", *SMALL], ray_env)
    killed, actors = _kill_busy_actor(proc)
    rows_then = sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))
    assert killed in actors and len(actors) == 2 and rows_then < len(names)  # mid-job, in a batch
    probs, vectors = _reference(manifest.parent, tmp_path, capsys)
    code, stdout, stderr = _finish(proc)
    assert code == 1, stderr  # the bad files failed, every other file was tagged
    table = _table(out)
    assert sorted(table) == sorted(names)  # every distinct file once, the repeated lines too
    failed = {f for f, r in table.items() if r["error"] is not None}
    assert failed == {n for n in names if Path(n).stem in ("empty", "text", "nan", "missing")}
    assert "audio/missing.wav: no such file" in table["audio/missing.wav"]["error"]
    assert "non-finite samples" in table["audio/nan.wav"]["error"]
    for file in set(names) - failed:
        row = table[file]
        np.testing.assert_allclose(row["probabilities"], probs[file], atol=2e-5, err_msg=file)
        np.testing.assert_allclose(row["embedding"], vectors[file], rtol=1e-4, atol=2e-5, err_msg=file)
        assert row["top_indices"][0] == int(np.argmax(probs[file])) and len(row["top_labels"]) == 10
        assert row["top_probabilities"] == sorted(row["top_probabilities"], reverse=True)
    assert abs(table["audio/long.wav"]["duration"] - 62.0) < 1e-3
    assert table["audio/a02.wav"]["duration"] == 1.0
    meta = json.loads((out / "manifest.json").read_text())
    run = meta["runs"][-1]
    assert meta["status"] == "complete" and meta["counts"] == {"rows": len(names), "failed": 4}
    assert len(run["files_per_node"]) == 2 and all(c > 0 for c in run["files_per_node"].values())
    assert len(run["decoded_per_node"]) == 2
    assert set(run["model_pids"]) - set(actors), "the killed actor was not replaced"
    assert f"processed {len(names)} of {len(names)} file(s)" in stdout and "files per node: 127.0.0.1" in stdout
    assert "error: audio/text.wav: not a readable audio file" in stderr


def test_sigint_leaves_whole_parts_a_second_job_is_refused_and_resume_completes(cluster, ray_env, corpus, tmp_path):
    manifest, names = corpus
    out = tmp_path / "table"
    args = ["--manifest", str(manifest), "--output", str(out), "--address", cluster, "--logits", *SMALL]
    proc = _start(args, ray_env)
    _wait_for_part(out, proc)
    second = subprocess.run([sys.executable, "corpus.py", *args], cwd=REPO, env=ray_env, capture_output=True,
                            text=True, timeout=120)
    proc.send_signal(signal.SIGINT)
    code, _, stderr = _finish(proc)
    assert second.returncode == 2 and "another corpus job is writing into this folder" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert code == 130, stderr
    assert "interrupted by SIGINT" in stderr
    done = _table(out)  # every part reads whole
    assert 0 < len(done) < len(names)
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"

    refused = subprocess.run([sys.executable, "corpus.py", *args], cwd=REPO, env=ray_env, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    code, stdout, stderr = _finish(_start([*args, "--resume"], ray_env))
    assert code == 1, stderr
    left = len(names) - len(done)
    assert f"processed {left} of {left} file(s)" in stdout
    table = _table(out)
    assert sorted(table) == sorted(names)
    assert all(table[f] == row for f, row in done.items())  # the parts of the first run are kept as they were
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["status"] == "complete" and len(meta["runs"]) == 2
    assert not list(out.glob(".part-*"))
