"""Exact vs shared windows on long recordings: agreement, speed and memory.

    python benchmarks/bench_long.py --agreement                 # real clips strung together, mn04_as
    python benchmarks/bench_long.py --minutes 60 --model_name mn04_as mn10_as   # speed and RSS
    python benchmarks/bench_long.py --localization              # which frame output localizes best

--agreement builds a sequence from real recordings (the demo bells, ../shared/audio, the
UrbanSound8K clips of ../shared/data/urbansound8k_subset, each trimmed to its true extent, with
1-6 s of near-silence between them), tags it with exact and shared windows and prints the mean
absolute difference of the per-window probabilities, how often the top-1 class is the same, and
whether the events at --threshold match (same labels, onsets and offsets within one hop).
--minutes writes a recording of that length (the same sequence repeated, written block by block)
and runs `windowed_inference.py --windows exact` and `--windows shared` on it side by side, each
in its own process, printing the wall time of the whole command and its resident memory sampled
every 0.1 s (peak, and mean over the first and last quarters of the run: flat means no growth).
Models whose weights are not at hand run with random weights (speed only; said in the output).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from datasets.audio import load_audio  # noqa: E402
from helpers.inference.sed import WindowPredictions, detect_events  # noqa: E402
from helpers.inference.resolve import resolve_model  # noqa: E402
from helpers.inference.windows import WindowEngine  # noqa: E402

SHARED = Path(os.environ.get("EFFICIENTAT_SHARED", REPO.parent / "shared"))
SR = 32000


def real_sequence(seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float, Optional[list[str]]]]]:
    """The demo bells, ../shared/audio and the UrbanSound8K subset's clips (true extent) in a
    shuffled order, with 1-6 s of near-silence (-60 dB noise) between them, and where each clip
    lies: (start s, end s, its AudioSet class names, or None for the unlabelled demo and
    ../shared/audio recordings)."""
    us8k = SHARED / "data" / "urbansound8k_subset"
    paths = [REPO / "resources" / "demo_bells.wav", *sorted((SHARED / "audio").glob("*.wav"))]
    with open(us8k / "subset.csv", newline="") as f:
        rows = {row["file"]: row for row in csv.DictReader(f)}
    rng = np.random.default_rng(seed)
    clips = [(load_audio(p, SR), None) for p in paths]
    for name in sorted(rows):
        extent = float(rows[name]["end"]) - float(rows[name]["start"])
        clip = load_audio(us8k / name, SR)[:max(2, round(extent * SR))]
        clips.append((clip, rows[name]["audioset_names"].split(";")))
    parts, where, position = [], [], 0
    for k in rng.permutation(len(clips)):
        clip, names = clips[k]
        gap = 0.001 * rng.standard_normal(int(rng.uniform(1, 6) * SR)).astype(np.float32)
        where.append((position / SR, (position + len(clip)) / SR, names))
        parts += [clip, gap]
        position += len(clip) + len(gap)
    return np.concatenate(parts), where


def tag(tagger, wave: np.ndarray, mode: str, window: int, hop: int) -> np.ndarray:
    engine = WindowEngine(tagger, window, hop, mode)
    out = []
    for k in range(0, len(wave), 10 * SR):
        out += engine.push(wave[k:k + 10 * SR])
    out += engine.finish()
    return np.stack([p for _, p in out])


def events_match(a: list, b: list, hop: float) -> tuple[int, int]:
    """(events of `a` with a partner in `b`: same label, onset and offset within `hop`; len(a))."""
    free = list(b)
    matched = 0
    for e in a:
        partner = next((f for f in free if f.event_label == e.event_label and abs(f.onset - e.onset) <= hop
                        and abs(f.offset - e.offset) <= hop), None)
        if partner is not None:
            free.remove(partner)
            matched += 1
    return matched, len(a)


def agreement(args: argparse.Namespace) -> None:
    wave, _ = real_sequence()
    window, hop = round(args.window_length * SR), round(args.hop_length * SR)
    print(f"sequence of real recordings: {len(wave) / SR:.0f} s; windows {args.window_length:g} s, hop "
          f"{args.hop_length:g} s, threshold {args.threshold}")
    for name in args.model_name:
        tagger = resolve_model(name)
        probs = {}
        for mode in ("exact", "shared"):
            t0 = time.perf_counter()
            probs[mode] = tag(tagger, wave, mode, window, hop)
            print(f"  {name} {mode}: {time.perf_counter() - t0:.1f} s")
        exact, shared = probs["exact"], probs["shared"]
        events = [detect_events(WindowPredictions("seq", SR, window, hop, len(wave), p), tagger.class_names,
                                args.threshold) for p in (exact, shared)]
        found, total = events_match(events[0], events[1], args.hop_length)
        extra = len(events[1]) - events_match(events[1], events[0], args.hop_length)[0]
        print(f"{name}: mean |shared - exact| {np.abs(shared - exact).mean():.4f} (bound 0.02), max "
              f"{np.abs(shared - exact).max():.3f}; top-1 same in {(shared.argmax(1) == exact.argmax(1)).mean():.1%} "
              f"of {len(exact)} windows (bound 95%); events: {found} of {total} exact events matched, "
              f"{extra} extra in shared")


def average_precision(score: np.ndarray, positive: np.ndarray) -> float:
    order = np.argsort(-score, kind="stable")
    hits = positive[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / max(1, hits.sum()))


def localization(args: argparse.Namespace) -> None:
    """Frame-level average precision of the UrbanSound8K clips' classes on the real sequence (a
    frame is positive where its centre lies inside a clip of that class; frames within 5 s of the
    unlabelled recordings are left out): single frames, centred moving means of frame embeddings,
    and exact windows' hop segments."""
    import torch

    from helpers.inference.shared_pass import MovingFrames, SharedPass

    wave, where = real_sequence()
    tagger = resolve_model(args.model_name[0])
    shared = SharedPass(tagger, context=round(args.window_length * SR))
    embeddings = shared.embeddings(wave)
    times = np.arange(len(embeddings)) * shared.frame / SR
    classes = sorted({tuple(names) for _, _, names in where if names})
    unlabelled = np.zeros(len(times), bool)
    positive = {names: np.zeros(len(times), bool) for names in classes}
    for start, end, names in where:
        if names is None:
            unlabelled |= (times >= start - 5) & (times < end + 5)
        else:
            positive[tuple(names)] |= (times >= start) & (times < end)

    def report(label: str, probs: np.ndarray) -> None:
        aps = [average_precision(probs[:, [tagger.class_names.index(n) for n in names]].max(1)[~unlabelled],
                                 positive[names][~unlabelled]) for names in classes]
        print(f"  {label:40s} mAP {np.mean(aps):.3f}   " + " ".join(f"{a:.2f}" for a in aps))

    print(f"frame-level AP on the real sequence ({len(wave) / SR:.0f} s, {len(classes)} classes: "
          f"{'; '.join(n[0] for n in classes)}), {args.model_name[0]}, frames every {shared.frame / SR:.2f} s")
    for count in (1, 3, 5, 9, 15, 31):
        moving = MovingFrames(count)
        smoothed = torch.cat([moving.push(embeddings), moving.push(embeddings[:0], final=True)])
        report(f"frames, moving mean of {count} ({count * shared.frame / SR:.1f} s)",
               tagger.probabilities(shared.logits(smoothed)))
    for window, hop in ((args.window_length, args.hop_length), (1.0, 0.32), (2.0, 0.32), (3.0, 0.32)):
        probs = tag(tagger, wave, "exact", round(window * SR), round(hop * SR))
        predictions = WindowPredictions("seq", SR, round(window * SR), round(hop * SR), len(wave), probs)
        bounds, segments = predictions.segments()
        rows = np.clip(np.searchsorted(bounds, times, side="right") - 1, 0, len(segments) - 1)
        report(f"exact windows of {window:g} s every {hop:g} s", segments[rows])


def write_recording(path: Path, minutes: float) -> None:
    sequence, _ = real_sequence()
    total = int(minutes * 60 * SR)
    with sf.SoundFile(path, "w", SR, 1, subtype="PCM_16") as f:
        for start in range(0, total, len(sequence)):
            f.write(sequence[:total - start])


def run_command(command: list[str]) -> tuple[float, list[float]]:
    """Wall time of `command` and its RSS in MiB sampled every 0.1 s."""
    t0 = time.perf_counter()
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, cwd=REPO)
    samples = []
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                samples += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS")]
        except OSError:
            pass
        time.sleep(0.1)
    if proc.returncode:
        errors.seek(0)
        tail = errors.read().decode(errors="replace").strip().splitlines()[-1:]
        raise SystemExit(f"error: {' '.join(command)} exited with {proc.returncode}: {' '.join(tail)}")
    return time.perf_counter() - t0, samples


def model_cache(folder: Path, names: list[str]) -> list[str]:
    """A checkpoint cache in `folder`: the files of the user's cache, plus random-weight
    checkpoints for the models in `names` whose weights are not at hand; returns those names."""
    import torch

    from common.download import cache_dir
    from models.factory import create_model
    from models.pretrained import get_entry

    folder.mkdir(exist_ok=True)
    for f in cache_dir().iterdir() if cache_dir().is_dir() else ():  # no user cache yet: shipped files only
        (folder / f.name).symlink_to(f.resolve())
    shipped = Path(REPO / "resources")
    missing = [n for n in names if not (folder / get_entry(n).filename).exists()
               and not (shipped / get_entry(n).filename).exists()]
    for name in missing:
        torch.save(create_model(name, pretrained=False).state_dict(), folder / get_entry(name).filename)
    return missing


def speed(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / "long.wav"
        if not path.exists():
            write_recording(path, args.minutes)
        random = model_cache(Path(tmp) / "cache", args.model_name)
        os.environ["EFFICIENTAT_MODEL_DIR"] = str(Path(tmp) / "cache")
        print(f"recording: {args.minutes:g} min at {SR} Hz; windows {args.window_length:g} s, hop {args.hop_length:g} s; "
              f"{os.cpu_count()} CPUs" + (f"; random weights for {', '.join(random)}" if random else ""))
        for name in args.model_name:
            walls = {}
            for mode in ("exact", "shared"):
                command = [sys.executable, "windowed_inference.py", "--model_name", name, "--audio_path", str(path),
                           "--window_length", str(args.window_length), "--hop_length", str(args.hop_length),
                           "--windows", mode, "--top_k", "0", "--batch_size", str(args.batch_size)]
                wall, rss = run_command(command)
                walls[mode] = wall
                q = max(1, len(rss) // 4)
                print(f"{name} {mode}: wall {wall:.1f} s; RSS peak {max(rss, default=0):.0f} MiB, first quarter "
                      f"{np.mean(rss[:q]):.0f} MiB, last quarter {np.mean(rss[-q:]):.0f} MiB")
            print(f"{name}: shared {walls['exact'] / walls['shared']:.1f}x faster than exact")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agreement", action="store_true", help="measure agreement on real recordings")
    parser.add_argument("--localization", action="store_true", help="frame-level AP of frames and windows")
    parser.add_argument("--minutes", type=float, default=None, help="length of the speed/memory recording")
    parser.add_argument("--model_name", nargs="+", default=["mn04_as"])
    parser.add_argument("--window_length", type=float, default=10.0)
    parser.add_argument("--hop_length", type=float, default=1.0)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--keep", default=None, help="write the recording here (and reuse it if it exists)")
    args = parser.parse_args()
    if args.agreement:
        agreement(args)
    if args.localization:
        localization(args)
    if args.minutes:
        speed(args)
