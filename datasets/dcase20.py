"""DCASE2020 Task 1a: TAU Urban Acoustic Scenes 2020 Mobile, development set (10 scenes,
recorded with several devices in several cities).

Layout of the dataset folder (`--dataset_dir`, default $EFFICIENTAT_DCASE20_DIR); all tables are
tab-separated:

    meta.csv                            filename, scene_label, identifier, source_label [, ...]
    audio/                              the wav files (meta.csv's filename is relative to the folder)
    evaluation_setup/fold1_train.csv    filename [, scene_label]: the official training split
    evaluation_setup/fold1_evaluate.csv filename [, scene_label]: the official test split

Scenes, devices and cities (the part of `identifier` before the first '-') are numbered in sorted
order, as scikit-learn's LabelEncoder does in the original.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from datasets.files import AudioFileDataset, check_files_exist, make_cache, one_hot, read_table
from common.errors import InputError

ENV_VAR = "EFFICIENTAT_DCASE20_DIR"
CLIP_SECONDS = 10
META = "meta.csv"
TRAIN_SPLIT = Path("evaluation_setup", "fold1_train.csv")
TEST_SPLIT = Path("evaluation_setup", "fold1_evaluate.csv")


class DCASE20Dataset(AudioFileDataset):
    """Clips of one split; also knows each clip's recording device and city (integer ids into
    `device_names` / `city_names`) for per-device results."""

    def __init__(self, *args, devices: np.ndarray, cities: np.ndarray, device_names: list[str],
                 city_names: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.devices, self.cities = devices, cities
        self.device_names, self.city_names = device_names, city_names


def get_datasets(root: Path, sample_rate: int = 32000,
                 cache_path: Optional[str | os.PathLike] = None
                 ) -> tuple[DCASE20Dataset, DCASE20Dataset, list[str]]:
    """(training set, test set, scene names) of the official fold-1 setup in the folder `root`; items are
    (waveform (1, 10 s), file name, one-hot scene target (10), index)."""
    meta = read_table(root / META, ("filename", "scene_label", "identifier", "source_label"), "\t")
    scenes = sorted({r["scene_label"] for r in meta})
    devices = sorted({r["source_label"] for r in meta})
    cities = sorted({r["identifier"].split("-")[0] for r in meta})
    row_of = {r["filename"]: i for i, r in enumerate(meta)}
    check_files_exist([root / r["filename"] for r in meta], root / META)
    cache = make_cache(cache_path, "tau_urban_acoustic_scenes20", sample_rate)

    def split(table: Path, bad_clips: str) -> DCASE20Dataset:
        listed = [r["filename"] for r in read_table(root / table, ("filename",), "\t")]
        unknown = [f for f in listed if f not in row_of]
        if unknown:
            raise InputError(f"{root / table}: lists {unknown[0]}, which is not in {root / META}"
                               + (f" ({len(unknown)} such files)" if len(unknown) > 1 else ""))
        rows = [meta[row_of[f]] for f in listed]
        return DCASE20Dataset(
            [root / r["filename"] for r in rows],
            one_hot([scenes.index(r["scene_label"]) for r in rows], len(scenes)),
            [r["filename"] for r in rows], sample_rate, CLIP_SECONDS * sample_rate, cache=cache, bad_clips=bad_clips,
            devices=np.array([devices.index(r["source_label"]) for r in rows], dtype=np.int64),
            cities=np.array([cities.index(r["identifier"].split("-")[0]) for r in rows], dtype=np.int64),
            device_names=devices, city_names=cities)

    return split(TRAIN_SPLIT, "replace"), split(TEST_SPLIT, "mask"), scenes
