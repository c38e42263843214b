"""AudioSet training speed, split so that one sees which side limits: mp3 decoding (clips/s for
one DataLoader worker, i.e. one core), the model alone (training and inference samples/s on
waveforms already on the device), and `ex_audioset.py --train` end to end (samples/s of one
epoch: loader workers, transfer, frontend, model, optimizer), all on generated 10-s mp3 clips.

    python benchmarks/bench_audioset.py --cuda --precision fp16 --batch_size 128 --workers 14 \\
        --models mn04_as mn10_as mn40_as dymn10_as --clips 2048
    python benchmarks/bench_audioset.py --clips 32 --batch_size 8 --steps 3 --workers 1   # CPU

Model timings use random weights (no download) and the training step of ex_audioset.py: train-mode
frontend, mixup, label + distillation loss, backward and Adam step (fused on CUDA) through
`Precision`. --compile, --channels_last and --cudnn_benchmark apply to the model timings and the
end-to-end run alike.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ex_audioset  # noqa: E402
from datasets.audioset import (BALANCED_FILE, EVAL_FILE, NUM_CLASSES, AudioSetDataset,  # noqa: E402
                               TeacherPredictions)
from datasets.hdf5 import Mp3HDF5Writer, encode_mp3, pack_targets  # noqa: E402
from datasets.items import IndexedClip  # noqa: E402
from helpers.training.config import SpeedConfig  # noqa: E402
from helpers.training.evaluation import mel  # noqa: E402
from helpers.training.loop import train_step  # noqa: E402
from helpers.training.precision import Precision  # noqa: E402
from helpers.training.schedule import make_optimizer  # noqa: E402
from models.factory import create_model  # noqa: E402
from models.preprocess import AugmentMelSTFT  # noqa: E402

CLIP_SAMPLES = 320000


def write_clips(path: Path, names: list[str], rng: np.random.Generator) -> None:
    """An AudioSet-layout mp3 HDF5 file of 10-s clips (noise plus a tone, three random labels)."""
    t = np.arange(CLIP_SAMPLES) / 32000
    with Mp3HDF5Writer(path, target_width=(NUM_CLASSES + 7) // 8) as w:
        for name in names:
            x = 0.1 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * rng.uniform(100, 8000) * t)
            y = np.zeros(NUM_CLASSES)
            y[rng.integers(NUM_CLASSES, size=3)] = 1
            w.append(f"Y{name}.mp3", encode_mp3(x.astype(np.float32)), pack_targets(y))


def make_dataset(root: Path, clips: int) -> Path:
    """Balanced training file with `clips` clips, a small evaluation file, teacher logits."""
    rng = np.random.default_rng(0)
    names = [f"{i:011d}" for i in range(clips)]
    write_clips(root / BALANCED_FILE, names, rng)
    write_clips(root / EVAL_FILE, [f"e{i:010d}" for i in range(2)], rng)
    np.save(root / "teacher.npy", rng.standard_normal((clips, NUM_CLASSES)).astype(np.float32))
    with open(root / "index.pkl", "wb") as f:
        pickle.dump({name: i for i, name in enumerate(names)}, f)
    return root


def best_rate(fn: Callable[[], None], items: int, repeats: int, sync: Callable[[], None]) -> float:
    """items / best wall time of `repeats` calls of fn (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return items / best


def bench_decode(path: Path, resample_rate: int, repeats: int) -> float:
    """Clips/s of AudioSetDataset items (HDF5 read, decode, pad, decimate) in this process."""
    ds = AudioSetDataset([path], resample_rate=resample_rate)

    def read_all() -> None:
        for i in range(len(ds)):
            ds[i]
    return best_rate(read_all, len(ds), repeats, lambda: None)


def bench_model(name: str, data: Path, args: argparse.Namespace, device: torch.device,
                precision_name: str) -> dict[str, float]:
    """Training and inference samples/s of model `name` (random weights) with its frontend: the
    training step is ex_audioset.py's (`helpers.training.loop.train_step` with the distillation
    loss and mixup) on waveforms already on the device."""
    torch.manual_seed(0)
    speed = SpeedConfig(args.compile, args.channels_last, args.cudnn_benchmark)
    model = speed.apply(create_model(name, pretrained=False).to(device))
    frontend = AugmentMelSTFT().to(device)
    optimizer = make_optimizer(model, 1e-4, fused=device.type == "cuda")
    precision = Precision(precision_name, device)
    teacher = TeacherPredictions(data / "teacher.npy", data / "index.pkl")
    loss_fn = ex_audioset.distillation_loss_fn(0.3, 0.1, teacher)
    n = args.batch_size
    batch = IndexedClip(0.1 * torch.randn(n, 1, CLIP_SAMPLES, device=device), [f"{i:011d}" for i in range(n)],
                        (torch.rand(n, NUM_CLASSES, device=device) < 0.01).float(), torch.arange(n))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def train_steps() -> None:
        model.train()
        frontend.train()
        for _ in range(args.steps):
            train_step(model, frontend, batch, optimizer, loss_fn, precision, device)

    @torch.no_grad()
    def infer_steps() -> None:
        model.eval()
        frontend.eval()
        for _ in range(args.steps):
            with precision.autocast():
                model(mel(frontend, batch.waveform))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = {"train": best_rate(train_steps, args.steps * n, 2, sync)}
    if device.type == "cuda":
        result["train_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["infer"] = best_rate(infer_steps, args.steps * n, 2, sync)
    return result


def bench_end_to_end(data: Path, model: str, args: argparse.Namespace, precision: str) -> float:
    """Samples/s of the training pass of one `ex_audioset.py --train` epoch over all generated
    clips (its logged train_seconds: loader start-up included, evaluation and checkpoints not)."""
    out_dir = data / f"run_{model}"
    argv = ["--train", "--dataset_dir", str(data), "--balanced_only", "--model_name", model,
            "--n_epochs", "1", "--epoch_len", str(args.clips), "--batch_size", str(args.batch_size),
            "--num_workers", str(args.workers), "--teacher_preds", str(data / "teacher.npy"),
            "--fname_to_index", str(data / "index.pkl"), "--logger", "none", "--out_dir", str(out_dir),
            "--precision", precision]
    argv += [f"--{flag}" for flag in ("cuda", "compile", "channels_last", "cudnn_benchmark")
             if getattr(args, flag)]
    log = io.StringIO()  # the script's own progress and results, shown if it fails
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ex_audioset.main(argv)
    except BaseException:
        print(log.getvalue(), file=sys.stderr)
        raise
    epoch = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return args.clips / epoch["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="model and end-to-end timings on the GPU")
    parser.add_argument("--models", nargs="+", default=["mn04_as", "mn10_as"], help="registry names")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                        help="autocast precision (default fp16 on the GPU, fp32 on the CPU)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model and mode")
    parser.add_argument("--clips", type=int, default=40, help="generated 10-s clips (decode, end to end)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers end to end")
    parser.add_argument("--repeats", type=int, default=3, help="decode timing: best of this many passes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--cudnn_benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--channels_last", action="store_true", help="channels-last models")
    parser.add_argument("--skip", nargs="*", default=[], choices=("decode", "model", "end_to_end"))
    args = parser.parse_args()
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda: no CUDA device")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda else "cpu")
    precision = args.precision or ("fp16" if args.cuda else "fp32")
    name = torch.cuda.get_device_name(device) if args.cuda else f"CPU, {args.threads} threads"
    options = [flag for flag in ("compile", "channels_last", "cudnn_benchmark") if getattr(args, flag)]
    print(f"{name}; torch {torch.__version__}, CUDA {torch.version.cuda}; {precision}, "
          f"batch {args.batch_size}, options: {', '.join(options) or 'none'}")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp), args.clips)
        if "decode" not in args.skip:
            for rate in (32000, 16000):
                rate_clips = bench_decode(data / BALANCED_FILE, rate, args.repeats)
                print(f"decode + pad to 10 s + resample to {rate} Hz: {rate_clips:.1f} clips/s per worker")
        if "model" not in args.skip:
            for model in args.models:
                r = bench_model(model, data, args, device, precision)
                memory = f", training peak memory {r['train_peak_gib']:.1f} GiB" if "train_peak_gib" in r else ""
                print(f"{model}: training {r['train']:.1f} samples/s, inference {r['infer']:.1f} "
                      f"clips/s{memory}")
        if "end_to_end" not in args.skip:
            for model in args.models:
                rate = bench_end_to_end(data, model, args, precision)
                print(f"{model}: ex_audioset.py --train end to end {rate:.1f} samples/s "
                      f"({args.workers} workers, {args.clips} clips)")


if __name__ == "__main__":
    main()
