"""Export a pre-trained EfficientAT model (MN or DyMN, any registry name) to ONNX.

    python export_onnx.py --model_name mn10_as --with_frontend --output mn10_as.onnx
    python export_onnx.py --model dymn10_as --output dymn10_as.onnx --check resources/metro_station-paris.wav

With --with_frontend the graph takes waveforms (batch, samples) float32 at 32 kHz (the mel
frontend is inside, its STFT written as a DFT convolution); without it, log-mel spectrograms
(batch, 1, n_mels, frames) as produced by models.preprocess.AugmentMelSTFT. Outputs: `logits`
(batch, classes; apply a sigmoid for probabilities) and `embedding` (batch, D). Batch and time axes
are dynamic. --check runs onnxruntime on an audio file (as a batch of two: the clip and a quieter,
time-reversed copy) and compares with PyTorch. Exit code: 0 exported (and the check passed),
1 the check failed, 2 bad arguments, unknown model or unreadable audio.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from datasets.audio import AudioLoadError, load_audio
from helpers.common.errors import DownloadError, InputError, check_suffix, run_cli
from helpers.inference.onnx_export import DEFAULT_OPSET, compare_with_torch, export_onnx
from helpers.inference.tagging import Tagger, build_tagger, top_k


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_name", "--model", default="mn10_as", help="registry name, e.g. mn04_as, dymn10_as")
    parser.add_argument("--output", default=None,
                        help="ONNX file to write (default: <model_name>.onnx, or <model_name>_frontend.onnx)")
    parser.add_argument("--with_frontend", action="store_true", help="include the mel frontend (waveform input)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--check", default=None, metavar="AUDIO_PATH",
                        help="compare onnxruntime with PyTorch on this audio file after exporting")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest absolute difference --check accepts")
    return parser.parse_args(argv)


def check_export(args: argparse.Namespace, output: Path, tagger: Tagger, clip: np.ndarray) -> int:
    """--check: onnxruntime against PyTorch on the clip (and a quieter reversed copy); 0 when the
    largest difference is within --tolerance, else 1."""
    waveforms = np.stack([clip, 0.5 * clip[::-1]])
    diffs, logits = compare_with_torch(output, tagger.model, waveforms, tagger.frontend, args.with_frontend)
    ok = max(diffs["logits"], diffs["embedding"]) <= args.tolerance
    print(f"check on {args.check} (batch of 2, {len(clip)} samples): largest difference onnxruntime vs "
          f"PyTorch: logits {diffs['logits']:.2e}, embedding {diffs['embedding']:.2e} "
          f"(tolerance {args.tolerance:.0e}): {'OK' if ok else 'FAILED'}")
    probs = 1 / (1 + np.exp(-logits[0]))
    print("top tags (onnxruntime): " + "; ".join(f"{tagger.class_names[i]} {probs[i]:.3f}" for i in top_k(probs, 5)))
    return 0 if ok else 1


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    output = Path(args.output or f"{args.model_name}{'_frontend' if args.with_frontend else ''}.onnx")
    check_suffix("--output", output, (".onnx",))
    try:
        tagger = build_tagger(args.model_name)
        clip = load_audio(args.check, tagger.sample_rate) if args.check else None
        if clip is not None and len(clip) <= tagger.frontend.n_fft // 2 + 1:
            raise AudioLoadError(f"{args.check}: too short for the check ({len(clip)} samples)")
        n_mels = tagger.frontend.n_mels
        export_onnx(tagger.model, output, tagger.frontend if args.with_frontend else None, args.opset, n_mels)
    except (AudioLoadError, DownloadError, ValueError, RuntimeError) as e:
        raise InputError(str(e)) from None

    shape = "waveform (batch, samples)" if args.with_frontend else f"spectrogram (batch, 1, {n_mels}, frames)"
    print(f"exported {tagger.name} to {output} ({output.stat().st_size / 2 ** 20:.1f} MiB, opset {args.opset}): "
          f"input {shape} at {tagger.sample_rate} Hz; outputs logits (batch, {tagger.model.num_classes}), "
          f"embedding (batch, {tagger.model.embedding_dim})")
    return 0 if clip is None else check_export(args, output, tagger, clip)


if __name__ == "__main__":
    sys.exit(run_cli(main))
