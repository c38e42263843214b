"""The linear probe and its features on generated data: the probe separates separable classes
(single- and multi-label), C is chosen by cross-validation (the strongest of the tied, a fixed C
with one clip per class), the head API of the model (pre_logits, get_classifier, parameter groups),
the probe installed as the model's head gives the probe's logits, and the embedding cache: reused,
invalidated by each part of its key, robust to broken files and unwritable folders."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from common.errors import InputError
from datasets.files import AudioFileDataset
from helpers.training.clip_features import (Embedder, check_feature_kind, crop_starts, file_clips, select_features,
                                            trim_silence)
from helpers.training.embedding_cache import clear_cache, default_cache_dir
from helpers.training.linear_probe import (DEFAULT_C, choose_c, cv_folds_allowed, fit_probe, install_probe,
                                           stratified_folds)
from models.factory import model_config, model_from_config
from models.preprocess import AugmentMelSTFT
from models.runtime import for_inference
from tests.datagen import clip

SR = 16000
TINY = model_config("mn01", num_classes=2, width_mult=0.1)  # from scratch, no download


def separable(n_per_class: int, n_classes: int, dim: int = 16, draw: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-clip features (2 crops each) of Gaussian blobs around well separated centres (the same
    for every `draw`), one-hot targets."""
    centres = np.random.default_rng(0).normal(0, 5, (n_classes, dim))
    rng = np.random.default_rng(draw + 1)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    features = [(centres[k] + rng.normal(0, 0.5, (2, dim))).astype(np.float32) for k in labels]
    return features, np.eye(n_classes, dtype=np.float32)[labels]


def test_probe_separates_linearly_separable_classes() -> None:
    train, y_train = separable(5, 4)
    test, y_test = separable(5, 4, draw=1)
    probe = fit_probe(train, y_train, multilabel=False, cs=(0.01, 1.0, 100.0))
    probs = probe.predict(test)
    assert (probs.argmax(1) == y_test.argmax(1)).all()
    assert np.allclose(probs.sum(1), 1.0) and set(probe.cv_loss) == {0.01, 1.0, 100.0}
    assert probe.n_folds == 5 and probe.cv_score == 1.0 and probe.C == choose_c(probe.cv_loss)


def test_probe_multilabel_one_vs_rest() -> None:
    features, onehot = separable(6, 3)
    targets = onehot.copy()
    targets[:, 2] = np.maximum(targets[:, 2], targets[:, 1])  # class 2 whenever class 1: two labels
    targets = np.concatenate([targets, np.zeros((len(targets), 1), np.float32)], 1)  # a class never seen
    probe = fit_probe(features, targets, multilabel=True, cs=(0.1, 10.0))
    probs = probe.predict(features)
    assert ((probs > 0.5) == (targets > 0.5)).all()
    assert probs[:, 3].max() < 0.2


def test_folds_as_many_as_the_smallest_class_allows() -> None:
    assert cv_folds_allowed(np.eye(3)[[0, 0, 0, 1, 1, 2, 2, 2]], 5) == 2
    assert cv_folds_allowed(np.eye(2)[[0] * 9 + [1] * 9], 5) == 5
    folds = stratified_folds(np.eye(3)[[0, 0, 0, 1, 1, 2]], 3, seed=0)
    assert sorted(np.bincount(folds)) == [2, 2, 2]
    features, targets = separable(4, 3)
    assert fit_probe(features[:-1], targets[:-1], multilabel=False, cs=(0.1, 1.0)).n_folds == 3


def test_c_chosen_is_the_strongest_of_the_tied() -> None:
    assert choose_c({0.01: 0.5, 0.1: 0.5, 1.0: 0.4, 10.0: 0.4}) == 1.0
    assert choose_c({0.01: 0.7, 0.1: 0.5 + 1e-6, 1.0: 0.5, 10.0: 0.6}) == 0.1  # within the tolerance
    # constant features: every C predicts the class prior, all CV losses tie -> the smallest C
    features = [np.ones((1, 4), np.float32) for _ in range(8)]
    probe = fit_probe(features, np.eye(2)[[0, 1] * 4], multilabel=False, cs=(100.0, 1.0, 0.01))
    assert probe.C == 0.01 and len(set(np.round(list(probe.cv_loss.values()), 9))) == 1


def test_one_clip_per_class_gets_the_fixed_c() -> None:
    features, targets = separable(1, 4)
    probe = fit_probe(features, targets, multilabel=False)
    assert probe.n_folds == 0 and probe.C == DEFAULT_C and not probe.cv_loss
    assert (probe.predict(features).argmax(1) == targets.argmax(1)).all()
    assert "fixed" in probe.describe()


def test_crops_trim_and_feature_kinds() -> None:
    assert crop_starts(100, 200, 5) == [0]
    assert crop_starts(300, 100, 3) == [0, 100, 200]
    assert crop_starts(300, 100, 1) == [0]
    assert trim_silence(np.array([0, 0, 1, 0, 2, 0], np.float32)).tolist() == [1, 0, 2]
    assert len(trim_silence(np.zeros(10, np.float32))) == 2
    stored = {"stages": np.arange(12, dtype=np.float32).reshape(1, 12), "sizes": np.array([2, 4, 6]),
              "pre_logits": np.full((1, 3), -1.0, np.float32)}
    assert select_features(stored, "embedding").tolist() == [[6, 7, 8, 9, 10, 11]]
    assert select_features(stored, "layer:1").tolist() == [[2, 3, 4, 5]]
    assert select_features(stored, "layer:-3").tolist() == [[0, 1]]
    assert select_features(stored, "concat").shape == (1, 9)
    with pytest.raises(InputError, match="stages 0 to 2"):
        select_features(stored, "layer:3")
    with pytest.raises(InputError, match="--probe_features 'pooled'"):
        check_feature_kind("pooled")


def tiny_model(head_type: str = "mlp") -> torch.nn.Module:
    torch.manual_seed(0)
    return model_from_config({**TINY, "head_type": head_type}).eval()


def test_head_api_pre_logits_classifier_and_param_groups() -> None:
    model = tiny_model()
    x = torch.randn(2, 1, 64, 50)
    with torch.no_grad():
        features = model.forward_features(x)
        hidden = model.forward_head(features, pre_logits=True)
        assert torch.allclose(model.get_classifier()(hidden), model.forward_head(features), atol=1e-6)
        fast = for_inference(model)
        assert torch.allclose(fast.forward_head(fast.forward_features(x), pre_logits=True), hidden, atol=1e-4)
    groups = model.param_groups(lr=1e-3, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups[0]["lr"] == 1e-3 and groups[0]["params"][0] is model.get_classifier().weight
    assert [g["lr"] for g in groups] == [1e-3 * 0.5 ** k for k in range(len(groups))]
    conv_head = tiny_model("fully_convolutional")
    assert conv_head.forward_head(conv_head.forward_features(x), pre_logits=True).shape == (2, conv_head.embedding_dim)


def write_clips(folder: Path, n: int, seconds: float = 1.0) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"clip{i}.wav")
        sf.write(paths[-1], clip(i % 2, seconds, SR, rng), SR)
    return paths


def dataset(paths: list[Path]) -> AudioFileDataset:
    targets = np.eye(2, dtype=np.float32)[[i % 2 for i in range(len(paths))]]
    return AudioFileDataset(paths, targets, [p.name for p in paths], SR, SR)


def frontend(**overrides) -> AugmentMelSTFT:
    return AugmentMelSTFT(**{"sr": SR, "n_mels": 64, **overrides})


@pytest.mark.parametrize("kind", ["embedding", "hidden", "concat"])
def test_installed_probe_gives_the_probes_logits(tmp_path: Path, kind: str) -> None:
    paths = write_clips(tmp_path / "clips", 6, seconds=2.0)
    model = tiny_model()
    embedder = Embedder(model, frontend(), SR, n_crops=2)
    features = embedder(file_clips(dataset(paths)), kind)
    assert all(f.shape[0] == 2 for f in features)  # 2-s clips, 1-s window: two crops
    probe = fit_probe(features, dataset(paths).targets.numpy(), multilabel=False, cs=(1.0,))
    assert install_probe(model, probe, kind) and model.head_type == {"hidden": "mlp"}.get(kind, kind.replace(
        "embedding", "linear"))
    wave = torch.from_numpy(sf.read(paths[0], dtype="float32")[0][:SR])
    with torch.no_grad():
        logits = model.eval()(frontend().eval()(wave[None]).unsqueeze(1))[0]
    assert torch.allclose(logits[0], torch.from_numpy(features[0][0] @ probe.weight.T + probe.bias), atol=1e-4)
    rebuilt = model_from_config({**TINY, "head_type": model.head_type}, load_pretrained=False)
    rebuilt.load_state_dict(model.state_dict())  # a checkpoint of it loads strictly
    assert not install_probe(model, probe, "layer:2")  # inner-layer probes stay beside the model


def test_embedding_cache_reused_and_invalidated_by_each_key_part(tmp_path: Path) -> None:
    paths = write_clips(tmp_path / "clips", 4)
    cache = tmp_path / "cache"

    def embedder(model=None, window=SR, crops=1, **frontend_settings) -> Embedder:
        return Embedder(model or tiny_model(), frontend(**frontend_settings), window, crops, cache)

    first = embedder()
    features = first(file_clips(dataset(paths)), "concat")
    assert (first.computed, first.reused) == (4, 0)
    again = embedder()  # a new run: same model and settings, other features chosen
    assert all(np.array_equal(a, b) for a, b in zip(again(file_clips(dataset(paths)), "concat"), features))
    assert (again.computed, again.reused) == (0, 4)
    again(file_clips(dataset(paths)), "layer:1")
    assert again.computed == 0
    # the file's size, modification time and path
    sf.write(paths[1], 0.5 * sf.read(paths[1])[0], SR)
    os.utime(paths[1], ns=(0, 123456789))
    os.utime(paths[2], ns=(0, 987654321))
    moved = paths[3].rename(paths[3].with_name("moved.wav"))
    edited = embedder()
    edited(file_clips(dataset([*paths[:3], moved])), "embedding")
    assert (edited.computed, edited.reused) == (3, 1)
    # the frontend's eval settings, the crop settings, the backbone weights: another folder
    others = [embedder(hopsize=160), embedder(fmax=6000), embedder(n_mels=48), embedder(window=SR // 2),
              embedder(crops=2)]
    retrained = tiny_model()
    with torch.no_grad():
        retrained.features[0][0].weight.mul_(2)
    others.append(embedder(retrained))
    folders = {e.cache.folder for e in others}
    assert len(folders) == len(others) and first.cache.folder not in folders
    head_only = tiny_model()  # the final layer is not a feature: same folder
    with torch.no_grad():
        head_only.get_classifier().weight.zero_()
    assert embedder(head_only).cache.folder == first.cache.folder
    assert clear_cache(cache)[0] >= 4 and not list(cache.rglob("*.npz"))


def test_broken_cache_files_and_unwritable_folders_never_stop_a_run(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    paths = write_clips(tmp_path / "clips", 2)
    cache = tmp_path / "cache"
    first = Embedder(tiny_model(), frontend(), SR, cache_root=cache)
    expected = first(file_clips(dataset(paths)), "embedding")
    stored = sorted(first.cache.folder.glob("*.npz"))
    stored[0].write_bytes(stored[0].read_bytes()[:50])  # truncated: BadZipFile
    stored[1].write_bytes(b"")
    again = Embedder(tiny_model(), frontend(), SR, cache_root=cache)
    assert all(np.array_equal(a, b) for a, b in zip(again(file_clips(dataset(paths)), "embedding"), expected))
    assert again.computed == 2 and caplog.text.count("unreadable cached embedding") == 2
    (tmp_path / "a_file").write_text("x")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        for root in (tmp_path / "a_file" / "cache", read_only):
            caplog.clear()
            embedder = Embedder(tiny_model(), frontend(), SR, cache_root=root)
            assert embedder.cache.folder is None or os.geteuid() == 0  # root writes anywhere
            if embedder.cache.folder is None:
                assert "running without a cache" in caplog.text and len(caplog.records) == 1
            assert np.array_equal(embedder(file_clips(dataset(paths)), "embedding")[0], expected[0])
    finally:
        read_only.chmod(0o700)


def test_cache_default_folder_is_outside_the_working_directory(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("EFFICIENTAT_CACHE", str(tmp_path / "eat"))
    assert default_cache_dir() == tmp_path / "eat" / "embeddings"
    monkeypatch.delenv("EFFICIENTAT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "efficientat" / "embeddings"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "efficientat" / "embeddings"
