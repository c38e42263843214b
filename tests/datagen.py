"""Tiny generated datasets in the layouts of ESC-50, DCASE2020, FSD50K, OpenMIC and of the user's
own data (folder + CSV), for the fine-tuning tests.

Every layout has two trivially separable kinds of clip, a pure tone and white noise, so a
pre-trained model fine-tuned for a few steps must tell them apart perfectly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from datasets.hdf5 import Mp3HDF5Writer, encode_mp3


def tone(seconds: float, sr: int, freq: float = 440.0, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def noise(seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    return (0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32)


def clip(kind: int, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Kind 0: tone (random pitch 300-1000 Hz); kind 1: white noise."""
    return tone(seconds, sr, rng.uniform(300, 1000), rng.uniform(0, 6.28)) if kind == 0 else noise(seconds, sr, rng)


def make_esc50(root: Path, clips_per_fold: int = 2, seconds: float = 1.0, sr: int = 44100,
               seed: int = 0) -> Path:
    """ESC-50 layout; targets 0 ("tone") and 1 ("noise") alternate, folds 1..5."""
    rng = np.random.default_rng(seed)
    (root / "meta").mkdir(parents=True)
    (root / "audio_32k").mkdir()
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, 6):
        for i in range(clips_per_fold):
            target = i % 2
            name = f"{fold}-{1000 + i}-A-{target}.wav"
            sf.write(root / "audio_32k" / name, clip(target, seconds, sr, rng), sr)
            lines.append(f"{name},{fold},{target},{('tone', 'noise')[target]},False,{1000 + i},A")
    (root / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")
    return root


DCASE_SCENES = ("airport", "park")


def make_dcase20(root: Path, clips_per_device: int = 2, seconds: float = 1.0, sr: int = 44100,
                 seed: int = 0) -> Path:
    """DCASE2020 Task 1 layout: scenes airport (tones) and park (noise), devices a, b, s1, cities
    barcelona and lyon; the evaluation split holds one clip per scene and device."""
    rng = np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True)
    (root / "evaluation_setup").mkdir()
    meta = ["filename\tscene_label\tidentifier\tsource_label"]
    train, test = ["filename\tscene_label"], ["filename\tscene_label"]
    for device in ("a", "b", "s1"):
        for k, scene in enumerate(DCASE_SCENES):
            for i in range(clips_per_device + 1):
                city = ("barcelona", "lyon")[i % 2]
                name = f"audio/{scene}-{city}-{i}-{k}-{device}.wav"
                sf.write(root / name, clip(k, seconds, sr, rng), sr)
                meta.append(f"{name}\t{scene}\t{city}-{i}\t{device}")
                (test if i == clips_per_device else train).append(f"{name}\t{scene}")
    (root / "meta.csv").write_text("\n".join(meta) + "\n")
    (root / "evaluation_setup" / "fold1_train.csv").write_text("\n".join(train) + "\n")
    (root / "evaluation_setup" / "fold1_evaluate.csv").write_text("\n".join(test) + "\n")
    return root


def make_custom(root: Path, clips_per_class: int = 6, seconds: float = 1.0, sr: int = 22050,
                multilabel: bool = False, split: bool = False, seed: int = 0) -> Path:
    """A folder of wav/flac files in sub-folders plus labels.csv. Single-label: classes "tone" and
    "noise". Multi-label: "tone", "noise" and clips holding both (label "noise;tone")."""
    rng = np.random.default_rng(seed)
    (root / "clips" / "a").mkdir(parents=True)
    (root / "clips" / "b").mkdir()
    lines = ["filename,label" + (",split" if split else "")]
    kinds = ["tone", "noise"] + (["tone;noise"] if multilabel else [])
    for k, kind in enumerate(kinds):
        for i in range(clips_per_class):
            wave = sum(clip(int(part == "noise"), seconds, sr, rng) for part in kind.split(";"))
            name = f"clips/{'ab'[i % 2]}/{kind.replace(';', '+')}_{i}.{('wav', 'flac')[i % 2]}"
            sf.write(root / name, np.clip(wave, -1, 1), sr)
            row = f"{name},{kind}"
            if split:
                row += "," + ("test" if i == 0 else "val" if i == 1 else "train")
            lines.append(row)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def write_mp3_hdf5(path: Path, names: list[str], waves: list[np.ndarray], targets: np.ndarray) -> None:
    """An HDF5 file in the PaSST/EfficientAT layout: audio_name, mp3 bytes, target rows."""
    with Mp3HDF5Writer(path, targets.shape[1], targets.dtype) as writer:
        for name, wave, target in zip(names, waves, targets):
            writer.append(name, encode_mp3(wave), target)


def make_fsd50k(root: Path, clips_per_split: int = 4, seconds: float = 1.0, seed: int = 0) -> Path:
    """FSD50K layout (train/val/eval HDF5, bit-packed 200-class targets): class 0 on tones,
    class 1 on noise, class 2 on every clip."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "eval"):
        kinds = [i % 2 for i in range(clips_per_split)]
        multi_hot = np.zeros((clips_per_split, 200), dtype=np.uint8)
        multi_hot[np.arange(clips_per_split), kinds] = 1
        multi_hot[:, 2] = 1
        write_mp3_hdf5(root / f"FSD50K.{split}_mp3.hdf", [f"{split}{i}.mp3" for i in range(clips_per_split)],
                       [clip(k, seconds, 32000, rng) for k in kinds], np.packbits(multi_hot, axis=1))
    return root


def make_openmic(root: Path, clips_per_split: int = 6, seconds: float = 1.0, seed: int = 0) -> Path:
    """OpenMIC layout (float32 targets: 20 relevances then 20 mask entries): instrument 0 is
    present on tones and absent on noise; instrument 1 the reverse; instrument 2 is never observed."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        kinds = [i % 2 for i in range(clips_per_split)]
        target = np.zeros((clips_per_split, 40), dtype=np.float32)
        target[:, 0] = [0.9 if k == 0 else 0.1 for k in kinds]
        target[:, 1] = [0.1 if k == 0 else 0.8 for k in kinds]
        target[:, 3] = rng.uniform(0, 1, clips_per_split)
        target[:, [20, 21, 23]] = 1.0
        write_mp3_hdf5(root / f"openmic_{split}.csv_mp3.hdf", [f"{split}_{i:03d}.mp3" for i in range(clips_per_split)],
                       [clip(k, seconds, 32000, rng) for k in kinds], target)
    return root


def bells_clip(path: Path, before: float = 3.0, after: float = 3.0, sr: int = 32000, repeats: int = 1) -> Path:
    """`repeats` times the demo clip's bells (resources/make_demo.py) between `before` and `after`
    seconds of faint noise, written to `path` as 16-bit audio at `sr` (any format soundfile writes)."""
    import soxr
    from resources.make_demo import SAMPLE_RATE, bells

    ring = np.tile(bells(), repeats)
    if sr != SAMPLE_RATE:
        ring = soxr.resample(ring, SAMPLE_RATE, sr).astype(np.float32)
    rng = np.random.default_rng(0)
    wave = np.concatenate([0.003 * rng.standard_normal(int(before * sr)), ring,
                           0.003 * rng.standard_normal(int(after * sr))]).astype(np.float32)
    sf.write(path, wave, sr, subtype="PCM_16")
    return path
