"""Compute clip embeddings of audio files with a pre-trained EfficientAT model and save them as .npz.

    python embeddings.py --model_name mn10_as --audio_path clips/ --output clips_mn10.npz
    python embeddings.py --model dymn10_as --audio_path a.wav b.mp3 --layer 12 --output layer12.npz

The embedding is the model's pooled embedding (the global average of the last conv layer: 384
values for width 0.4, 960 for 1.0, 1920 for 2.0), or with --layer N the global average of feature
map N (MN and DyMN: 0 stem, 1-15 blocks, 16 last conv; each family declares its count). The .npz holds `filenames`, `embeddings` (n, D),
`model`, `layer` and `sample_rate`; read it with helpers.inference.embeddings.load_embeddings or np.load.
Ctrl-C or SIGTERM stops the run and saves the embeddings done so far (exit code 130 / 143).
Exit code: 0 all files embedded, 1 some failed (the others are saved), 2 nothing embedded.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Optional

from datasets.audio import find_audio_files
from common.errors import InputError, as_input_error, exit_status, run_cli
from helpers.inference.embeddings import embed_files, save_embeddings
from helpers.inference.interrupt import Interrupted, StopSignals
from helpers.inference.formats import check_output_path
from helpers.inference.resolve import RuntimeConfig, resolve_model
from helpers.inference.tagging import add_precision_arg, model_record
from models.factory import FAMILIES, feature_maps
from models.pretrained import DEFAULT_MODEL


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--audio_path", nargs="+", required=True, help="audio files and/or folders")
    parser.add_argument("--output", required=True, help=".npz or .parquet file to write")
    parser.add_argument("--model_name", "--model", default=DEFAULT_MODEL,
                        help=f"registry name, e.g. mn04_as, dymn10_as (default: {DEFAULT_MODEL}, shipped; another "
                             "downloads once)")
    maps = ", ".join(f"{family.label} 0-{family.feature_maps - 1}" for family in FAMILIES.values())
    parser.add_argument("--layer", type=int, default=None,
                        help=f"feature map to average instead of the pooled embedding ({maps}; negative from the end)")
    parser.add_argument("--cuda", action="store_true", help="run on GPU (fp16 autocast) if available")
    add_precision_arg(parser)
    parser.add_argument("--batch_size", type=int, default=16, help="files of equal length run together")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise InputError("--batch_size must be at least 1")
    check_output_path("--output", args.output, "embeddings", inputs=[*args.audio_path, args.model_name])
    count = feature_maps(args.model_name)
    if args.layer is not None and not -count <= args.layer < count:
        raise InputError(f"--layer must be in {-count}..{count - 1} ({args.model_name} has {count} feature maps), "
                         f"got {args.layer}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    with as_input_error():
        files = find_audio_files(args.audio_path)
        tagger = resolve_model(args.model_name, RuntimeConfig("cuda" if args.cuda else "cpu", args.precision))

    stop = StopSignals()
    with stop.installed():
        try:
            done, embeddings, errors = embed_files(tagger, files, args.layer, args.batch_size,
                                                   lambda _, message: print(f"error: {message}", file=sys.stderr))
        except Interrupted as e:
            done, embeddings, errors = e.partial  # type: ignore[attr-defined]
        stop.hold()
        if done:
            save_embeddings(args.output, done, embeddings, tagger.name, args.layer, tagger.sample_rate,
                            model=model_record(tagger), inputs=files)
            print(f"wrote {embeddings.shape[0]} embedding(s) of dimension {embeddings.shape[1]} to {args.output}")
    if stop.signum is not None:
        print(f"interrupted by {signal.Signals(stop.signum).name}: {len(done)} of {len(files)} file(s) embedded"
              + (f", saved to {args.output}" if done else ", nothing saved"), file=sys.stderr)
    return exit_status(len(done), len(errors), stop.signum)


if __name__ == "__main__":
    sys.exit(run_cli(main))
