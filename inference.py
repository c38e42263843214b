"""Tag audio files with a pre-trained EfficientAT model (or an ensemble).

    python inference.py --model_name mn04_as --audio_path resources/demo_bells.wav
    python inference.py --model_name dymn10_as --audio_path clips/ more.mp3 --top_k 5 --output tags.json
    python inference.py --checkpoint runs/my_data/best.pt --audio_path new_clips/
    python inference.py --onnx mn10_as_int8.onnx --audio_path metro.wav      # exported with export_onnx.py

Each file is analyzed whole, in one pass, at 32 kHz mono. Files of equal length are batched.
Exit code: 0 all files tagged, 1 some files failed (the others are tagged), 2 nothing tagged
(bad arguments, unknown model, unreadable input).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from datasets.audio import find_audio_files
from common.errors import InputError, as_input_error, check_suffix, run_cli
from common.files import atomic_write, check_output
from helpers.inference.tagging import (Tagger, add_precision_arg, build_onnx_tagger, build_tagger, format_tags,
                                       run_on_files, select_device, top_k)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--audio_path", nargs="+", required=True, help="audio files and/or folders")
    parser.add_argument("--model_name", default="mn10_as", help="registry name, e.g. mn04_as, dymn10_as")
    parser.add_argument("--ensemble", nargs="+", default=None, help="several model names; averages logits")
    parser.add_argument("--checkpoint", default=None,
                        help="a checkpoint written by a training script (ex_*.py): tags with its own classes")
    parser.add_argument("--onnx", default=None,
                        help="tag with this model exported by export_onnx.py (float or int8), with onnxruntime")
    parser.add_argument("--cuda", action="store_true", help="run on GPU (fp16 autocast) if available")
    add_precision_arg(parser)
    parser.add_argument("--strides", nargs=4, type=int, default=None, help="MN/DyMN strides (default: registry)")
    parser.add_argument("--head_type", default=None, help="MN head (default: registry)")
    parser.add_argument("--sample_rate", type=int, default=None, help="(default: registry or checkpoint, 32000)")
    parser.add_argument("--window_size", type=int, default=None, help="STFT window in samples (default: registry)")
    parser.add_argument("--hop_size", type=int, default=None, help="STFT hop in samples (default: registry)")
    parser.add_argument("--n_mels", type=int, default=None, help="mel bands (default: registry)")
    parser.add_argument("--top_k", type=int, default=10, help="labels printed / written per file")
    parser.add_argument("--output", default=None, help="write results to a .json or .csv file")
    parser.add_argument("--all_classes", action="store_true", help="write every class's probability to --output")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="files of equal length run together (on the CPU's fast path a batch of 16 "
                             "costs 1.3-2.3x less per clip than one clip at a time)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise InputError("--top_k and --batch_size must be at least 1")
    check_suffix("--output", args.output, (".json", ".csv"))
    if args.output:
        check_output(args.output, "--output")
    if args.onnx and (args.ensemble or args.checkpoint or args.cuda or args.precision != "fp32"):
        raise InputError("--onnx runs the exported model on the CPU: it excludes --ensemble, --checkpoint, "
                         "--cuda and --precision")
    return args


def ranked(probs: np.ndarray, tagger: Tagger, args: argparse.Namespace) -> list[dict]:
    """The --top_k (or --all_classes) labels of one file as output records."""
    order = top_k(probs, len(probs) if args.all_classes else args.top_k)
    return [{"rank": r + 1, "index": int(i), "mid": tagger.class_ids[i] if tagger.class_ids else "",
             "label": tagger.class_names[i], "probability": round(float(probs[i]), 6)}
            for r, i in enumerate(order)]


def write_results(args: argparse.Namespace, tagger: Tagger, files: list[Path], results: dict[Path, np.ndarray],
                  errors: dict[Path, str]) -> None:
    """--output as .json or .csv, written atomically."""
    out = Path(args.output)
    with atomic_write(out, newline="", encoding="utf-8") as f:
        if out.suffix.lower() == ".json":
            json.dump({"model": tagger.name, "sample_rate": tagger.sample_rate,
                       "results": [{"file": str(p), "tags": ranked(results[p], tagger, args)}
                                   for p in files if p in results],
                       "errors": [{"file": str(p), "error": msg} for p, msg in errors.items()]},
                      f, indent=2)
        else:
            writer = csv.writer(f)
            writer.writerow(["file", "rank", "index", "mid", "label", "probability"])
            for p in files:
                if p in results:
                    for tag in ranked(results[p], tagger, args):
                        writer.writerow([str(p), *tag.values()])
    print(f"wrote {len(results)} result(s) to {out}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    with as_input_error():
        files = find_audio_files(args.audio_path)
        frontend = {"sr": args.sample_rate, "win_length": args.window_size, "hopsize": args.hop_size,
                    "n_mels": args.n_mels}
        if args.onnx:
            tagger: Tagger = build_onnx_tagger(args.onnx, args.model_name, **frontend)
        else:
            tagger = build_tagger(args.model_name, args.ensemble, select_device(args.cuda), args.strides,
                                  args.head_type, args.checkpoint, args.precision, **frontend)

    # tag: consecutive files of equal length share a batch; results keep the input order
    results, errors = run_on_files(files, tagger.sample_rate, tagger.predict, args.batch_size,
                                   chunked_fn=tagger.predict_chunks)
    for message in errors.values():
        print(f"error: {message}", file=sys.stderr)

    for path in files:
        if path in results:
            if len(files) > 1:
                print(path)
            print(format_tags(results[path], tagger.class_names, args.top_k))
    if args.output and results:
        write_results(args, tagger, files, results, errors)
    if not results:
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
