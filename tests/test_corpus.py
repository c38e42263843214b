"""corpus.py (Ray Data corpus job): flags, part files, the teacher export, and whole jobs on a real
Ray cluster on this machine: a head and a second node (1 CPU each, on 127.0.0.1,
`ray.cluster_utils.Cluster`), ~50 generated clips plus bad files through --address.

The numbers equal inference.py --all_classes / embeddings.py; both nodes do work; a model actor
killed mid-job is restarted and every file still lands in the table once; a driver stopped by
SIGINT leaves whole part files, a second job into the same folder is refused, and --resume
processes only the files the table lacks. The distillation round trip (ensemble logits -> teacher
files -> ex_audioset.py trains against them) runs on the embedded Ray (the default without
--address). Ray's processes listen on 127.0.0.1 only, keep their session files in a temporary
folder and are stopped by the test (or the job) that started them. Skipped where ray is absent.
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
from typing import Optional

import numpy as np
import pytest
import soundfile as sf
import torch

ray = pytest.importorskip("ray", reason="ray[data] is not installed (pip install -r requirements-corpus.txt)")
pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
import pyarrow.parquet as pq  # noqa: E402

from ray.cluster_utils import Cluster  # noqa: E402

import corpus as corpus_cli  # noqa: E402
from common.errors import InputError, run_cli  # noqa: E402
from datasets.audio import load_audio  # noqa: E402
from datasets.audioset import BALANCED_FILE, EVAL_FILE, AudioSetDataset, TeacherPredictions  # noqa: E402
from datasets.hdf5 import encode_mp3  # noqa: E402
from helpers.inference.corpus_inputs import sort_inputs  # noqa: E402
from helpers.inference.corpus_table import JOB_TOKEN, part_files, table_schema, write_part  # noqa: E402
from helpers.inference.corpus_teacher import clip_name, export_teacher  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.datagen import clip  # noqa: E402
from tests.test_training_helpers import one_thread  # noqa: E402,F401  (autouse: one torch thread here)

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


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """corpus.main through the CLI guard in this process: (exit code, stderr)."""
    try:
        code = run_cli(lambda: corpus_cli.main(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_bad_flags_inputs_and_outputs_are_one_line_exit_2_before_ray_starts(tmp_path, capsys, mn04_checkpoint):
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(3200, np.float32), 32000)
    (tmp_path / "no_column.csv").write_text("name,label\na.wav,x\n")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine\n")
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "part-0.parquet").write_bytes(b"")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"settings": {"sample_rate": 16000}}))
    out = ["--output", str(tmp_path / "out")]
    cases = {
        (): "give --audio_path and/or --manifest, and --output",
        ("--audio_path", str(tmp_path / "missing.wav"), *out): "missing.wav: no such file or folder",
        ("--manifest", str(tmp_path / "no_column.csv"), *out): "a CSV manifest needs a column named file, path or",
        ("--audio_path", str(audio), "--address", "auto", "--num_cpus", "2", *out): "not with --address",
        ("--audio_path", str(audio), "--ensemble", "mn04_as", "mn04_as", "--embeddings", *out):
            "an ensemble has no single embedding",
        ("--audio_path", str(audio), "--model_name", "mn04_as", "--checkpoint", "x.pt", *out): "give one",
        ("--audio_path", str(audio), "--batch_size", "0", *out): "must be at least 1",
        ("--audio_path", str(audio), "--model_name", "mn04_as", "--output", str(tmp_path / "busy")):
            "the output folder is not empty (holds 1 file(s), e.g. notes.txt); pass --resume",
        ("--audio_path", str(audio), "--model_name", "mn04_as", "--output", str(audio)): "is a file, not a folder",
        ("--audio_path", str(audio), "--model_name", "mn04_as", "--output", str(tmp_path / "parts"), "--resume"):
            "holds part files but no manifest.json",
        ("--audio_path", str(audio), "--model_name", "mn04_as", "--output", str(tmp_path / "old"), "--resume"):
            "--resume with other settings than the table's (columns, model, sample_rate differ",
        ("--export_teacher", str(tmp_path), "--teacher_preds", "t.npy"): "give both",
        ("--export_teacher", str(tmp_path), "--teacher_preds", "t.npy", "--fname_to_index", "t.json"):
            "holds no corpus table",
    }
    for argv, message in cases.items():
        code, err = _main(list(argv), capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "out").exists() and ray.is_initialized() is False


def test_inputs_sorted_on_the_driver_without_listing_folders(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.wav").write_bytes(b"")
    (tmp_path / "m.txt").write_text("x.wav\n")
    inputs = sort_inputs([str(tmp_path / "a"), str(tmp_path / "a" / "b" / "x.wav"), str(tmp_path / "a" / "b")],
                         [str(tmp_path / "m.txt")])
    assert [g for g, _ in inputs.folders] == [str(tmp_path / "a")] and inputs.files == []  # inside a given folder
    assert inputs.roots() == [str(tmp_path / "a"), str(tmp_path / "m.txt")]
    with pytest.raises(InputError, match="no such manifest file"):
        sort_inputs([], [str(tmp_path / "nope.txt")])


def _rows(files: list[str], logits: np.ndarray, errors: Optional[dict[int, str]] = None) -> pa.Table:
    """Corpus rows with logits (errors: row -> message) in the table's schema."""
    errors = errors or {}
    schema = table_schema(527, 2, False, None, True)
    ok = [i not in errors for i in range(len(files))]
    return pa.Table.from_pydict({
        "file": files, "duration": [1.0 if g else None for g in ok],
        "error": [errors.get(i) for i in range(len(files))],
        "top_indices": [[0, 1] if g else None for g in ok], "top_labels": [["a", "b"] if g else None for g in ok],
        "top_probabilities": [[0.9, 0.1] if g else None for g in ok],
        "logits": [row.tolist() if g else None for row, g in zip(logits, ok)]}, schema=schema)


def test_parts_are_whole_named_by_their_files_and_fenced_by_the_job_token(tmp_path):
    (tmp_path / JOB_TOKEN).write_text("job-1")
    logits = np.random.default_rng(0).standard_normal((3, 527)).astype(np.float32)
    first = write_part(tmp_path, _rows(["c.wav", "a.wav", "b.wav"], logits), "job-1")
    again = write_part(tmp_path, _rows(["b.wav", "c.wav", "a.wav"], logits[[2, 0, 1]]), "job-1")  # a retried write
    assert first == again and part_files(tmp_path) == [first]
    table = pq.read_table(first)
    assert table.column("file").to_pylist() == ["a.wav", "b.wav", "c.wav"]
    np.testing.assert_array_equal(np.array(table.column("logits").to_pylist()[0], np.float32), logits[1])
    assert write_part(tmp_path, _rows(["d.wav"], logits[:1]), "job-0") is None  # a straggler of an older job
    assert part_files(tmp_path) == [first] and sorted(p.name for p in tmp_path.iterdir()) == [JOB_TOKEN, first.name]


def test_teacher_export_names_rows_and_errors(tmp_path):
    assert clip_name("/a/Y--4gqARaEJE.wav") == "--4gqARaEJE" and clip_name("b/--4gqARaEJE_30.000.flac") == "--4gqARaEJE"
    assert clip_name("c/short.wav") is None
    assert clip_name("/r/birds/x1.wav", "relative", "/r") == "birds/x1"
    assert clip_name("/q/x.wav", "relative", "/r") is None
    table = tmp_path / "table"
    table.mkdir()
    (table / JOB_TOKEN).write_text("t")
    logits = np.random.default_rng(1).standard_normal((4, 527)).astype(np.float32)
    ids = ["Yabcdefghijk.wav", "lmnopqrstuv_0.000.mp3", "broken.wav", "Y0123456789-.flac"]
    write_part(table, _rows(ids[:2], logits[:2]), "t")
    write_part(table, _rows(ids[2:], logits[2:], errors={0: "broken.wav: file is empty"}), "t")
    rows = export_teacher(table, tmp_path / "t.npy", tmp_path / "t.csv")
    assert rows == 3  # the error row is left out
    teacher = TeacherPredictions(tmp_path / "t.npy", tmp_path / "t.csv")
    probs, known = teacher.lookup(["abcdefghijk", "0123456789-", "lmnopqrstuv", "unknown1234"])
    assert known.tolist() == [True, True, True, False]
    np.testing.assert_allclose(probs[:3].numpy(), 1 / (1 + np.exp(-logits[[0, 3, 1]])), rtol=1e-6)
    write_part(table, _rows(["x/Yabcdefghijk.mp3"], logits[:1]), "t")
    with pytest.raises(InputError, match="both give the clip name 'abcdefghijk'"):
        export_teacher(table, tmp_path / "u.npy", tmp_path / "u.json")
    assert not (tmp_path / "u.npy").exists() and not (tmp_path / "u.json").exists()
    with pytest.raises(InputError, match="gives no clip name"):
        export_teacher(table, tmp_path / "u.npy", tmp_path / "u.json", "relative", str(tmp_path / "elsewhere"))


def _own_audio(root: Path) -> list[str]:
    """Unlabelled clips of one's own in a folder with a sub-folder (paths relative to `root`)."""
    rng = np.random.default_rng(3)
    names = []
    for i in range(8):
        name = f"{'birds/' if i % 2 else ''}take{i}.wav"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, clip(i % 2, 1.0, 32000, rng), 32000)
        names.append(name)
    return names


def test_embedded_ensemble_logits_become_teacher_files_that_ex_audioset_trains_against(ray_env, tmp_path, capsys):
    """The KD round trip on one's own unlabelled audio, on the Ray that corpus.py starts itself."""
    import ex_audioset
    from datasets.prepare_hdf5 import main as prepare
    from helpers.inference.resolve import resolve_model
    own = tmp_path / "own"
    names = _own_audio(own)
    table = tmp_path / "teacher_table"
    job = subprocess.run([sys.executable, "corpus.py", "--audio_path", str(own), str(own / "take0.wav"), "--output",
                          str(table), "--logits", "--ensemble", "mn04_as", "mn04_as", "--object_store_memory", "256",
                          "--quiet"], cwd=REPO, env=ray_env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr
    assert f"processed {len(names)} of {len(names)} file(s)" in job.stdout and "files per node: 127.0.0.1" in job.stdout
    rows = _table(table)
    assert sorted(rows) == sorted(str(own / n) for n in names)  # take0.wav once: it lies in the given folder
    meta = json.loads((table / "manifest.json").read_text())
    assert meta["settings"]["model"]["name"] == "ensemble(mn04_as, mn04_as)" and meta["counts"]["rows"] == 8
    assert [w["file"] for w in meta["settings"]["model"]["weights"]] == ["mn04_as_mAP_432.pt"] * 2
    tagger = resolve_model("mn04_as")
    from helpers.inference.writers import ParquetWriter
    records = [ParquetWriter.read_record(p) for p in part_files(table)]  # each part names its model
    assert records and all(r["name"] == "ensemble(mn04_as, mn04_as)" and r["classes"] == 527 for r in records)
    for file, row in rows.items():
        expected = tagger.forward(torch.from_numpy(load_audio(file))[None])[0][0]
        np.testing.assert_allclose(row["logits"], expected.numpy(), atol=2e-4, err_msg=file)

    code, err = _main(["--export_teacher", str(table), "--teacher_preds", str(tmp_path / "teacher.npy"),
                       "--fname_to_index", str(tmp_path / "teacher.json"), "--teacher_names", "relative",
                       "--audio_root", str(own), "--pseudo_labels", str(tmp_path / "labels.csv")], capsys)
    assert code == 0, err
    labels = dict(list(csv.reader(open(tmp_path / "labels.csv")))[1:])
    assert sorted(labels) == sorted(names)
    for name, classes in labels.items():
        logits = np.array(rows[next(f for f in rows if f.endswith(name))]["logits"])
        expected = sorted({int(np.argmax(logits))} | set(np.flatnonzero(logits >= 0).tolist()))
        assert [int(c) for c in classes.split(";")] == expected
    dataset = tmp_path / "dataset"
    for hdf in (BALANCED_FILE, EVAL_FILE):
        prepare(["--audio_dir", str(own), "--csv", str(tmp_path / "labels.csv"), "--output", str(dataset / hdf)])
    train = AudioSetDataset([dataset / BALANCED_FILE], clip_length=1.0)
    probs, known = TeacherPredictions(tmp_path / "teacher.npy", tmp_path / "teacher.json").lookup(train.names())
    assert known.all()  # every clip of the training file finds its teacher row, by name
    for name, p in zip(train.names(), probs):
        logits = np.array(rows[next(f for f in rows if f.endswith(name + ".wav"))]["logits"])
        np.testing.assert_allclose(p.numpy(), 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-7)
    capsys.readouterr()
    code = run_cli(lambda: ex_audioset.main([
        "--train", "--balanced_only", "--dataset_dir", str(dataset), "--out_dir", str(tmp_path / "student"),
        "--logger", "none", "--model_name", "mn01", "--model_width", "0.1", "--n_epochs", "1", "--epoch_len", "8",
        "--batch_size", "4", "--num_workers", "0", "--clip_length", "1", "--warm_up_len", "1",
        "--teacher_preds", str(tmp_path / "teacher.npy"), "--fname_to_index", str(tmp_path / "teacher.json")]))
    assert code in (0, None), capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["distillation_loss"] > 0 and np.isfinite(log[0]["train_loss"])  # trained against the teacher


SIGNAL_CHECK = """
import signal, sys
import ray
from helpers.inference.corpus_job import ClusterSpec, ray_session
handler = lambda signum, frame: None
signal.signal(signal.SIGTERM, handler)
with ray_session(ClusterSpec(address=sys.argv[1])):
    assert signal.getsignal(signal.SIGTERM) is handler, signal.getsignal(signal.SIGTERM)
    assert ray.cluster_resources()["CPU"] == 2 and len(ray.nodes()) == 2
assert not ray.is_initialized()
"""


def test_joining_a_cluster_keeps_the_jobs_signal_handlers(cluster, ray_env):
    """ray.init makes SIGTERM exit at once; the job's handler (which keeps the parts whole and
    the manifest true) must stay in place. In a driver process of its own, as corpus.py runs:
    Ray reads RAY_ENV (127.0.0.1 only) when it is imported."""
    done = subprocess.run([sys.executable, "-c", SIGNAL_CHECK, cluster], cwd=REPO, env=ray_env, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr


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
    stopped = json.loads((out / "manifest.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["counts"]["rows"] == len(done)
    assert stopped["runs"][0]["files"] == len(done)  # parts published after the last progress row count too

    refused = subprocess.run([sys.executable, "corpus.py", *args], cwd=REPO, env=ray_env, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    code, stdout, stderr = _finish(_start([*args, "--resume"], ray_env))
    assert code == 1, stderr
    left = len(names) - len(done)
    assert f"processed {left} of {left} file(s)" in stdout, stderr
    table = _table(out)
    assert sorted(table) == sorted(names)
    assert all(table[f] == row for f, row in done.items())  # the parts of the first run are kept as they were
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["status"] == "complete" and len(meta["runs"]) == 2
    assert not list(out.glob(".part-*"))
