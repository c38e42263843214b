"""Inference speed on the CPU: ms per 10-s clip and clips/s (frontend + model, eval, no grad) for
mn04, mn10 and dymn10 at batch sizes 1 and 16, for
  plain      the eval-mode model and AugmentMelSTFT (float32), in a process of its own with the
             default allocator: the original's code path and conditions,
  fast       for_inference(model) and FastMelFrontend (float32), the default of every command,
  bf16       for_inference(model, "bf16") (only on CPUs with native bfloat16),
  ort        the exported ONNX graph with its frontend, onnxruntime, float32,
  ort-int8   the same graph statically quantized to int8 (calibrated on the demo clip),
next to this machine's measured float32 / bfloat16 matrix-multiplication rate and the share of it
each run reaches (2 x the model's MACs per clip / time; the frontend's work is not counted). Then the
wall time of one whole `inference.py` run on one clip.

    python benchmarks/bench_inference.py [--threads 2] [--rounds 10] [--models mn04 mn10 dymn10]

Two worker processes hold the models: one the plain path, one the others (the fast path changes
the process's allocator settings, `models.fast.keep_freed_memory`, which would speed up the plain
model too). The coordinator asks them for one turn at a time (the best of `--repeats` back-to-back
calls), alternating variants round by round, so that both see the same machine; each figure is the
best turn, and the spread (median / best) is printed so that noise from other jobs on the machine
shows. Random weights
(speed does not depend on them); the CLI timing needs mn04_as in the checkpoint cache.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from datasets.audio import load_audio  # noqa: E402
from helpers.analysis.complexity import count_macs  # noqa: E402
from helpers.analysis.trace import trace_model  # noqa: E402
from helpers.inference.onnx_export import export_onnx, quantize_onnx  # noqa: E402
from models.factory import create_frontend, create_model  # noqa: E402
from models.fast import bf16_supported  # noqa: E402
from models.frontend_twins import FastMelFrontend  # noqa: E402
from models.runtime import for_inference  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODELS = {"mn04": "mn04_as", "mn10": "mn10_as", "dymn10": "dymn10_as"}
CLIP_SAMPLES = 320000
WORKER_VARIANTS = {"plain": ["plain"], "fast": ["fast", "bf16", "ort", "ort-int8"]}


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of a size x size matrix product in `dtype` on this CPU."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(_time(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def variants(kind: str, name: str, batch: int, tmp: Path, threads: int) -> dict[str, Callable[[], object]]:
    """label -> one timed call (frontend + model on `batch` 10-s clips) for a worker of `kind`."""
    model = create_model(MODELS[name], pretrained=False).eval()
    frontend = create_frontend(MODELS[name])
    x = torch.randn(batch, CLIP_SAMPLES) * 0.1
    if kind == "plain":
        return {"plain": lambda: model(frontend(x).unsqueeze(1))}
    import onnxruntime

    fast, fast_frontend = for_inference(model), FastMelFrontend(frontend)
    runs = {"fast": lambda: fast(fast_frontend(x).unsqueeze(1))}
    if bf16_supported():
        fast_bf16 = for_inference(model, "bf16")
        runs["bf16"] = lambda: fast_bf16(fast_frontend(x).unsqueeze(1))
    path = tmp / f"{name}.onnx"
    if not path.exists():
        export_onnx(model, path, frontend)
        calibration = [load_audio(REPO / "resources" / "demo_bells.wav")[None]]
        quantize_onnx(path, tmp / f"{name}_int8.onnx", calibration)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # idle onnxruntime threads would otherwise spin on the cores the PyTorch runs timed next need
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for label, file in (("ort", path), ("ort-int8", tmp / f"{name}_int8.onnx")):
        session = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        feed = {"waveform": x.numpy()}
        runs[label] = lambda session=session, feed=feed: session.run(None, feed)
    return runs


def worker(kind: str, threads: int, repeats: int) -> None:
    """Serve timing requests on stdin ({"model", "batch", "variant"} per line) with one line of
    JSON each: {"seconds": best of `repeats` back-to-back calls}, or {"missing": true} for a variant
    this worker cannot run."""
    torch.set_num_threads(threads)
    built: dict[tuple[str, int], dict[str, Callable[[], object]]] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for line in sys.stdin:
            request = json.loads(line)
            key = (request["model"], request["batch"])
            if key not in built:
                built.clear()  # one model and batch size at a time: memory stays bounded
                built[key] = variants(kind, *key, Path(tmp), threads)
                for run in built[key].values():  # warm-up: first calls allocate and pick kernels
                    run()
                    run()
            run = built[key].get(request["variant"])
            answer = {"missing": True} if run is None else {"seconds": min(_time(run) for _ in range(repeats))}
            print(json.dumps(answer), flush=True)


class Workers:
    """One worker process per kind of variant, asked in turn for one timing each."""

    def __init__(self, threads: int, repeats: int) -> None:
        self.processes = {kind: subprocess.Popen([sys.executable, __file__, "--worker", kind, "--threads",
                                                  str(threads), "--repeats", str(repeats)],
                                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                          for kind in WORKER_VARIANTS}

    def ask(self, kind: str, name: str, batch: int, variant: str) -> float | None:
        """Seconds of one call of `variant` on `batch` clips (None: the worker cannot run it)."""
        process = self.processes[kind]
        process.stdin.write(json.dumps({"model": name, "batch": batch, "variant": variant}) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {kind} worker stopped (exit code {process.wait()})")
        return json.loads(line).get("seconds")

    def close(self) -> None:
        for process in self.processes.values():
            process.stdin.close()
            process.wait()


def measure(workers: Workers, name: str, batch: int, rounds: int, flops: float, rates: dict[str, float]) -> None:
    """Print each variant's best time per clip for `name` at `batch`, the variants taking turns."""
    labels = [(kind, v) for kind, vs in WORKER_VARIANTS.items() for v in vs
              if workers.ask(kind, name, batch, v) is not None]  # builds, warms up, drops missing ones
    times: dict[str, list[float]] = {v: [] for _, v in labels}
    for _ in range(rounds):
        for kind, label in labels:
            times[label].append(workers.ask(kind, name, batch, label) / batch)
    plain = min(times["plain"])
    for label, ts in times.items():
        best = min(ts)
        rate = rates["bf16" if label == "bf16" else "fp32"]
        print(f"{name:6s} batch {batch:2d} {label:8s} {1000 * best:8.2f} ms/clip {1 / best:7.1f} clips/s "
              f"x{plain / best:5.2f} vs plain  {100 * flops / best / 1e9 / rate:5.1f} % of {rate:.0f} "
              f"GFLOP/s  (median/best {statistics.median(ts) / best:.2f})", flush=True)


def time_inference_command() -> None:
    """Print the warm wall time of one inference.py run on the demo clip."""
    clip = REPO / "resources" / "demo_bells.wav"
    command = [sys.executable, "inference.py", "--model_name", "mn04_as", "--audio_path", str(clip)]
    subprocess.run(command, cwd=REPO, capture_output=True)  # warm: checkpoint cached, files in the page cache
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"inference.py not timed: it exited with {done.returncode} ({last})")
    else:
        print(f"inference.py --model_name mn04_as on {clip.name} (6 s), warm: {wall:.2f} s wall")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3,
                        help="back-to-back calls per turn (the first after the other worker's turn "
                             "finds cold caches and sleeping threads)")
    parser.add_argument("--worker", choices=list(WORKER_VARIANTS), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args.worker, args.threads, args.repeats)
    torch.set_num_threads(args.threads)
    rates = {"fp32": matmul_rate(torch.float32)}
    if bf16_supported():
        rates["bf16"] = matmul_rate(torch.bfloat16)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16: {bf16_supported()}; matrix product "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()))
    workers = Workers(args.threads, args.repeats)
    try:
        for name in args.models:
            flops = 2 * count_macs(trace_model(create_model(MODELS[name], pretrained=False))).total
            for batch in args.batches:
                measure(workers, name, batch, args.rounds, flops, rates)
    finally:
        workers.close()
    if not bf16_supported():
        print("bf16 not measured: this CPU has no native bfloat16")
    time_inference_command()


if __name__ == "__main__":
    main()
