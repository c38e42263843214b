"""The corpus job on Ray Data: list the inputs, decode them in CPU tasks, run the model in a pool of
actors, write Parquet parts, and keep the driver's memory flat (docs/corpus.md).

Without an address Ray starts on this machine (all cores, no dashboard, a bounded object store)
and stops with the job; with one the job joins a running cluster. The driver checks that every
node sees the output folder and the inputs, lists what is left to do (`corpus_inputs`), streams
the pipeline of `corpus_stages` and reads back only one summary row per part written: a progress
bar, the failures as they come, files per node. SIGINT / SIGTERM stop the job at once: a part is
published whole (renamed into place) or not at all, and `--resume` continues the table.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pyarrow
import ray
import ray.data
import ray.exceptions
import torch
from ray.data.context import ShuffleStrategy
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from common.errors import InputError, as_input_error
from common.files import TEMP_TAG, unlock_folder
from helpers.inference.corpus_inputs import Inputs, decode, listing, to_process
from helpers.inference.corpus_stages import (Columns, ModelSpec, ModelStage, TableShape, model_identity,
                                             resolve_tagger, table_shape)
from helpers.inference.corpus_table import (PART_PREFIX, claim_folder, node_check, part_files, read_manifest,
                                            table_counts, write, write_manifest)
from helpers.inference.interrupt import SIGNALS, StopSignals

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
CODE_PACKAGES = ("common", "models", "datasets", "helpers")
DEFAULT_OBJECT_STORE_MB = 2048  # embedded Ray's shared-memory object store (at most a fifth of the RAM)
DECODE_MEMORY_MB = 256  # per decode task (a worker without torch: ~120 MiB), + 8 MiB per file of its batch
# what the workers need of this process's environment: where the model weights are cached
WORKER_ENV = ("EFFICIENTAT_MODEL_DIR",)
ACTOR_MEMORY_MB = 1536  # per model actor; unequal reservations also keep Ray from fusing the two stages


@dataclass(frozen=True)
class ClusterSpec:
    """Where the job runs: `address` None starts Ray here (`num_cpus`, default all; an object store
    of `object_store_mb`), else "auto" or HOST:PORT of a running cluster."""
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    object_store_mb: Optional[int] = None


@dataclass(frozen=True)
class PoolSpec:
    """How the work is split: model actors (None: one per GPU, or one per two CPUs) with their
    CPUs, GPUs and model batch size; decode tasks with their CPUs, files per batch and most at
    once (None: as many as fit); rows per part file."""
    actors: Optional[int] = None
    cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    batch_size: int = 16
    cpus_per_decode: float = 1.0
    decode_batch: int = 16
    decode_tasks: Optional[int] = None
    rows_per_part: int = 1000


@dataclass(frozen=True)
class CorpusJob:
    """One run of the corpus command."""
    inputs: Inputs
    output: Path
    model: ModelSpec = ModelSpec()
    columns: Columns = Columns()
    cluster: ClusterSpec = ClusterSpec()
    pool: PoolSpec = PoolSpec()
    resume: bool = False
    progress: bool = True


class JobFailed(RuntimeError):
    """The Ray job failed (an error in a stage that Ray's retries did not get past, a lost
    cluster): `details` is Ray's report; the message its last line and what to do."""

    def __init__(self, error: Exception) -> None:
        lines = [line for line in str(error).splitlines() if line.strip()]
        self.details = str(error)
        super().__init__(f"the Ray job failed: {lines[-1].strip() if lines else type(error).__name__}; the parts "
                         "written are whole: fix the cause and rerun with --resume")


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM while the job runs. A KeyboardInterrupt, as Ray Data expects of a
    Ctrl-C: an Exception raised inside its wait would be logged as a failure of Ray's own."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class RunStats:
    """What one run did, gathered from the parts' summary rows."""
    todo: int = 0
    files: int = 0
    failed: int = 0
    parts: int = 0
    decode_s: float = 0.0
    model_s: float = 0.0
    seconds: float = 0.0
    model_nodes: Counter = field(default_factory=Counter)
    decode_nodes: Counter = field(default_factory=Counter)
    processes: dict[str, set] = field(default_factory=lambda: {"decode": set(), "model": set()})
    signum: Optional[int] = None
    node_names: dict[str, str] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.files += row["rows"]
        self.failed += row["failed"]
        self.parts += row["part"] is not None
        self.decode_s += row["decode_s"]
        self.model_s += row["model_s"]
        nodes = json.loads(row["nodes"])
        self.model_nodes.update(nodes["model"])
        self.decode_nodes.update(nodes["decode"])
        for stage in ("decode", "model"):
            self.processes[stage].update(nodes["pids"][stage])

    def record(self) -> dict[str, Any]:
        """The run as manifest.json keeps it."""
        name = lambda node: self.node_names.get(node, node[:8])  # noqa: E731
        return {"files": self.files, "failed": self.failed, "to_process": self.todo, "parts": self.parts,
                "seconds": round(self.seconds, 3), "files_per_second": round(self.files / self.seconds, 3)
                if self.seconds else None,
                "files_per_node": {name(n): c for n, c in sorted(self.model_nodes.items())},
                "decoded_per_node": {name(n): c for n, c in sorted(self.decode_nodes.items())},
                "decode_seconds_per_file": self.decode_s / self.files if self.files else None,
                "model_seconds_per_file": self.model_s / self.files if self.files else None,
                "processes": {k: len(v) for k, v in self.processes.items()},
                "model_pids": sorted(self.processes["model"]),
                "interrupted_by": self.signum}


def code_version() -> str:
    """The git commit of this code ('+dirty' with uncommitted changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _stage_code(folder: Path) -> Path:
    """A copy of the packages and shipped resources the workers import and read, for Ray to ship
    to every node (runtime_env working_dir): nothing else from the repository folder travels."""
    for package in CODE_PACKAGES:
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (folder / "resources").mkdir()
    for f in (REPO / "resources").iterdir():
        if f.suffix in (".pt", ".csv") and f.stat().st_size < 64 << 20:
            shutil.copy2(f, folder / "resources" / f.name)
    return folder


@contextlib.contextmanager
def ray_session(cluster: ClusterSpec) -> Iterator[None]:
    """Ray started here (no address) or joined for the block; shut down (or left) after it. The
    workers get this code (`_stage_code`) and the model cache folder of this process, if set."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from this tool
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    with tempfile.TemporaryDirectory(prefix="efficientat-code-") as code:
        env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
        _init(cluster, {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True,
                        "runtime_env": {"working_dir": str(_stage_code(Path(code))), "env_vars": env}})
        for signum, handler in handlers.items():  # ray.init makes SIGTERM exit at once: the job's handler comes back
            signal.signal(signum, handler)
        _quiet_data_context()
        try:
            yield
        finally:
            ray.shutdown()


def _init(cluster: ClusterSpec, options: dict[str, Any]) -> None:
    """ray.init for `cluster`; InputError when Ray cannot start or the cluster cannot be joined."""
    try:
        if cluster.address is None:
            memory = cluster.object_store_mb or min(DEFAULT_OBJECT_STORE_MB, _ram_mb() // 5)
            ray.init(address="local", num_cpus=cluster.num_cpus or os.cpu_count(),
                     object_store_memory=memory << 20, **options)
        else:
            ray.init(address=cluster.address, **options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        where = f"--address {cluster.address}: cannot join the Ray cluster" if cluster.address else \
            "cannot start Ray on this machine"
        raise InputError(f"{where} ({why})") from None


def _quiet_data_context() -> None:
    """Ray Data as this job runs it: no progress bars or INFO lines of its own (the job has its
    bar and summary; warnings stay), and a shuffle of plain tasks."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # the listing's dedup and split run as plain tasks: the default shuffle starts aggregator
    # actors, seconds per job, and they would compete with the model actors for CPUs
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"


def _ram_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20


def check_nodes(folder: Path, token: str, roots: list[str]) -> dict[str, str]:
    """Make sure every alive node sees the output folder (by its job token) and the inputs;
    InputError naming the first node that does not. Returns node id -> "IP (id)" names."""
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0)(node_check)
    probes = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
        str(folder), token, roots) for n in nodes]
    names = {}
    for node, ip, problems in ray.get(probes, timeout=300):
        names[node] = f"{ip} ({node[:8]})"
        if problems:
            raise InputError(f"node {names[node]}: {problems[0]}: every node needs the output folder and the "
                             "inputs at the same paths (a shared filesystem)")
    return names


def _pool_size(pool: PoolSpec) -> int:
    if pool.actors:
        return pool.actors
    resources = ray.cluster_resources()
    if pool.num_gpus_per_actor:
        return max(1, int(resources.get("GPU", 0) / pool.num_gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) / 2 / pool.cpus_per_actor))


def pipeline(todo: ray.data.Dataset, job: CorpusJob, shape: TableShape, token: str) -> ray.data.Dataset:
    """decode (tasks) -> ModelStage (actors) -> write (tasks): one summary row per part written."""
    pool = job.pool
    decoded = todo.map_batches(
        decode, batch_format="pyarrow", batch_size=pool.decode_batch, num_cpus=pool.cpus_per_decode,
        memory=(DECODE_MEMORY_MB + 8 * pool.decode_batch) << 20, fn_kwargs={"sample_rate": shape.sample_rate},
        compute=ray.data.TaskPoolStrategy(size=pool.decode_tasks) if pool.decode_tasks else None)
    threads = max(1, int(pool.cpus_per_actor))
    tagged = decoded.map_batches(
        ModelStage, batch_format="pyarrow", batch_size=pool.batch_size, num_cpus=pool.cpus_per_actor,
        num_gpus=pool.num_gpus_per_actor or None,
        memory=max(ACTOR_MEMORY_MB, DECODE_MEMORY_MB + 8 * pool.decode_batch + 1) << 20,
        compute=ray.data.ActorPoolStrategy(size=_pool_size(pool)),
        fn_constructor_kwargs={"spec": job.model, "columns": job.columns, "shape": shape,
                               "batch_size": pool.batch_size, "gpu": pool.num_gpus_per_actor > 0,
                               "threads": threads})
    return tagged.map_batches(write, batch_format="pyarrow", batch_size=pool.rows_per_part, num_cpus=0.1,
                              fn_kwargs={"folder": str(job.output), "token": token,
                                         "schema": shape.schema(job.columns)})


def plan(job: CorpusJob, resumed: bool) -> tuple[ray.data.Dataset, int]:
    """The files left to process, materialized in Ray's object store (not on the driver), in
    blocks that spread over the cluster, and their number."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    rows, may_repeat = listing(job.inputs)
    done = [str(p) for p in part_files(job.output)] if resumed else None
    todo = to_process(rows, may_repeat, done, partitions=max(2, min(256, 2 * cpus))).materialize()
    total = todo.count()
    if total:  # split now, before the model actors hold CPUs that Ray Data's split tasks would wait for
        blocks = min(math.ceil(total / job.pool.decode_batch), max(4 * cpus, math.ceil(total / 1000)))
        todo = todo.repartition(max(1, blocks)).materialize()
    return todo, total


def drive(ds: ray.data.Dataset, stats: RunStats, job: CorpusJob, stop: StopSignals,
          on_error: Callable[[str], None]) -> None:
    """Run the pipeline, counting its summary rows into `stats` with a progress bar on stderr."""
    with tqdm(total=stats.todo, unit="file", desc="corpus", disable=not job.progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        rows = iter(ds.iter_rows())
        try:
            for row in rows:
                with stop.deferred():
                    stats.add(row)
                    for message in row["errors"]:
                        on_error(message)
                    bar.update(row["rows"])
                    bar.set_postfix(failed=stats.failed, refresh=False)
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()


def _settings(job: CorpusJob, identity: dict[str, Any], shape: TableShape) -> dict[str, Any]:
    return {"model": identity, "columns": asdict(job.columns), "sample_rate": shape.sample_rate}


def _check_resume(job: CorpusJob, settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The earlier manifest of a resumed table; InputError if it was written with other settings."""
    earlier = read_manifest(job.output) if job.output.is_dir() else None
    if earlier is None:
        if job.output.is_dir() and part_files(job.output):
            raise InputError(f"{job.output}: holds part files but no manifest.json: not a table this command wrote")
        return None
    old = earlier.get("settings", {})
    differ = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
    if differ:
        raise InputError(f"{job.output}: --resume with other settings than the table's ({', '.join(differ)} "
                         f"differ: the table has {json.dumps({k: old.get(k) for k in differ})[:300]})")
    return earlier


def _manifest(job: CorpusJob, settings: dict[str, Any], shape: TableShape, earlier: Optional[dict[str, Any]],
              status: str, run: dict[str, Any]) -> dict[str, Any]:
    runs = (earlier or {}).get("runs", [])
    return {"status": status, "settings": settings, "counts": table_counts(job.output),
            "parts": len(part_files(job.output)), "code": {
                "version": code_version(), "python": sys.version.split()[0], "torch": torch.__version__,
                "ray": ray.__version__, "pyarrow": pyarrow.__version__},
            "runs": runs + [run], "class_names": list(shape.class_names),
            "class_ids": list(shape.class_ids) if shape.class_ids else None}


def run_corpus(job: CorpusJob, on_error: Callable[[str], None] = lambda message: None) -> tuple[RunStats, dict]:
    """Run `job` (see the module doc) and return what this run did and the final manifest.
    Bad input (flags, model, inputs, a refused output folder, a node that cannot see the folder)
    is an InputError before anything is written."""
    with as_input_error():  # an unknown model name, a checkpoint that does not load
        tagger = resolve_tagger(job.model)
    shape = table_shape(tagger)
    settings = _settings(job, model_identity(job.model, tagger), shape)
    del tagger
    earlier = _check_resume(job, settings) if job.resume else None
    token = claim_folder(job.output, job.resume)
    before = table_counts(job.output)
    run: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "address": job.cluster.address,
                           "argv": sys.argv[1:]}
    write_manifest(job.output, _manifest(job, settings, shape, earlier, "running", run))
    stats, stop, status = RunStats(), StopSignals(error=Stopped), "failed"
    started = time.time()
    with stop.installed():
        try:
            _run(job, shape, token, stats, stop, on_error)
            status = "complete"
        except Stopped:
            stats.signum, status = stop.signum, "interrupted"
        finally:
            stop.hold()
            stats.seconds = time.time() - started
            after = table_counts(job.output)  # the table is the truth: parts written but not yet reported count
            stats.files, stats.failed = after["rows"] - before["rows"], after["failed"] - before["failed"]
            run.update(stats.record(), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            manifest = _manifest(job, settings, shape, earlier, status, run)
            write_manifest(job.output, manifest)
            unlock_folder(job.output)
    return stats, manifest


def _run(job: CorpusJob, shape: TableShape, token: str, stats: RunStats, stop: StopSignals,
         on_error: Callable[[str], None]) -> None:
    try:
        with ray_session(job.cluster):
            stats.node_names = check_nodes(job.output, token, job.inputs.roots())
            todo, stats.todo = plan(job, job.resume)
            if stats.todo:
                drive(pipeline(todo, job, shape, token), stats, job, stop, on_error)
    except ray.exceptions.RayError as e:
        raise JobFailed(e) from e
    finally:
        if job.cluster.address is None:  # every worker stopped with Ray: what a stopped write left is garbage
            for tmp in job.output.glob(f".{PART_PREFIX}*.{TEMP_TAG}-*.tmp"):
                tmp.unlink(missing_ok=True)
