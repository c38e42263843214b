"""Fine-tuning speed on this machine: seconds per ESC-50 epoch (training on folds 2-5, then
evaluating fold 1, as `ex_esc50.py` runs it) for mn04 and mn10 on the CPU, without and with
--cache_path, plus the clip-reading rate behind the difference.

    python benchmarks/bench_finetune.py                      # ESC-50 size: 2,000 five-second clips
    python benchmarks/bench_finetune.py --clips 200          # a subset, scaled to 2,000 clips
    python benchmarks/bench_finetune.py --cuda --num_workers 8 --batch_size 128   # on a GPU

The set is generated first (tones and noise in the ESC-50 layout, written as wav at --source_rate,
44.1 kHz like the ESC-50 release, so every uncached read is resampled to 32 kHz). Each
configuration runs ex_esc50.py for --epochs epochs from scratch (speed does not depend on the
weights); the figures are those of the fastest epoch after the first (so with --cache_path every
counted epoch reads the cache the first one filled): wall-clock seconds, and the CPU seconds of
the training process, which other work on a shared machine inflates less (with the default
--num_workers 0 they include reading the clips). Per-epoch time grows linearly with the number of
clips, which is how a subset is scaled.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ex_esc50  # noqa: E402
from datasets import esc50  # noqa: E402
from models.pretrained import name_to_width  # noqa: E402
from tests.datagen import make_esc50  # noqa: E402

ESC50_CLIPS = 2000


def read_rate(dataset) -> float:
    """Clips per second of reading (decoding, resampling or cache lookup, padding) all items."""
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=ESC50_CLIPS, help="clips in the set (multiple of 10)")
    parser.add_argument("--models", nargs="+", default=["mn04", "mn10"])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_workers", type=int, default=0,
                        help="0: clips are read in the training process, between the batches")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per configuration (at least 2)")
    parser.add_argument("--source_rate", type=int, default=44100)
    parser.add_argument("--cuda", action="store_true", help="train on the GPU (CPU seconds then mean less)")
    parser.add_argument("--workdir", type=str, default=None, help="keep the generated set and runs here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)  # no per-epoch lines from the training loop
    scale = ESC50_CLIPS / args.clips
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch size {args.batch_size}, "
          f"{args.num_workers} loader workers, {args.clips} clips at {args.source_rate} Hz"
          + (f" (figures scaled x{scale:g} to {ESC50_CLIPS} clips)" if scale != 1 else ""))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        data = work / "ESC-50"
        if not (data / "meta" / "esc50.csv").is_file():
            started = time.perf_counter()
            make_esc50(data, clips_per_fold=args.clips // 5, seconds=5.0, sr=args.source_rate)
            print(f"generated the set in {time.perf_counter() - started:.0f} s")

        train, _, _ = esc50.get_datasets(data, fold=1)
        cached, _, _ = esc50.get_datasets(data, fold=1, cache_path=work / "read_cache")
        subset = min(len(train), 100)
        train.files, cached.files = train.files[:subset], cached.files[:subset]
        read_rate(cached)  # fill the cache
        decoded, from_cache = read_rate(train), read_rate(cached)
        print(f"reading clips: {decoded:.0f}/s decoded and resampled, {from_cache:.0f}/s from the cache "
              f"(one process): {ESC50_CLIPS / decoded:.1f} s and {ESC50_CLIPS / from_cache:.1f} s per "
              f"{ESC50_CLIPS} clips")

        print(f"{'model':6} {'cache':6} {'s/epoch':>8} {'train s':>8} {'eval s':>7} {'CPU s/epoch':>12}")
        for model in args.models:
            width = name_to_width(model)
            for use_cache in (False, True):
                out = work / f"run_{model}_{'cache' if use_cache else 'nocache'}"
                shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to
                argv = ["--dataset_dir", str(data), "--model_name", model, "--model_width", str(width),
                        "--n_epochs", str(args.epochs), "--batch_size", str(args.batch_size),
                        "--num_workers", str(args.num_workers), "--logger", "none", "--out_dir", str(out)]
                if use_cache:
                    argv += ["--cache_path", str(work / f"cache_{model}")]
                if args.cuda:
                    argv.append("--cuda")
                with contextlib.redirect_stdout(io.StringIO()):  # the script's own report
                    ex_esc50.main(argv)
                epochs = [json.loads(line) for line in (out / "fold1" / "metrics.jsonl").read_text().splitlines()]
                fastest = min(epochs[1:], key=lambda e: e["epoch_seconds"])
                total, trained = fastest["epoch_seconds"] * scale, fastest["train_seconds"] * scale
                print(f"{model:6} {'yes' if use_cache else 'no':6} {total:8.1f} {trained:8.1f} "
                      f"{total - trained:7.1f} {fastest['cpu_seconds'] * scale:12.1f}", flush=True)


if __name__ == "__main__":
    main()
