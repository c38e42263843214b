"""Memory and speed of sound event detection on a long recording.

    python benchmarks/bench_long_audio.py                      # one hour, 32 kHz wav, mn04_as
    python benchmarks/bench_long_audio.py --minutes 10 --format mp3 --model_name mn10_as

Writes a synthetic recording (noise with a tone burst every 30 s, written block by block) into a
temporary folder, then runs the windowed tagger of windowed_inference.py on it (10-s windows,
2.5-s hop) and prints the wall time, the real-time factor and the peak resident memory of this
process (resource.getrusage), next to the size the whole recording would take as one float32
array. With streaming, the peak stays near the model's own footprint whatever the length.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from datasets.audio import audio_duration  # noqa: E402
from helpers.inference.sed import detect_events, tag_windows  # noqa: E402
from helpers.inference.resolve import RuntimeConfig, resolve_model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--minutes", type=float, default=60.0, help="length of the generated recording")
parser.add_argument("--input_rate", type=int, default=32000, help="rate of the generated file")
parser.add_argument("--format", choices=("wav", "flac", "mp3"), default="wav")
parser.add_argument("--model_name", default="mn04_as")
parser.add_argument("--window_length", type=float, default=10.0)
parser.add_argument("--hop_length", type=float, default=2.5)
parser.add_argument("--batch_size", type=int, default=8)
parser.add_argument("--cuda", action="store_true")
parser.add_argument("--keep", default=None, help="write the recording here (and reuse it if it exists)")
args = parser.parse_args()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def write_recording(path: Path, seconds: float, rate: int) -> None:
    """Noise plus a 1-kHz tone burst of 2 s every 30 s, generated and written 10 s at a time."""
    rng = np.random.default_rng(0)
    block = 10 * rate
    total = int(seconds * rate)
    if path.suffix == ".mp3":
        import av
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mp3", rate=rate)
            stream.layout = "mono"
            for start in range(0, total, block):
                chunk = _chunk(rng, start, min(block, total - start), rate)
                frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
                frame.sample_rate = rate
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        return
    with sf.SoundFile(path, "w", rate, 1, subtype="PCM_16") as f:
        for start in range(0, total, block):
            f.write(_chunk(rng, start, min(block, total - start), rate))


def _chunk(rng: np.random.Generator, start: int, n: int, rate: int) -> np.ndarray:
    t = (start + np.arange(n)) / rate
    tone = np.where((t % 30.0) < 2.0, 0.3 * np.sin(2 * np.pi * 1000 * t), 0.0)
    return (0.02 * rng.standard_normal(n) + tone).astype(np.float32)


with tempfile.TemporaryDirectory() as tmp:
    path = Path(args.keep) if args.keep else Path(tmp) / f"long.{args.format}"
    if not path.exists():
        t0 = time.perf_counter()
        write_recording(path, args.minutes * 60, args.input_rate)
        print(f"wrote {path} ({path.stat().st_size / 2 ** 20:.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    seconds = audio_duration(path) or args.minutes * 60
    rss_start = peak_rss_mib()
    tagger = resolve_model(args.model_name, RuntimeConfig("cuda" if args.cuda else "cpu"))
    tagger.predict(np.zeros((1, 32000), dtype=np.float32))  # warm-up, so the model's memory is counted here
    rss_model = peak_rss_mib()
    t0 = time.perf_counter()
    pred = tag_windows(tagger, path, args.window_length, args.hop_length, args.batch_size, progress=False)
    events = detect_events(pred, tagger.class_names)
    wall = time.perf_counter() - t0
    rss_peak = peak_rss_mib()

whole = pred.num_samples * 4 / 2 ** 20
print(f"model {args.model_name} on {tagger.device} ({os.cpu_count()} CPUs, {torch.get_num_threads()} "
      f"threads), {args.window_length:g}-s windows every {args.hop_length:g} s, batch {args.batch_size}")
print(f"recording: {seconds / 60:.1f} min {args.format} at {args.input_rate} Hz -> {pred.num_samples} samples "
      f"at {tagger.sample_rate} Hz (whole recording as float32: {whole:.0f} MiB)")
print(f"windows: {len(pred.probabilities)}, events at threshold 0.3: {len(events)}")
print(f"wall time: {wall:.1f} s ({seconds / wall:.1f}x real time, {len(pred.probabilities) / wall:.1f} windows/s)")
print(f"peak RSS: {rss_peak:.0f} MiB (before the model {rss_start:.0f} MiB, after loading it {rss_model:.0f} MiB; "
      f"growth during the run {rss_peak - rss_model:.0f} MiB)")
