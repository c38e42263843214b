"""Latency, CPU share and memory of live tagging: a file fed through a pipe in real time.

    python benchmarks/bench_stream.py                                   # mn04_as and mn10_as, hop 1 s and 0.25 s
    python benchmarks/bench_stream.py --models mn04_as --hops 1 --seconds 120

For each model and hop, starts `windowed_inference.py --audio_path - --raw s16le --input_rate 32000
--top_k 1` and writes 32-kHz 16-bit mono PCM into its standard input at the pace of real time (10-ms
writes). A window's line is due when the window's last sample has been written; its latency is the
time from that write to the moment its "Window:" line is read from the program's stdout. Printed:
latency p50/p95/max over the windows after the first, the program's CPU time (all its threads) over
the steady part of the run as a share of one core, and its peak resident memory. The audio is
../shared/audio/metro_station-paris.wav repeated (or noise with tone bursts where that is absent).
A model whose checkpoint is not in the cache (offline: mn10_as) runs with random weights, which cost
the same to compute; the table says so. The machine's other load shows in every figure.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from datasets.audio import load_audio  # noqa: E402
from models.pretrained import get_entry  # noqa: E402

SHARED = Path(os.environ.get("EFFICIENTAT_SHARED", REPO.parent / "shared"))
RATE = 32000
CHILD = ("import functools, sys; sys.path.insert(0, {repo!r}); import helpers.inference.tagging as t; "
         "from models.factory import create_model; t.create_model = functools.partial(create_model, pretrained=False); "
         "import windowed_inference as w; from common.errors import run_cli; sys.exit(run_cli(lambda: w.main(sys.argv[1:])))")


def audio(seconds: float) -> np.ndarray:
    """`seconds` of int16 audio: the metro recording repeated, or noise with a tone every 5 s."""
    metro = SHARED / "audio" / "metro_station-paris.wav"
    if metro.exists():
        clip = load_audio(metro, RATE)
    else:
        t = np.arange(5 * RATE) / RATE
        clip = (0.05 * np.random.default_rng(0).standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * 880 * t) * (t < 1))
    samples = np.resize(clip.astype(np.float32), int(seconds * RATE))
    return (np.clip(samples, -1, 1) * 32767).astype("<i2")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def model_dir() -> tuple[str, set[str]]:
    """A cache with the checkpoints and label table at hand, and the checkpoint files in it."""
    cache = Path(os.environ.get("EFFICIENTAT_MODEL_DIR") or REPO / "resources")
    if not (cache / "class_labels_indices.csv").exists() and SHARED.exists():
        cache = Path(tempfile.mkdtemp(prefix="bench_stream_"))
        for sub in ("weights", "metadata"):
            for f in (SHARED / sub).glob("*"):
                shutil.copy(f, cache / f.name)
    return str(cache), {f.name for f in cache.glob("*.pt")}


def run_one(model: str, hop: float, window: float, pcm: np.ndarray, env: dict, random_weights: bool) -> dict:
    cmd = ["--model", model, "--audio_path", "-", "--raw", "s16le", "--input_rate", str(RATE), "--top_k", "1",
           "--window_length", str(window), "--hop_length", str(hop)]
    child = [sys.executable, "-c", CHILD.format(repo=str(REPO)), *cmd] if random_weights else \
        [sys.executable, str(REPO / "windowed_inference.py"), *cmd]
    proc = subprocess.Popen(child, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, cwd=REPO)
    lines: list[tuple[float, float]] = []  # (window end in s, time read)

    def read() -> None:
        for line in proc.stdout:
            m = re.match(rb"Window: ([\d.]+) - ([\d.]+)", line)
            if m:
                lines.append((float(m.group(2)), time.perf_counter()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    chunk = RATE // 100
    written, sent = [], 0
    start = time.perf_counter()
    cpu_first = t_first = None
    while sent < len(pcm):
        due = start + sent / RATE
        time.sleep(max(0.0, due - time.perf_counter()))
        proc.stdin.write(pcm[sent:sent + chunk].tobytes())
        proc.stdin.flush()
        sent += len(pcm[sent:sent + chunk])
        written.append((sent, time.perf_counter()))
        if cpu_first is None and lines:
            cpu_first, t_first = cpu_seconds(proc.pid), time.perf_counter()
    cpu_last, t_last = cpu_seconds(proc.pid), time.perf_counter()
    proc.stdin.close()
    _, status, usage = os.wait4(proc.pid, 0)
    reader.join(timeout=10)
    ends = np.array([n for n, _ in written])
    times = np.array([t for _, t in written])
    latency = [t - times[min(np.searchsorted(ends, round(end * RATE)), len(ends) - 1)]
               for end, t in lines[1:] if round(end * RATE) <= ends[-1] and t <= t_last]
    return {"model": model + (" (random weights)" if random_weights else ""), "hop": hop, "windows": len(latency),
            "p50": np.percentile(latency, 50), "p95": np.percentile(latency, 95), "max": max(latency),
            "cpu": 100 * (cpu_last - cpu_first) / (t_last - t_first), "rss": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mn04_as", "mn10_as"])
    parser.add_argument("--hops", nargs="+", type=float, default=[1.0, 0.25])
    parser.add_argument("--window_length", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio fed per run, in real time")
    args = parser.parse_args()
    cache, checkpoints = model_dir()
    env = {**os.environ, "EFFICIENTAT_MODEL_DIR": cache}
    pcm = audio(args.seconds)
    print(f"{args.seconds:g} s fed in real time per run, window {args.window_length:g} s; "
          f"load average {os.getloadavg()[0]:.1f} at start ({os.cpu_count()} cores)")
    print(f"{'model':32s} {'hop s':>6s} {'windows':>7s} {'p50 s':>7s} {'p95 s':>7s} {'max s':>7s} "
          f"{'CPU % of a core':>15s} {'peak RSS MiB':>12s}")
    for model in args.models:
        random_weights = get_entry(model).filename not in checkpoints
        for hop in args.hops:
            r = run_one(model, hop, args.window_length, pcm, env, random_weights)
            print(f"{r['model']:32s} {r['hop']:6g} {r['windows']:7d} {r['p50']:7.3f} {r['p95']:7.3f} {r['max']:7.3f} "
                  f"{r['cpu']:15.1f} {r['rss']:12.0f}", flush=True)


if __name__ == "__main__":
    main()
