"""A local web page: drop, record or stream audio and see its tags and when each sound happens.

    pip install -r requirements-demo.txt
    python demo.py                                   # http://127.0.0.1:7860, the shipped mn04_as
    python demo.py --port 8080 --models runs/Custom/best.pt mn10_as+mn04_as --max_upload_mb 8192

The page (helpers/demo/page.py) runs the commands' code: the windows, events and --plot figure of
windowed_inference.py, the clip tags of inference.py, the embedding of embeddings.py, and for the
Live tab the live loop of windowed_inference.py --mic. It listens on 127.0.0.1 only, makes no
request to other hosts (no fonts, analytics, update checks or share links) and never downloads a
model: the picker offers the shipped one, those in the cache and those given with --models
(docs/demo.md). Exit code 2 for bad flags, a port in use or a model that cannot be loaded; Ctrl-C
or SIGTERM stop the server (exit code 0) and remove the files it wrote.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

# before Gradio is imported: no telemetry, no version check, no model hub look-ups
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from common.errors import InputError, as_input_error, run_cli  # noqa: E402
from helpers.demo.analysis import Settings  # noqa: E402
from common.flags import add_old_spelling  # noqa: E402
from helpers.demo.models import Taggers  # noqa: E402
from models.pretrained import DEFAULT_MODEL  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model picked when the page opens")
    parser.add_argument("--models", nargs="+", default=[],
                        help="more models for the picker: registry names, training checkpoints (runs/x/best.pt), "
                             "ONNX exports, or ensembles written a+b")
    parser.add_argument("--max_upload_mb", type=float, default=4096,
                        help="uploads larger than this are refused before they are sent")
    parser.add_argument("--window_length", type=float, default=10.0, help="window length in seconds (the default)")
    add_old_spelling(parser, "--window_size", "--window_length", "seconds, as windowed_inference.py's", type=float)
    parser.add_argument("--hop_length", type=float, default=1.0, help="hop between windows in seconds (the default)")
    parser.add_argument("--threshold", type=float, default=0.3, help="probability at which a class is active")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for the models (1 keeps two browsers and a live stream steady on a "
                             "busy machine)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be between 1 and 65535, got {args.port}")
    if not args.max_upload_mb > 0 or args.threads < 1:
        raise InputError("--max_upload_mb must be positive and --threads at least 1")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    defaults = Settings(args.model, args.window_length, args.hop_length, args.threshold)
    taggers = Taggers()
    with as_input_error():  # every model given is loaded once now, so that a bad one fails here
        for reference in dict.fromkeys([args.model, *args.models]):
            defaults.samples(taggers.get(reference))
    try:
        from helpers.demo.page import Page, serve
    except ImportError as e:
        raise InputError(f"the page needs Gradio ({e}): pip install -r requirements-demo.txt") from None
    page = Page(taggers, args.models, defaults)
    previous = signal.signal(signal.SIGTERM, _stop)  # from now on a SIGTERM stops the server as Ctrl-C does
    try:
        try:
            blocks = serve(page, args.port, args.max_upload_mb, block=False)
        except OSError as e:
            raise InputError(f"--port {args.port}: cannot listen on 127.0.0.1:{args.port} "
                             f"({str(e).split('.')[0]})") from None
        print(f"EfficientAT page on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
        blocks.block_thread()  # until Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        pass  # stopped while starting (the server's thread ends with the process)
    finally:
        page.close()
        signal.signal(signal.SIGTERM, previous)
    return 0


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does


if __name__ == "__main__":
    sys.exit(run_cli(main))
