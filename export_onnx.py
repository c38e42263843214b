"""Export a pre-trained EfficientAT model (MN or DyMN, any registry name) to ONNX.

    python export_onnx.py --model_name mn10_as --with_frontend --output mn10_as.onnx
    python export_onnx.py --model dymn10_as --output dymn10_as.onnx --check resources/demo_bells.wav
    python export_onnx.py --model mn10_as --with_frontend --quantize int8 --calibration clips/

With --with_frontend the graph takes waveforms (batch, samples) float32 at 32 kHz (the mel
frontend is inside, its STFT written as a DFT convolution); without it, log-mel spectrograms
(batch, 1, n_mels, frames) as produced by models.preprocess.AugmentMelSTFT. Outputs: `logits`
(batch, classes; apply a sigmoid for probabilities) and `embedding` (batch, D). Batch and time axes
are dynamic. --check runs onnxruntime on an audio file (as a batch of two: the clip and a quieter,
time-reversed copy) and compares with PyTorch. --quantize int8 writes an int8 model instead
(ONNX Runtime static quantization calibrated on the --calibration clips, or dynamic without them)
and prints its top-5 agreement and largest probability difference against PyTorch on those clips
(`inference.py --onnx FILE` tags with it). Exit code: 0 exported (and the check passed),
1 the check failed, 2 bad arguments, unknown model or unreadable audio.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from datasets.audio import AudioLoadError, find_audio_files, load_audio
from common.errors import InputError, as_input_error, check_suffix, run_cli
from common.files import check_not_input, check_output
from helpers.inference.onnx_export import DEFAULT_OPSET, OPSETS, agreement, compare_with_torch, export_onnx, quantize_onnx
from helpers.inference.resolve import ModelRef, RuntimeConfig, resolve_model
from models.pretrained import DEFAULT_MODEL
from helpers.inference.tagging import LoadedModel, top_k


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_name", "--model", default=DEFAULT_MODEL,
                        help=f"registry name, e.g. mn04_as, dymn10_as (default: {DEFAULT_MODEL}, shipped; another "
                             "downloads once)")
    parser.add_argument("--output", default=None,
                        help="ONNX file to write (default: <model_name>.onnx, or <model_name>_frontend.onnx)")
    parser.add_argument("--with_frontend", action="store_true", help="include the mel frontend (waveform input)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset version")
    parser.add_argument("--check", default=None, metavar="AUDIO_PATH",
                        help="compare onnxruntime with PyTorch on this audio file after exporting")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest absolute difference --check accepts")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="write an int8 model (ONNX Runtime; static with --calibration, else dynamic)")
    parser.add_argument("--calibration", nargs="+", default=None, metavar="AUDIO",
                        help="files and/or folders of typical clips to calibrate --quantize int8 on")
    args = parser.parse_args(argv)
    if args.opset not in OPSETS:
        raise InputError(f"--opset {args.opset} is not supported: use {OPSETS.start}-{OPSETS.stop - 1}")
    if args.calibration and not args.quantize:
        raise InputError("--calibration is for --quantize int8")
    if args.check and args.quantize:
        raise InputError("--check compares a float export within --tolerance; an int8 export prints its "
                         "agreement with PyTorch on the --calibration clips")
    return args


def check_export(args: argparse.Namespace, output: Path, tagger: LoadedModel, clip: np.ndarray) -> int:
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


def quantize(args: argparse.Namespace, output: Path, tagger: LoadedModel, clips: list[np.ndarray]) -> None:
    """--quantize int8: replace the float model at `output` by its int8 version, calibrated on
    `clips` (static) or dynamic without; print the agreement with PyTorch on the clips."""
    frontend = tagger.frontend
    with torch.no_grad():
        calibration = [c[None] if args.with_frontend else frontend(torch.from_numpy(c[None])).unsqueeze(1).numpy()
                       for c in clips]
    with tempfile.TemporaryDirectory() as tmp:
        float_model = Path(tmp) / "float.onnx"
        os.replace(output, float_model)
        method = quantize_onnx(float_model, output, calibration)
    print(f"quantized to int8 ({method}"
          + (f", calibrated on {len(clips)} clip(s)" if clips else ", no --calibration") + f"): {output} "
          f"({output.stat().st_size / 2 ** 20:.1f} MiB)")
    if clips:
        share, largest = agreement(output, tagger.model, frontend, args.with_frontend, clips)
        print(f"int8 vs PyTorch on the calibration clips: top-5 agreement {100 * share:.0f} %, "
              f"largest probability difference {largest:.3f}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    default = f"{args.model_name}{'_frontend' if args.with_frontend else ''}{'_int8' if args.quantize else ''}.onnx"
    output = Path(args.output or default)
    check_suffix("--output", output, (".onnx",))
    check_output(output, "--output")
    check_not_input("--output", output, [*filter(None, [args.check]), *(args.calibration or [])])
    if not (math.isfinite(args.tolerance) and args.tolerance > 0):
        raise InputError(f"--tolerance must be a positive number, got {args.tolerance}")
    with as_input_error():
        tagger = resolve_model(ModelRef("registry", (args.model_name,)), RuntimeConfig(fast=False))
        clip = load_audio(args.check, tagger.sample_rate) if args.check else None
        if clip is not None and len(clip) <= tagger.frontend.n_fft // 2 + 1:
            raise AudioLoadError(f"{args.check}: too short for the check ({len(clip)} samples)")
        calibration = [load_audio(f, tagger.sample_rate) for f in find_audio_files(args.calibration or [])]
        n_mels = tagger.frontend.n_mels
        export_onnx(tagger.model, output, tagger.frontend if args.with_frontend else None, args.opset, n_mels,
                    tagger.frontend.eval_settings())

    shape = "waveform (batch, samples)" if args.with_frontend else f"spectrogram (batch, 1, {n_mels}, frames)"
    print(f"exported {tagger.name} to {output} ({output.stat().st_size / 2 ** 20:.1f} MiB, opset {args.opset}): "
          f"input {shape} at {tagger.sample_rate} Hz; outputs logits (batch, {tagger.model.num_classes}), "
          f"embedding (batch, {tagger.model.embedding_dim})")
    if args.quantize:
        quantize(args, output, tagger, calibration)
    return 0 if clip is None else check_export(args, output, tagger, clip)


if __name__ == "__main__":
    sys.exit(run_cli(main))
