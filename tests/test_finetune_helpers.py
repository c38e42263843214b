"""Fine-tuning losses, MixStyle, OpenMIC target mixing and the mp3 clip dataset, checked against
values computed here by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets import openmic
from datasets.hdf5 import Mp3HDF5, Mp3HDF5Writer, encode_mp3
from datasets.items import Clip, MaskedClip
from datasets.mp3clips import Mp3ClipDataset
from helpers.training.seeding import seed_everything
from helpers.training.tasks import masked_multilabel_loss, mixstyle, single_label_loss


class Linear(torch.nn.Module):
    """Stand-in model: logits = a fixed linear map of the flattened input."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(features, classes)

    def forward(self, x: torch.Tensor):
        return self.fc(x.flatten(1)), None


def test_single_label_loss_mixes_the_two_cross_entropies() -> None:
    torch.manual_seed(0)
    model, x = Linear(12, 3), torch.randn(5, 1, 3, 4)
    y = F.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float()
    seed_everything(7)
    loss = single_label_loss(0.3)(model, x, Clip(x, None, y))["loss"].detach()
    seed_everything(7)  # the same permutation and weights, drawn as the loss draws them
    perm = torch.randperm(5)
    lam = np.random.beta(0.3, 0.3, 5)
    lam = torch.from_numpy(np.maximum(lam, 1 - lam).astype(np.float32))
    logits = model(lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * x[perm])[0]
    expected = (lam * F.cross_entropy(logits, y.argmax(1), reduction="none")
                + (1 - lam) * F.cross_entropy(logits, y[perm].argmax(1), reduction="none")).mean()
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_masked_loss_ignores_unobserved_labels() -> None:
    torch.manual_seed(0)
    model, x = Linear(6, 2), torch.randn(3, 1, 2, 3)
    relevance = torch.tensor([[0.9, 0.2], [0.1, 0.7], [0.6, 0.6]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    with torch.no_grad():
        loss = masked_multilabel_loss(0.0)(model, x, MaskedClip(x, None, relevance, None, mask))["loss"]
        bce = F.binary_cross_entropy_with_logits(model(x)[0], (relevance > 0.5).float(), reduction="none")
        flipped = torch.where(mask > 0, relevance, 1 - relevance)  # unobserved changed
        loss_flipped = masked_multilabel_loss(0.0)(model, x, MaskedClip(x, None, flipped, None, mask))["loss"]
    assert float(loss) == pytest.approx(float((bce * mask).sum() / 6), rel=1e-6)
    assert float(loss_flipped) == pytest.approx(float(loss))


def test_mixstyle_mixes_per_frequency_statistics() -> None:
    x = torch.randn(4, 1, 8, 50) * torch.arange(1, 9).view(1, 1, 8, 1) + torch.arange(4.0).view(4, 1, 1, 1)
    assert torch.equal(mixstyle(x, 0.0, 0.4), x)
    np.random.seed(0)
    torch.manual_seed(1)
    out = mixstyle(x, 1.0, 0.4)
    torch.manual_seed(1)
    lam = torch.distributions.Beta(0.4, 0.4).sample((4, 1, 1, 1))
    perm = torch.randperm(4)
    mu = x.mean(dim=(1, 3), keepdim=True)
    sigma = (x.var(dim=(1, 3), keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(out.mean(dim=(1, 3), keepdim=True), lam * mu + (1 - lam) * mu[perm])
    torch.testing.assert_close(out.std(dim=(1, 3), keepdim=True), lam * sigma + (1 - lam) * sigma[perm],
                               rtol=1e-4, atol=1e-4)


def test_openmic_mixing_masks_relevances_and_joins_masks() -> None:
    y1, m1, y2, m2 = torch.zeros(20), torch.zeros(20), torch.zeros(20), torch.zeros(20)
    y1[[0, 1]], m1[[0]] = torch.tensor([0.8, 0.9]), 1.0  # class 1 relevant but unobserved
    y2[[0, 2]], m2[[0, 2]] = torch.tensor([0.2, 1.0]), 1.0
    mixed = openmic.mix_targets(MaskedClip(None, "a", y1, 0, m1), MaskedClip(None, "b", y2, 1, m2), 0.75)
    assert mixed["target"][:3].tolist() == pytest.approx([0.75 * 0.8 + 0.25 * 0.2, 0.0, 0.25])
    assert mixed["mask"][:3].tolist() == [1.0, 0.0, 1.0] and mixed["mask"][3:].sum() == 0


@pytest.fixture
def mp3_file(tmp_path: Path) -> Path:
    path = tmp_path / "clips.hdf"
    t = np.arange(3 * 32000) / 32000
    with Mp3HDF5Writer(path, target_width=2, target_dtype=np.float32) as w:
        w.append("long.mp3", encode_mp3((0.3 * np.sin(2 * np.pi * 440 * t) * t / 3).astype(np.float32)),
                 np.array([1.0, 0.0]))
        w.append("broken.mp3", b"not an mp3 at all", np.array([0.0, 1.0]))
        w.append("short.mp3", encode_mp3(np.full(8000, 0.1, dtype=np.float32)), np.array([0.0, 0.5]))
    return path


def test_mp3_clips_crops_and_undecodable_rows(mp3_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    def target(row):
        return np.asarray(row, dtype=np.float32)
    fixed = Mp3ClipDataset(Mp3HDF5(mp3_file), target, clip_samples=32000, crop="fixed", bad_rows="mask")
    first = fixed[0][0]
    assert first.shape == (1, 32000) and torch.equal(fixed[0][0], first)  # the same window every time
    start = Mp3ClipDataset(Mp3HDF5(mp3_file), target, clip_samples=32000, crop="start")[0][0]
    assert float(first.abs().max()) > float(start.abs().max())  # the ramp: a later window is louder
    wave, name, tgt, row = fixed[1]
    assert (name, row, tgt.tolist()) == ("broken.mp3", -1, [0.0, 1.0]) and not wave.any()
    assert "broken.mp3" in caplog.text and "not a decodable mp3" in caplog.text
    training = Mp3ClipDataset(Mp3HDF5(mp3_file), target, clip_samples=32000, crop="random", resample_rate=16000)
    wave, name, tgt, row = training[1]  # replaced by the next decodable row, decimated to 16 kHz
    assert (name, row, tgt.tolist(), wave.shape) == ("short.mp3", 2, [0.0, 0.5], (1, 16000))
    whole = Mp3ClipDataset(Mp3HDF5(mp3_file), target, clip_samples=None)
    assert whole[0][0].shape[1] >= 3 * 32000  # full clip (plus the mp3 codec's padding)
