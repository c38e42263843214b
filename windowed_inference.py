"""Sound event detection: tag long recordings window by window and report when each sound occurs.

    python windowed_inference.py --model_name mn04_as --audio_path recording.wav
    python windowed_inference.py --model dymn10_as --audio_path field/ --window_size 5 --hop_length 1 \
        --threshold 0.4 --events events.csv --plot activity.png

Recordings are streamed in blocks (memory does not grow with their length), cut into windows of
--window_size seconds every --hop_length seconds (the last window zero-padded, so the whole file is
covered; a recording shorter than a window is one window of its own length, and a note says so),
and each window is tagged. For every window the top tags are printed;
--events writes the DCASE event list (filename,onset,offset,event_label,probability): hop-long
segments where the overlap-weighted average of the windows' probabilities for a class reaches
--threshold, consecutive segments merged (see helpers/inference/sed.py). Exit code: 0 all files analyzed,
1 some failed, 2 nothing analyzed (bad arguments, unknown model, unreadable input).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from datasets.audio import AudioLoadError, find_audio_files
from common.errors import InputError, as_input_error, check_suffix, run_cli
from common.files import atomic_write, check_output
from helpers.inference.sed import (EVENT_FIELDS, Event, WindowPredictions, detect_events, plot_activity,
                                   tag_windows, window_samples)
from helpers.inference.tagging import Tagger, add_precision_arg, build_tagger, select_device, top_k
from helpers.inference.windows import MODES, shared_support
from models.factory import FRONTEND_DEFAULTS



def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--audio_path", nargs="+", required=True, help="audio files and/or folders")
    parser.add_argument("--model_name", "--model", default="mn10_as", help="registry name, e.g. mn04_as, dymn10_as")
    parser.add_argument("--ensemble", nargs="+", default=None, help="several model names; averages logits")
    parser.add_argument("--cuda", action="store_true", help="run on GPU (fp16 autocast) if available")
    add_precision_arg(parser)
    parser.add_argument("--window_size", type=float, default=10.0, help="window length in seconds")
    parser.add_argument("--hop_length", type=float, default=2.5, help="hop between windows in seconds")
    parser.add_argument("--batch_size", type=int, default=8, help="windows tagged together")
    parser.add_argument("--windows", choices=MODES, default="exact",
                        help="exact: every window through the network on its own; shared: one pass over the "
                             "recording cut into windows (MN only, ~5x faster at 1-s hops, but not within the "
                             "agreement bounds of docs/long-recordings.md, so exact is the default for every model)")
    parser.add_argument("--frames", action="store_true",
                        help="also write per-frame probabilities (the head on each frame of the last feature "
                             "map, MN only) to --probabilities, and draw them in --plot")
    parser.add_argument("--top_k", type=int, default=5, help="tags printed per window (0: print no windows)")
    parser.add_argument("--threshold", type=float, default=0.3, help="probability at which a class is active")
    parser.add_argument("--events", default=None, help="write the events to a .csv or .json file")
    parser.add_argument("--probabilities", default=None,
                        help="write every window's start, end and class probabilities to a .csv or .npz file")
    parser.add_argument("--plot", default=None, help="save a .png of class activity over time (one file)")
    parser.add_argument("--plot_classes", type=int, default=10, help="classes shown in --plot")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.top_k < 0 or args.plot_classes < 1:
        raise InputError("--batch_size and --plot_classes must be at least 1, --top_k at least 0")
    if args.frames and not (args.probabilities or args.plot):
        raise InputError("--frames writes to --probabilities and/or --plot; give one")
    if not 0.0 <= args.threshold <= 1.0:
        raise InputError(f"--threshold must be between 0 and 1, got {args.threshold}")
    with as_input_error():  # before any model is loaded; checked again at the model's sample rate
        window_samples(args.window_size, args.hop_length, FRONTEND_DEFAULTS["sr"], FRONTEND_DEFAULTS["n_fft"])
    for option, value, suffixes in (("--events", args.events, (".csv", ".json")),
                                    ("--probabilities", args.probabilities, (".csv", ".npz")),
                                    ("--plot", args.plot, (".png",))):
        check_suffix(option, value, suffixes)
        if value:
            check_output(value, option)
    return args


def load(args: argparse.Namespace) -> tuple[list[Path], Tagger]:
    """The recordings and the tagger; unreadable input or an unknown model is an InputError."""
    with as_input_error():
        files = find_audio_files(args.audio_path)
        if args.plot and len(files) > 1:
            raise ValueError(f"--plot draws one recording; {len(files)} files given")
        tagger: Tagger = build_tagger(args.model_name, args.ensemble, select_device(args.cuda),
                                      precision=args.precision)
        window_samples(args.window_size, args.hop_length, tagger.sample_rate, tagger.frontend.n_fft)
        if args.frames and shared_support(tagger):
            raise ValueError(f"--frames needs the shared pass: {shared_support(tagger)}")
    if args.windows == "shared" and shared_support(tagger):
        print(f"note: {tagger.name} runs exact windows ({shared_support(tagger)})", file=sys.stderr)
        args.windows = "exact"
    return files, tagger


def tag_files(args: argparse.Namespace, files: list[Path],
              tagger: Tagger) -> tuple[list[WindowPredictions], list[Event], int]:
    """Tag every recording window by window, printing each window's top tags as the original
    does; returns (predictions, events, number of unreadable files)."""
    results: list[WindowPredictions] = []
    events: list[Event] = []
    failed = 0
    for path in files:
        try:
            pred = tag_windows(tagger, path, args.window_size, args.hop_length, args.batch_size, mode=args.windows,
                               frames=args.frames)
        except AudioLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        results.append(pred)
        if pred.num_samples < pred.window:
            print(f"note: {path} ({pred.duration:.2f} s) is shorter than --window_size {args.window_size:g} s: "
                  "tagged as one window over its own length", file=sys.stderr)
        events += detect_events(pred, tagger.class_names, args.threshold)
        if args.top_k:
            if len(files) > 1:
                print(f"File: {path}")
            for start, end, probs in zip(pred.starts, pred.ends, pred.probabilities):
                print(f"Window: {start:.2f} - {end:.2f}")
                for i in top_k(probs, args.top_k):
                    print(f"\t{tagger.class_names[i]}: {probs[i]:.2f}")
                print()
    return results, events, failed


def write_events(args: argparse.Namespace, tagger: Tagger, events: list[Event]) -> None:
    if args.events:
        with atomic_write(args.events, "w", newline="", encoding="utf-8") as f:
            if Path(args.events).suffix.lower() == ".json":
                json.dump({"model": tagger.name, "window_size": args.window_size, "hop_length": args.hop_length,
                           "threshold": args.threshold, "events": [dataclasses.asdict(e) for e in events]},
                          f, indent=2)
            else:
                writer = csv.writer(f)
                writer.writerow(EVENT_FIELDS)
                writer.writerows(dataclasses.astuple(e) for e in events)
        print(f"wrote {len(events)} event(s) to {args.events}", file=sys.stderr)


def write_probabilities(args: argparse.Namespace, tagger: Tagger, results: list[WindowPredictions]) -> None:
    if args.probabilities:
        if Path(args.probabilities).suffix.lower() == ".npz":
            with atomic_write(args.probabilities, "wb") as f:
                np.savez(f, filenames=np.array([p.filename for p in results]),
                         starts=np.concatenate([p.starts for p in results]),
                         ends=np.concatenate([p.ends for p in results]),
                         file_index=np.concatenate([np.full(len(p.probabilities), i) for i, p in enumerate(results)]),
                         probabilities=np.concatenate([p.probabilities for p in results]),
                         class_names=np.array(tagger.class_names), model=np.array(tagger.name),
                         **(frame_arrays(results) if args.frames else {}))
        elif args.frames:
            write_frames_csv(args.probabilities, tagger, results)
        else:
            with atomic_write(args.probabilities, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["filename", "start", "end", *tagger.class_names])
                for p in results:
                    for start, end, probs in zip(p.starts, p.ends, p.probabilities):
                        writer.writerow([p.filename, f"{start:.3f}", f"{end:.3f}", *(f"{x:.5f}" for x in probs)])
        print(f"wrote {'frame' if args.frames else 'window'} probabilities to {args.probabilities}", file=sys.stderr)


def frame_arrays(results: list[WindowPredictions]) -> dict[str, np.ndarray]:
    """--frames in the .npz: each frame's centre time, file index and probabilities."""
    return {"frame_times": np.concatenate([p.frame_times for p in results]),
            "frame_file_index": np.concatenate([np.full(len(p.frame_times), i) for i, p in enumerate(results)]),
            "frame_probabilities": np.concatenate([p.frame_probabilities for p in results])}


def write_frames_csv(path: str, tagger: Tagger, results: list[WindowPredictions]) -> None:
    """--frames in a .csv: one row per frame, its centre time and its class probabilities."""
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "time", *tagger.class_names])
        for p in results:
            for time, probs in zip(p.frame_times, p.frame_probabilities):
                writer.writerow([p.filename, f"{time:.3f}", *(f"{x:.5f}" for x in probs)])


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    files, tagger = load(args)
    results, events, failed = tag_files(args, files, tagger)
    if not results:
        return 2
    print(f"{len(events)} event(s) at threshold {args.threshold} in {len(results)} file(s)", file=sys.stderr)
    # outputs, each written atomically
    write_events(args, tagger, events)
    write_probabilities(args, tagger, results)
    if args.plot:
        with atomic_write(args.plot, "wb") as f:
            plot_activity(results[0], tagger.class_names, f, args.plot_classes, events)
        print(f"wrote activity plot to {args.plot}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
