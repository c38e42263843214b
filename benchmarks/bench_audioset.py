"""AudioSet pipeline speed on this machine: mp3-HDF5 decoding (+ padding and decimation) in clips
per second for one DataLoader worker, and training throughput (frontend, forward, backward, Adam
step with the distillation loss) in samples per second for mn04 and mn10 on the CPU.

    python benchmarks/bench_audioset.py --clips 40 --batch_size 16 --steps 5

Clips are generated 10-s signals encoded as 32 kHz mp3, the same kind of rows the real files hold.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.audioset import NUM_CLASSES, AudioSetDataset  # noqa: E402
from datasets.hdf5 import Mp3HDF5Writer, encode_mp3, pack_targets  # noqa: E402
from ex_audioset import distillation_loss  # noqa: E402
from helpers.training.evaluation import mel  # noqa: E402
from helpers.training.mixup import mix, mixup  # noqa: E402
from models.mn.model import get_model  # noqa: E402
from models.preprocess import AugmentMelSTFT  # noqa: E402


def make_file(path: Path, clips: int) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(320000) / 32000
    with Mp3HDF5Writer(path, target_width=66) as w:
        for i in range(clips):
            x = 0.1 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * rng.uniform(100, 8000) * t)
            y = np.zeros(NUM_CLASSES)
            y[rng.integers(NUM_CLASSES, size=3)] = 1
            w.append(f"Y{i:011d}.mp3", encode_mp3(x.astype(np.float32)), pack_targets(y))


def bench_decode(path: Path, resample_rate: int) -> float:
    ds = AudioSetDataset([path], resample_rate=resample_rate)
    ds[0]  # open the file
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(ds) / (time.perf_counter() - start)


def bench_train(width: float, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    model = get_model(width_mult=width).train()
    frontend = AugmentMelSTFT(freqm=0, timem=0).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    waves = 0.1 * torch.randn(batch_size, 1, 320000)
    y = (torch.rand(batch_size, NUM_CLASSES) < 0.01).float()
    teacher = torch.rand(batch_size, NUM_CLASSES)
    known = torch.ones(batch_size)

    def step() -> None:
        x = mel(frontend, waves)
        perm, lam = mixup(batch_size, 0.3)
        logits = model(mix(x, perm, lam))[0]
        loss = 0.1 * F.binary_cross_entropy_with_logits(logits, mix(y, perm, lam)) + \
            0.9 * distillation_loss(logits, teacher, known, perm, lam)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=40, help="10-s clips to decode")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_mp3.hdf"
        make_file(path, args.clips)
        for rate in (32000, 16000):
            print(f"decode + pad to 10 s + resample to {rate} Hz: {bench_decode(path, rate):.1f} "
                  "clips/s per worker")
    for name, width in (("mn04", 0.4), ("mn10", 1.0)):
        print(f"train {name} (10-s clips, batch {args.batch_size}, fp32, KD + mixup): "
              f"{bench_train(width, args.batch_size, args.steps):.2f} samples/s")


if __name__ == "__main__":
    main()
