"""Inference speed: ms per 10-s clip (frontend + model, eval, no grad) for mn04 and mn10 at batch
sizes 1 and 16 on this machine's CPU (or GPU with --cuda), and the wall time of one whole
`inference.py` run on one clip (process start, model load, audio load, tagging).

    python benchmarks/bench_inference.py [--cuda] [--repeats 5]

Random weights are used for the per-clip timings (speed does not depend on the weights, and no
download is needed); the CLI timing needs mn04_as in the checkpoint cache.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.mn.model import get_model  # noqa: E402
from models.preprocess import AugmentMelSTFT  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--cuda", action="store_true")
parser.add_argument("--repeats", type=int, default=10)
args = parser.parse_args()
device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

frontend = AugmentMelSTFT().eval().to(device)
for name, width in (("mn04", 0.4), ("mn10", 1.0)):
    model = get_model(width_mult=width).eval().to(device)
    for batch in (1, 16):
        x = torch.randn(batch, 320000, device=device) * 0.1
        with torch.no_grad():
            for _ in range(3):  # warm-up
                model(frontend(x).unsqueeze(1))
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(frontend(x).unsqueeze(1))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        best = min(times)
        print(f"{name} batch {batch:2d}: {1000 * best / batch:7.1f} ms per 10-s clip "
              f"({batch / best:6.1f} clips/s, best of {args.repeats})")

repo = Path(__file__).resolve().parent.parent
clip = repo / "resources" / "demo_bells.wav"
start = time.perf_counter()
result = subprocess.run([sys.executable, "inference.py", "--model_name", "mn04_as", "--audio_path", str(clip)],
                        cwd=repo, capture_output=True, text=True)
wall = time.perf_counter() - start
status = "ok" if result.returncode == 0 else f"failed: {result.stderr.strip()}"
print(f"inference.py --model_name mn04_as on {clip.name} (6 s): {wall:.2f} s wall ({status})")
