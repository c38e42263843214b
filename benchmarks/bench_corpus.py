"""The corpus job's speed (docs/corpus.md quotes every figure this prints):

1. files/s on `--clips` generated 10-s clips (default 2,000), the same folder through
   single-process `inference.py` (its default threads, and one torch thread) and through `corpus.py` on the embedded Ray (this machine's cores,
   default flags): whole-command wall time (Ray's start-up included) and the job's own throughput
   (manifest.json's files_per_second, from the first file listed to the last part written), and the
   ratio corpus / inference.py of each round: the overhead (or gain) of the engine;
2. decode vs model seconds per clip on one core: the project's loader (decode + resample to 32
   kHz, `read_or_chunk`, as the job's decode tasks run it) for a 32-kHz WAV and a 44.1-kHz FLAC,
   and the model (fast path: FastMelFrontend + for_inference, batch 16) for mn04 (the released
   weights) and mn10 (random weights: speed does not depend on them), next to the per-clip decode
   and model seconds the Ray job itself measured: which resource a cluster should add.

    nice -n 10 python benchmarks/bench_corpus.py [--clips 2000] [--rounds 2] [--model_name mn04_as]

Every figure is printed with the load average (`uptime`) at its start: the machine may be shared.
The commands alternate round by round, so both see the same machine; compare their ratios. Needs
mn04_as in the checkpoint cache (or $EFFICIENTAT_SHARED/weights) and ray[data]
(requirements-corpus.txt). `--device cuda` times the model on a GPU (run it on a GPU node to fill
docs/corpus.md's GPU rows).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers.inference.batching import read_or_chunk  # noqa: E402
from models.factory import create_frontend, create_model  # noqa: E402
from models.frontend_twins import FastMelFrontend  # noqa: E402
from models.runtime import for_inference  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECONDS = 10.0


def load() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return "load %.2f %.2f %.2f" % os.getloadavg()


def write_clips(folder: Path, count: int, sample_rate: int, suffix: str, seed: int = 0) -> list[Path]:
    """`count` 10-s clips (tones over noise, each different) at `sample_rate`."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SECONDS * sample_rate)) / sample_rate
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(200, 4000) * t) + 0.05 * rng.standard_normal(len(t))
        path = folder / f"clip{i:05d}{suffix}"
        sf.write(path, wave.astype(np.float32), sample_rate)
        paths.append(path)
    return paths


def run_command(argv: list[str], **env: str) -> float:
    """Wall seconds of one command (its output discarded; its exit code must be 0), with `env`
    added to this process's environment."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return time.perf_counter() - start


def end_to_end(folder: Path, clips: int, rounds: int, model: str, tmp: Path) -> dict:
    """Part 1: inference.py (its default torch threads, and one thread: OMP_NUM_THREADS=1, as
    each model actor of the job runs) and corpus.py on the same folder, in turn, `rounds` times."""
    print(f"\n1. {clips} 10-s clips ({folder.name}), {model}, {os.cpu_count()} CPU(s): files/s")
    job_rates = []
    tag = ["inference.py", "--model_name", model, "--audio_path", str(folder), "--output", str(tmp / "tags.json")]
    for r in range(rounds):
        where = load()
        single = run_command(tag)
        one_where = load()
        one = run_command(tag, OMP_NUM_THREADS="1")
        out = tmp / f"table{r}"
        job_where = load()
        job = run_command(["corpus.py", "--model_name", model, "--audio_path", str(folder), "--output", str(out),
                           "--quiet"])
        last = json.loads((out / "manifest.json").read_text())["runs"][-1]
        job_rates.append(last)
        print(f"   round {r + 1} ({where}): inference.py {clips / single:6.1f} files/s ({single:5.1f} s)\n"
              f"   round {r + 1} ({one_where}): inference.py, 1 thread {clips / one:6.1f} files/s ({one:5.1f} s)\n"
              f"   round {r + 1} ({job_where}): corpus.py {clips / job:6.1f} files/s ({job:5.1f} s; in the job "
              f"{last['files_per_second']:6.1f})\n"
              f"   round {r + 1}: ratio corpus / inference.py {single / job:.2f}, corpus / inference.py 1 thread "
              f"{one / job:.2f} (in the job: {last['files_per_second'] * single / clips:.2f}, "
              f"{last['files_per_second'] * one / clips:.2f})")
        shutil.rmtree(out)
    return min(job_rates, key=lambda run: run["seconds"])


def decode_seconds(paths: list[Path], repeats: int = 3) -> float:
    """Best per-clip seconds of the job's decode (read_or_chunk to 32 kHz) over `paths`."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for p in paths:
            read_or_chunk(p, 32000)
        best = min(best, (time.perf_counter() - start) / len(paths))
    return best


def model_seconds(name: str, device: str, batch: int = 16, repeats: int = 5) -> float:
    """Best per-clip seconds of the fast path (frontend + model) on a batch of 10-s clips."""
    model = for_inference(create_model(name, pretrained=name == "mn04_as").eval()).to(device)
    frontend = FastMelFrontend(create_frontend(name)).to(device)
    x = torch.randn(batch, int(SECONDS * 32000), device=device) * 0.1
    best = float("inf")
    with torch.no_grad():
        for i in range(repeats + 2):  # two warm-up calls
            start = time.perf_counter()
            model(frontend(x).unsqueeze(1))
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                best = min(best, (time.perf_counter() - start) / batch)
    return best


def per_clip(wav: list[Path], flac: list[Path], device: str, job: dict) -> None:
    """Part 2: decode vs model seconds per clip on one core (one torch thread)."""
    torch.set_num_threads(1)
    print(f"\n2. seconds per 10-s clip on one core (decode: {len(wav)} clips; model: batch 16, {device})")
    for label, paths in (("decode 32-kHz WAV", wav), ("decode 44.1-kHz FLAC + resample", flac)):
        where = load()
        print(f"   {label:34s} {decode_seconds(paths) * 1000:7.1f} ms   ({where})")
    for name in ("mn04_as", "mn10_as"):
        where = load()
        print(f"   model {name} fast path{'':15s} {model_seconds(name, device) * 1000:7.1f} ms   ({where})")
    print(f"   in the Ray job (its fastest round): decode {job['decode_seconds_per_file'] * 1000:.1f} ms, "
          f"model {job['model_seconds_per_file'] * 1000:.1f} ms per clip (stages run side by side on the cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model_name", default="mn04_as")
    parser.add_argument("--format", choices=("flac", "wav"), default="flac",
                        help="the end-to-end clips: 44.1-kHz FLAC (decoded and resampled) or 32-kHz WAV")
    parser.add_argument("--device", default="cpu", help="where part 2 times the model (cpu or cuda)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        tmp = Path(tmp)
        where = load()
        rate, suffix = (44100, ".flac") if args.format == "flac" else (32000, ".wav")
        write_clips(tmp / f"clips_{args.format}", args.clips, rate, suffix)
        print(f"wrote {args.clips} clips ({where})")
        job = end_to_end(tmp / f"clips_{args.format}", args.clips, args.rounds, args.model_name, tmp)
        wav = write_clips(tmp / "wav", 50, 32000, ".wav", seed=1)
        flac = write_clips(tmp / "flac", 50, 44100, ".flac", seed=1)
        per_clip(wav, flac, args.device, job)


if __name__ == "__main__":
    main()
