"""Sound event detection: tag recordings or live audio window by window and report when each sound occurs.

    python windowed_inference.py --model_name mn04_as --audio_path recording.wav
    python windowed_inference.py --model dymn10_as --audio_path field/ --window_length 5 --hop_length 1 \
        --threshold 0.4 --events events.csv --plot activity.png
    arecord -f S16_LE -r 32000 -c 1 -t raw | python windowed_inference.py --model mn04_as --audio_path - \
        --raw s16le --input_rate 32000 --hop_length 1 --events -

Recordings are streamed in blocks (memory does not grow with their length), cut into windows of
--window_length seconds every --hop_length seconds (the last window zero-padded, so the whole file is
covered; a recording shorter than a window is one window of its own length, and a note says so),
and each window is tagged. For every window the top tags are printed as it is done;
--events writes the DCASE event list (filename,onset,offset,event_label,probability): hop-long
segments where the overlap-weighted average of the windows' probabilities for a class reaches
--threshold, consecutive segments merged (see helpers/inference/sed.py); `--events -` or a .jsonl
file gets each event's start and end as a JSON line when it happens. `--audio_path -` reads standard
input as it arrives (a WAV stream, --raw PCM, or any container FFmpeg decodes), --mic a microphone
(docs/live-audio.md). Exit code: 0 all input analyzed, 1 some failed (or a stream stalled), 2 nothing
analyzed (bad arguments, unknown model, unreadable input), 130/143 stopped by SIGINT/SIGTERM (what was
done is written, open events closed).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from common.errors import AudioLoadError, InputError, as_input_error, check_suffix, exit_status, run_cli
from common.files import check_not_input, check_output
from common.flags import add_old_spelling
from datasets.audio import audio_duration, find_audio_files, stream_audio
from datasets.mic import Microphone, input_devices
from datasets.stream import RAW_FORMATS, Stream, open_stream
from helpers.inference.events import EventTracker
from helpers.inference.interrupt import Interrupted, StopSignals
from helpers.inference.live import Sinks, StreamResult, StreamRun, counted
from helpers.inference.formats import (check_output_path, events_schema, open_output, output_format,
                                       probabilities_schema)
from helpers.inference.outputs import PlotKeeper
from helpers.inference.writers import LineOutput
from helpers.inference.sed import Event, window_samples
from helpers.inference.resolve import RuntimeConfig, resolve_model
from models.pretrained import DEFAULT_MODEL
from helpers.inference.tagging import LoadedModel, add_precision_arg, model_record
from helpers.inference.windows import FRAME_WINDOW_SECONDS, MODES, WindowEngine, shared_support
from models.factory import FRONTEND_DEFAULTS


def add_stream_args(parser: argparse.ArgumentParser) -> None:
    live = parser.add_argument_group("live audio (docs/live-audio.md)")
    live.add_argument("--raw", choices=sorted(RAW_FORMATS), default=None,
                      help="standard input is headerless PCM in this format (needs --input_rate)")
    live.add_argument("--input_rate", type=int, default=None,
                      help="sample rate of a --raw stream in Hz (the model's own rate is its setting)")
    add_old_spelling(live, "--sample_rate", "--input_rate", "the raw stream's rate; inference.py's --sample_rate "
                     "is the model's", type=int)
    live.add_argument("--channels", type=int, default=None, help="channels of a --raw stream (default 1)")
    live.add_argument("--mic", nargs="?", const="", default=None, metavar="DEVICE",
                      help="record from a microphone (default device, or a number or name from --list_devices)")
    live.add_argument("--list_devices", action="store_true", help="list the input devices and exit")
    live.add_argument("--wall_clock", action="store_true", help="JSON event lines also give the wall-clock time")
    live.add_argument("--threads", type=int, default=None,
                      help="CPU threads for the model (default: 1 for live input, which keeps it light and "
                           "its latency steady on a busy machine; all cores for files)")
    live.add_argument("--stall_timeout", type=float, default=None,
                      help="end a stream that sends nothing for this many seconds (default: wait forever)")


def check_stream_args(args: argparse.Namespace) -> None:
    """InputError for stream flags that do not fit together."""
    stdin = args.audio_path == ["-"]
    if args.audio_path is None and args.mic is None and not args.list_devices:
        raise InputError("give --audio_path (files, folders, or - for standard input), --mic or --list_devices")
    if args.audio_path and "-" in args.audio_path and not stdin:
        raise InputError("--audio_path -: standard input is read alone, without other files")
    if args.mic is not None and args.audio_path:
        raise InputError("--mic and --audio_path exclude each other")
    if (args.raw or args.input_rate or args.channels) and not stdin:
        raise InputError("--raw, --input_rate and --channels describe standard input: give --audio_path -")
    if args.raw and not args.input_rate:
        raise InputError("--raw needs --input_rate (the stream's rate in Hz)")
    if (args.input_rate is not None and args.input_rate < 1) or (args.channels is not None and args.channels < 1):
        raise InputError("--input_rate and --channels must be at least 1")
    if args.wall_clock and not live_events(args):
        raise InputError("--wall_clock dates JSON event lines: give --events - or --events FILE.jsonl")
    if args.stall_timeout is not None and not stdin:
        raise InputError("--stall_timeout watches standard input: give --audio_path -")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if args.stall_timeout is not None and not args.stall_timeout > 0:
        raise InputError(f"--stall_timeout must be a positive number of seconds, got {args.stall_timeout}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--audio_path", nargs="+", default=None,
                        help="audio files and/or folders; - reads standard input as it arrives")
    parser.add_argument("--model_name", "--model", default=DEFAULT_MODEL,
                        help=f"registry name, e.g. mn04_as, dymn10_as (default: {DEFAULT_MODEL}, shipped; another "
                             "downloads once)")
    parser.add_argument("--ensemble", nargs="+", default=None, help="several model names; averages logits")
    parser.add_argument("--cuda", action="store_true", help="run on GPU (fp16 autocast) if available")
    add_precision_arg(parser)
    parser.add_argument("--window_length", type=float, default=10.0, help="window length in seconds")
    add_old_spelling(parser, "--window_size", "--window_length", "seconds here; --window_size is STFT samples in "
                     "inference.py and the training scripts", type=float)
    parser.add_argument("--hop_length", type=float, default=2.5, help="hop between windows in seconds")
    parser.add_argument("--batch_size", type=int, default=8, help="windows tagged together")
    parser.add_argument("--windows", choices=MODES, default="exact",
                        help="exact: every window through the network on its own; shared: one pass over the "
                             "recording cut into windows (models whose family supports it; ~4x faster at 1-s "
                             "hops, but not within the agreement bounds of docs/long-recordings.md, so exact is "
                             "the default for every model)")
    parser.add_argument("--frames", action="store_true",
                        help="also write probabilities every frame of the last feature map (0.32 s; needs the shared pass) "
                             "to --probabilities, and draw them in --plot")
    parser.add_argument("--frame_window", type=float, default=FRAME_WINDOW_SECONDS,
                        help="--frames: each frame's probability is the head on the mean of the frames within "
                             "this many seconds around it (0: the frame alone; 3 s localized best, "
                             "docs/long-recordings.md)")
    parser.add_argument("--top_k", type=int, default=5, help="tags printed per window (0: print no windows)")
    parser.add_argument("--threshold", type=float, default=0.3, help="probability at which a class is active")
    parser.add_argument("--events", default=None,
                        help="events to a .csv or .json file (at the end), or as JSON lines to a .jsonl file or - "
                             "(stdout) as they happen")
    parser.add_argument("--probabilities", default=None,
                        help="write every window's start, end and class probabilities to a .csv or .npz file")
    parser.add_argument("--plot", default=None, help="save a .png of class activity over time (one file)")
    parser.add_argument("--plot_classes", type=int, default=10, help="classes shown in --plot")
    add_stream_args(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.top_k < 0 or args.plot_classes < 1:
        raise InputError("--batch_size and --plot_classes must be at least 1, --top_k at least 0")
    if args.frames and not (args.probabilities or args.plot):
        raise InputError("--frames writes to --probabilities and/or --plot; give one")
    if not 0.0 <= args.frame_window <= 3600:
        raise InputError(f"--frame_window must be between 0 and 3600 seconds, got {args.frame_window}")
    if not 0.0 <= args.threshold <= 1.0:
        raise InputError(f"--threshold must be between 0 and 1, got {args.threshold}")
    check_stream_args(args)
    with as_input_error():  # before any model is loaded; checked again at the model's sample rate
        window_samples(args.window_length, args.hop_length, FRONTEND_DEFAULTS["sr"], FRONTEND_DEFAULTS["n_fft"])
    inputs = [*(args.audio_path or []), args.model_name]
    check_output_path("--events", args.events, "events", inputs)
    check_output_path("--probabilities", args.probabilities, "probabilities", inputs)
    check_suffix("--plot", args.plot, (".png",))
    if args.plot:
        check_output(args.plot, "--plot")
        check_not_input("--plot", args.plot, inputs)
    return args


def load(args: argparse.Namespace) -> tuple[list, LoadedModel]:
    """The inputs (files, or one stream or microphone) and the tagger; unreadable input or an unknown
    model is an InputError. A stream's header is read first, so that a bad one fails at once."""
    with as_input_error():
        if args.audio_path == ["-"]:
            sources: list = [open_stream(sys.stdin.fileno(), "stdin", args.raw, args.input_rate, args.channels,
                                         args.stall_timeout)]
        elif args.mic is not None:
            sources = [Microphone(args.mic or None, args.hop_length, max(2 * args.hop_length, 1.0))]
        else:
            sources = find_audio_files(args.audio_path)
        if args.plot and len(sources) > 1:
            raise ValueError(f"--plot draws one recording; {len(sources)} files given")
        tagger = resolve_model(args.ensemble or args.model_name,
                               RuntimeConfig("cuda" if args.cuda else "cpu", args.precision))
        window_samples(args.window_length, args.hop_length, tagger.sample_rate, tagger.frontend.n_fft)
        if args.frames and shared_support(tagger):
            raise ValueError(f"--frames needs the shared pass: {shared_support(tagger)}")
    if args.windows == "shared" and shared_support(tagger):
        print(f"note: {tagger.name} runs exact windows ({shared_support(tagger)})", file=sys.stderr)
    threads = args.threads or (1 if args.audio_path == ["-"] or args.mic is not None else None)
    if threads:
        torch.set_num_threads(threads)
    return sources, tagger


def input_files(args: argparse.Namespace, sources: list) -> list[Path]:
    """The files a run reads (the audio files found, a model file): no output may be one."""
    return [*(s for s in sources if isinstance(s, Path)), *[Path(args.model_name)] * bool(args.model_name)]


def live_events(args: argparse.Namespace) -> bool:
    """Whether --events is a live stream of JSON lines (standard output or a .jsonl file, in any
    case) rather than the event list written at the end."""
    return bool(args.events) and output_format(args.events, "events", "--events").live


def make_sinks(args: argparse.Namespace, tagger: LoadedModel, several: bool, inputs: list[Path]) -> Sinks:
    """The outputs written while the windows arrive (see helpers/inference/live.py), opened
    through the output-format registry (helpers/inference/formats.py)."""
    files = [args.probabilities, args.plot, args.events if args.events != "-" else None]
    record = model_record(tagger)
    events_out = open_output(args.events, events_schema({}), option="--events", model=record,
                             inputs=inputs) if live_events(args) else None
    probabilities = open_output(args.probabilities, probabilities_schema(tagger.class_names, tagger.name, args.frames),
                                option="--probabilities", model=record, inputs=inputs) if args.probabilities else None
    return Sinks(tagger.class_names, top_k=0 if args.events == "-" else args.top_k,
                 windows_out=LineOutput("-") if args.top_k and args.events != "-" else None,
                 events_out=events_out, probabilities=probabilities,
                 plot=PlotKeeper(args.plot, tagger.class_names, args.plot_classes) if args.plot else None,
                 wall_clock=args.wall_clock, files_only_on_stdout=not any(files), name_in_lines=several)


def tag_source(args: argparse.Namespace, source: Path | Stream | Microphone, tagger: LoadedModel, sinks: Sinks,
               stop: StopSignals, several: bool) -> Optional[StreamResult]:
    """Tag one file or stream through the live loop; None for a file that cannot be opened."""
    window, hop = window_samples(args.window_length, args.hop_length, tagger.sample_rate)
    mode = "exact" if shared_support(tagger) else args.windows  # the shared pass needs the model's support
    engine = WindowEngine(tagger, window, hop, mode, args.batch_size, args.frames,
                          round(args.frame_window * tagger.sample_rate))
    bar = None
    if isinstance(source, Path):
        name, bad = str(source), None
        try:
            blocks = stream_audio(source, tagger.sample_rate, block_seconds=args.window_length +
                                  args.batch_size * args.hop_length)
            duration = audio_duration(source)
        except AudioLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return None
        bar = tqdm(total=round(duration, 1) if duration else None, desc=source.name[:40], unit="s", file=sys.stderr,
                   leave=False, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s")
        blocks = counted(blocks, lambda n: bar.update(n / tagger.sample_rate))
        if args.top_k and several and sinks.windows_out is not None:
            sinks.windows_out.write(f"File: {source}\n")
    elif isinstance(source, Stream):
        name, bad, blocks = source.name, source.bad, source.blocks(tagger.sample_rate)
    else:
        name, bad = source.name, None
        blocks = Stream(name, source.rate, 1, source.blocks()).blocks(tagger.sample_rate)
    tracker = EventTracker(tagger.class_names, window, hop, tagger.sample_rate, args.threshold, name)
    try:
        result = StreamRun(name, engine, tracker, sinks, bad).run(blocks, stop)
    finally:
        if bar is not None:
            bar.close()
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    if 0 < result.num_samples < window:
        print(f"note: {name} ({result.num_samples / tagger.sample_rate:.2f} s) is shorter than --window_length "
              f"{args.window_length:g} s: tagged as one window over its own length", file=sys.stderr)
    return result


def finish_outputs(args: argparse.Namespace, tagger: LoadedModel, sinks: Sinks, events: list[Event], inputs: list[Path],
                   last: Optional[StreamResult], name: str) -> None:
    """The files written whole at the end, each atomically."""
    if sinks.events_out is not None:
        sinks.events_out.close()
    elif args.events:
        meta = {"model": tagger.name, "window_length": args.window_length, "hop_length": args.hop_length,
                "threshold": args.threshold}
        with open_output(args.events, events_schema(meta), option="--events", model=model_record(tagger),
                         inputs=inputs) as writer:
            writer.add([dataclasses.astuple(e) for e in events])
    if args.events and args.events != "-":
        print(f"wrote {len(events)} event(s) to {args.events}", file=sys.stderr)
    if sinks.probabilities is not None:
        sinks.probabilities.close()
        print(f"wrote {'frame' if args.frames else 'window'} probabilities to {args.probabilities}", file=sys.stderr)
    if sinks.plot is not None and last is not None:
        window, hop = window_samples(args.window_length, args.hop_length, tagger.sample_rate)
        sinks.plot.write(name, tagger.sample_rate, window, hop, last.num_samples, events)
        print(f"wrote activity plot to {args.plot}", file=sys.stderr)


def run(args: argparse.Namespace, sources: list, tagger: LoadedModel, stop: StopSignals) -> int:
    """Tag every source, then write the outputs; the exit status (module doc)."""
    inputs = input_files(args, sources)
    sinks = make_sinks(args, tagger, isinstance(sources[0], Path) and len(sources) > 1, inputs)
    events: list[Event] = []
    done = failed = 0
    last: Optional[StreamResult] = None
    stopped: Optional[int] = None
    try:
        for source in sources:
            result = tag_source(args, source, tagger, sinks, stop, len(sources) > 1)
            failed += result is None or bool(result.error)
            if result is not None and result.num_samples:
                done, last = done + 1, result
                events += result.events
            stopped = stop.signum
            if stopped or (result is not None and result.reader_gone):
                break
        if done:
            finish_outputs(args, tagger, sinks, events, inputs, last, getattr(sources[0], "name", str(sources[0])))
    except (InputError, OSError):  # a failed write: leave no partial file
        if sinks.probabilities is not None:
            sinks.probabilities.abort()
        raise
    seconds = last.num_samples / tagger.sample_rate if last is not None and not isinstance(sources[0], Path) else 0
    return report(args, sources, len(events), done, failed, stopped, seconds)


def report(args: argparse.Namespace, sources: list, n_events: int, done: int, failed: int,
           stopped: Optional[int], seconds: float) -> int:
    """The closing lines on stderr and the exit status."""
    where = f"{done} file(s)" if isinstance(sources[0], Path) else f"{seconds:.1f} s of {sources[0].name}"
    print(f"{n_events} event(s) at threshold {args.threshold} in {where}", file=sys.stderr)
    if isinstance(sources[0], Microphone):
        dropped = sources[0].dropped_seconds
        print(f"{sources[0].name}: {dropped:.1f} s of audio dropped (the model could not keep up)"
              if dropped else f"{sources[0].name}: nothing dropped", file=sys.stderr)
    if stopped:
        print(f"interrupted by {signal.Signals(stopped).name} after {done} input(s), the last one tagged up to "
              "where it stopped: open events closed there, outputs written", file=sys.stderr)
    return exit_status(done, failed, stopped)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    if args.list_devices:
        with as_input_error():
            print("\n".join(input_devices()) or "no input devices")
        return 0
    stop = StopSignals()
    with stop.installed():
        stop.hold()  # a signal is noted; the loop stops at the next block (or at once while waiting for input)
        try:
            with stop.waiting():
                sources, tagger = load(args)
        except Interrupted as e:
            print(f"interrupted by {e} before anything was tagged", file=sys.stderr)
            return 128 + e.signum
        return run(args, sources, tagger, stop)

if __name__ == "__main__":
    sys.exit(run_cli(main))
