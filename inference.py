"""Tag audio files with a pre-trained EfficientAT model (or an ensemble).

    python inference.py --model_name mn04_as --audio_path resources/demo_bells.wav
    python inference.py --model_name dymn10_as --audio_path clips/ more.mp3 --top_k 5 --output tags.json
    python inference.py --checkpoint runs/my_data/best.pt --audio_path new_clips/
    python inference.py --onnx mn10_as_int8.onnx --audio_path metro.wav      # exported with export_onnx.py

Each file is analyzed whole, in one pass, at 32 kHz mono. Files of equal length are batched.
Results are printed and written as each file finishes; Ctrl-C or SIGTERM stops the run with what
was done written to --output (exit code 130 / 143), and --resume then tags only the files it lacks.
Exit code: 0 all files tagged, 1 some files failed (the others are tagged), 2 nothing tagged
(bad arguments, unknown model, unreadable input).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from common.errors import InputError, as_input_error, exit_status, run_cli
from datasets.audio import find_audio_files
from helpers.inference.interrupt import Interrupted, StopSignals
from helpers.inference.formats import check_output_path, open_output, tags_schema
from helpers.inference.writers import OutputWriter
from helpers.inference.batching import iter_files
from helpers.inference.resolve import ModelRef, RuntimeConfig, resolve_model
from helpers.inference.tagging import LoadedModel, add_precision_arg, format_tags, model_record, top_k
from common.flags import add_frontend_flags
from models.config import FrontendConfig, ModelConfig
from models.pretrained import DEFAULT_MODEL

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--audio_path", nargs="+", required=True, help="audio files and/or folders")
    parser.add_argument("--model_name", default=None,
                        help=f"registry name, e.g. mn04_as, dymn10_as (default: {DEFAULT_MODEL}, shipped; "
                             "another downloads once; with --onnx: the settings stored in the file)")
    parser.add_argument("--ensemble", nargs="+", default=None, help="several model names; averages logits")
    parser.add_argument("--checkpoint", default=None,
                        help="a checkpoint written by a training script (ex_*.py): tags with its own classes")
    parser.add_argument("--onnx", default=None,
                        help="tag with this model exported by export_onnx.py (float or int8), with onnxruntime")
    parser.add_argument("--cuda", action="store_true", help="run on the GPU (fp16 autocast); an error without one")
    add_precision_arg(parser)
    parser.add_argument("--strides", nargs=4, type=int, default=None, help="block strides (default: registry)")
    parser.add_argument("--head_type", default=None, help="classifier head (default: registry)")
    add_frontend_flags(parser, sample_rate=True)
    parser.add_argument("--top_k", type=int, default=10, help="labels printed / written per file")
    parser.add_argument("--output", default=None,
                        help="write results to a .json, .csv or .parquet file (CSV and Parquet rows are written as "
                             "files finish)")
    parser.add_argument("--all_classes", action="store_true", help="write every class's probability to --output")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in --output and tag only the files it lacks")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="files of equal length run together (on the CPU's fast path a batch of 16 "
                             "costs 1.3-2.3x less per clip than one clip at a time)")
    args = parser.parse_args(argv)
    check_flags(args)
    return args


def model_files(args: argparse.Namespace) -> list[str]:
    """The model files a run reads (--checkpoint, --onnx): inputs no output may overwrite."""
    return [path for path in (args.checkpoint, args.onnx) if path]


def check_flags(args: argparse.Namespace) -> None:
    """InputError for values out of range and for flags that contradict or would be ignored."""
    if args.top_k < 1 or args.batch_size < 1:
        raise InputError("--top_k and --batch_size must be at least 1")
    check_output_path("--output", args.output, "tags", inputs=[*args.audio_path, *model_files(args)])
    for flag, needs in (("--all_classes", "--output"), ("--resume", "--output")):
        if getattr(args, flag[2:]) and not args.output:
            raise InputError(f"{flag} is about the {needs} file: give {needs} too")
    if args.onnx and (args.ensemble or args.checkpoint or args.cuda or args.precision != "fp32"):
        raise InputError("--onnx runs the exported model on the CPU: it excludes --ensemble, --checkpoint, "
                         "--cuda and --precision")
    if args.checkpoint and (args.ensemble or args.model_name):
        raise InputError("--checkpoint holds its own model: it excludes --ensemble and --model_name")
    if args.ensemble and args.model_name:
        raise InputError("--ensemble names its models: it excludes --model_name")


def ranked(probs: np.ndarray, tagger: LoadedModel, args: argparse.Namespace) -> list[dict]:
    """The --top_k (or --all_classes) labels of one file as output records."""
    order = top_k(probs, len(probs) if args.all_classes else args.top_k)
    return [{"rank": r + 1, "index": int(i), "mid": tagger.class_ids[i] if tagger.class_ids else "",
             "label": tagger.class_names[i], "probability": round(float(probs[i]), 6)}
            for r, i in enumerate(order)]


def model_ref(args: argparse.Namespace) -> ModelRef:
    """What the model flags name (each flag says what its value is)."""
    if args.onnx:
        return ModelRef("onnx", path=Path(args.onnx))
    if args.checkpoint:
        return ModelRef("checkpoint", path=Path(args.checkpoint))
    return ModelRef.parse(args.ensemble or args.model_name or DEFAULT_MODEL)


def load(args: argparse.Namespace) -> tuple[list[Path], LoadedModel]:
    """The files and the model; unreadable input or an unknown model is an InputError."""
    with as_input_error():
        files = find_audio_files(args.audio_path)
        frontend = FrontendConfig.from_flags(vars(args))
        # a registry name's architecture flags; with --onnx, the name whose settings the export must have
        arch = None if args.checkpoint or (args.onnx and not args.model_name) else ModelConfig(
            args.model_name or DEFAULT_MODEL, strides=tuple(args.strides) if args.strides else None,
            head_type=args.head_type)
        runtime = RuntimeConfig("cuda" if args.cuda else "cpu", args.precision)
        return files, resolve_model(model_ref(args), runtime, frontend, arch)


def open_tags_output(args: argparse.Namespace, tagger: LoadedModel, files: list[Path]
                     ) -> tuple[Optional[OutputWriter], list[Path]]:
    """The --output writer (None without --output; the format its suffix names,
    helpers/inference/formats.py) and the files left to tag (--resume skips those the earlier
    --output holds)."""
    if not args.output:
        return None, files
    writer = open_output(args.output, tags_schema({"model": tagger.name, "sample_rate": tagger.sample_rate}),
                         resume=args.resume, model=model_record(tagger), inputs=[*files, *model_files(args)])
    if args.resume:
        files = [f for f in files if str(f) not in writer.done]
        print(f"resuming: {len(writer.done)} file(s) already in {args.output}, {len(files)} to tag", file=sys.stderr)
    return writer, files


def tag(args: argparse.Namespace, tagger: LoadedModel, files: list[Path], writer: Optional[OutputWriter],
        stop: StopSignals, counts: Counter) -> None:
    """Tag `files`, printing and writing each result as it comes; `counts` the tagged and failed."""
    for path, probs, error in iter_files(files, tagger.sample_rate, tagger.predict, args.batch_size,
                                         chunked_fn=tagger.predict_chunks):
        with stop.deferred():
            if error is not None:
                counts["failed"] += 1
                print(f"error: {error}", file=sys.stderr)
                if writer is not None:
                    writer.add_error(str(path), error)
                continue
            counts["tagged"] += 1
            if len(files) > 1:
                print(path)
            print(format_tags(probs, tagger.class_names, args.top_k), flush=True)
            if writer is not None:
                tags = ranked(probs, tagger, args)
                writer.add([(str(path), *t.values()) for t in tags])


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    files, tagger = load(args)
    writer, todo = open_tags_output(args, tagger, files)
    stop = StopSignals()
    counts: Counter = Counter()
    with stop.installed():
        try:
            tag(args, tagger, todo, writer, stop, counts)
        except Interrupted:
            pass
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        stop.hold()
        if writer is not None and writer.count:
            writer.close()
            print(f"wrote {writer.count} result(s) to {args.output}", file=sys.stderr)
        elif writer is not None:
            writer.abort()
    if stop.signum is not None:
        print(f"interrupted by {signal.Signals(stop.signum).name}: {counts['tagged']} of {len(todo)} file(s) tagged"
              + (f", written to {args.output} (--resume continues)" if writer is not None and writer.count else ""),
              file=sys.stderr)
    return exit_status(counts["tagged"] + (writer.count if writer is not None else 0), counts["failed"], stop.signum)


if __name__ == "__main__":
    sys.exit(run_cli(main))
