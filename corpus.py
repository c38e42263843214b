"""Tag and embed a corpus of audio files on Ray (this machine, or a cluster) into one Parquet table.

    python corpus.py --audio_path clips/ --output tags/ --model_name mn04_as
    python corpus.py --manifest files.txt --output table/ --all_classes --embeddings --address auto
    python corpus.py --manifest files.csv --output table/ --resume            # continue a stopped job
    python corpus.py --audio_path audio/ --output teacher/ --logits --ensemble mn40_as dymn20_as
    python corpus.py --export_teacher teacher/ --teacher_preds t.npy --fname_to_index t.json
    python corpus.py --export_teacher teacher/ --teacher_preds t.npy --fname_to_index t.json \
        --teacher_names relative --audio_root audio/ --pseudo_labels labels.csv   # audio without labels

The table is a folder of Parquet part files, one row per input file: file, duration, error (null,
or why the file could not be read), the top-k labels and probabilities, and with the flags all
probabilities, the clip embedding, the logits; manifest.json beside it records the model, the
settings, the code version, the counts and each run (docs/corpus.md). Without --address Ray runs on
this machine; with --address auto or HOST:PORT the job joins a running cluster, whose nodes all see
the inputs and the output folder at the same paths. Ctrl-C or SIGTERM stops the job with the parts
written whole (exit code 130 / 143); --resume then processes only the files the table lacks.
Exit code: 0 every file of the table tagged, 1 some failed (their rows hold the error), 2 bad
arguments or input (nothing done), 3 the Ray job failed (the parts written are whole: --resume).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional

from common.errors import InputError, as_input_error, run_cli
from helpers.inference.corpus_inputs import sort_inputs
from helpers.inference.corpus_job import ClusterSpec, CorpusJob, JobFailed, PoolSpec, RunStats, run_corpus
from helpers.inference.corpus_stages import Columns, ModelSpec
from helpers.inference.corpus_teacher import NAME_MODES, export_teacher
from helpers.inference.tagging import add_precision_arg
from models.pretrained import DEFAULT_MODEL

MAX_ERROR_LINES = 20  # failures printed as they come; the table's error column holds all of them


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--audio_path", nargs="+", default=[], help="audio files and/or folders (searched recursively)")
    io.add_argument("--manifest", nargs="+", default=[],
                    help="lists of audio files: .txt (a path per line) or .csv (a file, path or filename column); "
                         "relative paths are relative to the manifest's folder")
    io.add_argument("--output", help="the table's folder (Parquet parts + manifest.json)")
    io.add_argument("--resume", action="store_true", help="continue the table in --output: only files it lacks")
    io.add_argument("--quiet", action="store_true", help="no progress bar")
    model = parser.add_argument_group("model and columns")
    model.add_argument("--model_name", "--model", default=None, help=f"registry name (default {DEFAULT_MODEL})")
    model.add_argument("--ensemble", nargs="+", default=None, help="several model names; averages logits")
    model.add_argument("--checkpoint", default=None, help="a checkpoint written by a training script (ex_*.py)")
    add_precision_arg(model)
    model.add_argument("--top_k", type=int, default=10, help="labels and probabilities per file")
    model.add_argument("--all_classes", action="store_true", help="a probabilities column with every class")
    model.add_argument("--embeddings", action="store_true", help="an embedding column (the pooled embedding)")
    model.add_argument("--logits", action="store_true", help="a logits column (for --export_teacher)")
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--address", default=None,
                           help="auto or HOST:PORT of a running Ray cluster (default: start Ray on this machine)")
    ray_group.add_argument("--num_cpus", type=int, default=None, help="CPUs of the Ray started here (default: all)")
    ray_group.add_argument("--object_store_memory", type=int, default=None,
                           help="MiB of the object store of the Ray started here (default: 2048, at most 1/5 of RAM)")
    _add_pool_args(parser)
    teacher = parser.add_argument_group("teacher files for distillation (from a table written with --logits)")
    teacher.add_argument("--export_teacher", metavar="TABLE", default=None,
                         help="write --teacher_preds and --fname_to_index from this table, then stop")
    teacher.add_argument("--teacher_preds", default=None, help="the logits .npy to write")
    teacher.add_argument("--fname_to_index", default=None, help="the clip name -> row mapping to write (.json, .csv)")
    teacher.add_argument("--teacher_names", choices=NAME_MODES, default="ytid",
                         help="clip names: AudioSet YouTube IDs from file names, or paths relative to --audio_root")
    teacher.add_argument("--audio_root", default=None, help="with --teacher_names relative: prepare_hdf5's --audio_dir")
    teacher.add_argument("--pseudo_labels", default=None, metavar="CSV",
                         help="also write prepare_hdf5's filename,labels CSV with the teacher's labels (its top "
                              "class and those at probability >= 0.5), for audio without labels")
    args = parser.parse_args(argv)
    check_flags(args)
    return args


def _add_pool_args(parser: argparse.ArgumentParser) -> None:
    pool = parser.add_argument_group("work split (model actors, decode tasks, part files)")
    pool.add_argument("--actors", type=int, default=None,
                      help="model actors (default: one per --num_gpus_per_actor GPUs, or one per two CPUs)")
    pool.add_argument("--cpus_per_actor", type=float, default=1.0, help="CPUs per model actor (its torch threads)")
    pool.add_argument("--num_gpus_per_actor", type=float, default=0.0, help="GPUs per model actor (0: CPU)")
    pool.add_argument("--batch_size", type=int, default=16, help="files of equal length run by the model together")
    pool.add_argument("--cpus_per_decode", type=float, default=1.0, help="CPUs per decode task")
    pool.add_argument("--decode_batch", type=int, default=16, help="files per decode task batch")
    pool.add_argument("--decode_tasks", type=int, default=None, help="decode tasks at once (default: as many as fit)")
    pool.add_argument("--rows_per_part", type=int, default=1000, help="rows per Parquet part file")


def check_flags(args: argparse.Namespace) -> None:
    """InputError for missing, contradicting or out-of-range flags."""
    if args.export_teacher:
        if not (args.teacher_preds and args.fname_to_index):
            raise InputError("--export_teacher writes --teacher_preds and --fname_to_index: give both")
        if args.teacher_names == "relative" and not args.audio_root:
            raise InputError("--teacher_names relative needs --audio_root (prepare_hdf5's --audio_dir)")
        if args.pseudo_labels and args.teacher_names != "relative":
            raise InputError("--pseudo_labels names files relative to --audio_root: use --teacher_names relative")
        return
    if not (args.audio_path or args.manifest) or not args.output:
        raise InputError("give --audio_path and/or --manifest, and --output (the table's folder)")
    if min(args.top_k, args.batch_size, args.decode_batch, args.rows_per_part) < 1:
        raise InputError("--top_k, --batch_size, --decode_batch and --rows_per_part must be at least 1")
    if args.cpus_per_actor <= 0 or args.cpus_per_decode <= 0 or args.num_gpus_per_actor < 0:
        raise InputError("--cpus_per_actor and --cpus_per_decode must be positive, --num_gpus_per_actor not negative")
    if (args.actors is not None and args.actors < 1) or (args.decode_tasks is not None and args.decode_tasks < 1):
        raise InputError("--actors and --decode_tasks must be at least 1")
    if args.address and (args.num_cpus or args.object_store_memory):
        raise InputError("--num_cpus and --object_store_memory size the Ray started here: not with --address")
    if sum(bool(x) for x in (args.model_name, args.ensemble, args.checkpoint)) > 1:
        raise InputError("--model_name, --ensemble and --checkpoint each name the model: give one")
    if args.ensemble and args.embeddings:
        raise InputError("--embeddings: an ensemble has no single embedding (tag with one model)")
    if args.num_gpus_per_actor and args.precision != "fp32":
        raise InputError("--precision is for the CPU; on a GPU the model runs fp16 autocast")


def job_from_args(args: argparse.Namespace) -> CorpusJob:
    """The typed job the library runs (helpers never see the Namespace)."""
    return CorpusJob(
        inputs=sort_inputs(args.audio_path, args.manifest), output=Path(os.path.abspath(args.output)),
        model=ModelSpec(args.model_name, tuple(args.ensemble) if args.ensemble else None, args.checkpoint,
                        args.precision),
        columns=Columns(args.top_k, args.all_classes, args.embeddings, args.logits),
        cluster=ClusterSpec(args.address, args.num_cpus, args.object_store_memory),
        pool=PoolSpec(args.actors, args.cpus_per_actor, args.num_gpus_per_actor, args.batch_size,
                      args.cpus_per_decode, args.decode_batch, args.decode_tasks, args.rows_per_part),
        resume=args.resume, progress=not args.quiet)


def summary(stats: RunStats, manifest: dict, output: str) -> str:
    """The lines printed at the end of a run."""
    run = manifest["runs"][-1]
    counts = manifest["counts"]
    rate = f", {run['files_per_second']:.2f} files/s" if run["files_per_second"] else ""
    lines = [f"processed {stats.files} of {stats.todo} file(s) in {stats.seconds:.1f} s{rate}, {stats.failed} failed",
             f"table {output}: {counts['rows']} row(s), {counts['failed']} with an error, "
             f"in {manifest['parts']} part(s)"]
    if run["files_per_node"]:
        lines.append("files per node: " + ", ".join(f"{n} {c}" for n, c in run["files_per_node"].items()))
    if stats.files:
        lines.append(f"per file: decode {1000 * run['decode_seconds_per_file']:.1f} ms, model "
                     f"{1000 * run['model_seconds_per_file']:.1f} ms (worker seconds)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    if args.export_teacher:
        with as_input_error():
            rows = export_teacher(args.export_teacher, args.teacher_preds, args.fname_to_index,
                                  args.teacher_names, args.audio_root, args.pseudo_labels)
        written = [args.teacher_preds, args.fname_to_index] + ([args.pseudo_labels] if args.pseudo_labels else [])
        print(f"wrote {rows} teacher row(s) to {', '.join(written)}")
        return 0
    printed = []

    def on_error(message: str) -> None:
        printed.append(message)
        if len(printed) <= MAX_ERROR_LINES:
            print(f"error: {message}", file=sys.stderr)
        elif len(printed) == MAX_ERROR_LINES + 1:
            print("error: more files failed: the table's error column holds every reason", file=sys.stderr)

    try:
        stats, manifest = run_corpus(job_from_args(args), on_error)
    except JobFailed as e:
        print(e.details, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(summary(stats, manifest, args.output))
    if stats.signum is not None:
        print(f"interrupted by {signal.Signals(stats.signum).name}: the parts written are whole; --resume "
              "continues", file=sys.stderr)
        return 128 + stats.signum
    if not manifest["counts"]["rows"]:
        raise InputError("no audio files in the inputs")
    return 1 if manifest["counts"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
