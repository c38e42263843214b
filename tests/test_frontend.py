"""Mel frontend: parity with the original's spectrograms, filterbank math, train-mode augmentation."""
import contextlib
import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import models.preprocess as preprocess
from models.preprocess import AugmentMelSTFT, kaldi_mel_banks
from tests.conftest import expect_path, shared_path

FRONTENDS = ["default", "mels_40", "mels_64", "mels_256", "hop_5", "hop_15", "hop_25"]


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(expect_path("frontend.npz")) as data:
        return dict(data)


@pytest.fixture(scope="module")
def metro(expected: dict[str, np.ndarray]) -> torch.Tensor:
    """0.3 s of the metro clip (committed in tests/expect/)."""
    return torch.from_numpy(expected["waveform"]).unsqueeze(0)


def test_eval_spectrograms_match_original():
    """The whole metro clip through all seven frontends (../shared; every clone checks the
    committed excerpt below)."""
    metro = torch.from_numpy(np.load(shared_path("golden", "metro_32k.npy"))).unsqueeze(0)
    frontends = json.loads(shared_path("golden", "meta.json").read_text())["frontends"]
    assert sorted(frontends) == sorted(FRONTENDS)
    for name in FRONTENDS:
        expected = np.load(shared_path("golden", f"mel_{name}.npy"))
        with torch.no_grad():
            out = AugmentMelSTFT(**frontends[name]["kwargs"]).eval()(metro).numpy()
        assert out.shape == expected.shape, name
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("name", FRONTENDS)
def test_excerpt_spectrogram_matches_original(name, metro, expected):
    """In every clone: the original's frames of a committed excerpt (tests/expect/)."""
    kwargs = json.loads(expect_path("frontends.json").read_text())[name]
    with torch.no_grad():
        out = AugmentMelSTFT(**kwargs).eval()(metro)[0].numpy()
    first, frames = int(expected[f"{name}_first"]), expected[name]
    np.testing.assert_allclose(out[:, first:first + frames.shape[1]], frames, rtol=0, atol=1e-4)


def test_frame_count_formula():
    fe = AugmentMelSTFT(hopsize=480).eval()
    for length in (2, 479, 480, 481, 32000, 320000):
        out = fe(torch.zeros(1, length) + 0.01)
        assert out.shape == (1, 128, fe.num_frames(length)) == (1, 128, 1 + (length - 1) // 480)


def test_kaldi_filterbank_properties():
    banks = kaldi_mel_banks(128, 1024, 32000, 0.0, 15000.0)
    assert banks.shape == (128, 513) and banks.dtype == torch.float32
    assert torch.all(banks[:, 0] == 0) and torch.all(banks[:, 512] == 0)  # DC and Nyquist unused
    assert banks.max() <= 1.0 and banks.min() == 0.0
    nonzero = torch.nonzero(banks.sum(0)).flatten()
    assert nonzero.min().item() == 1 and nonzero.max().item() == 480  # 480 * 31.25 Hz = 15 kHz
    # band centres: about 17.08 Hz for band 0 and 14626 Hz for band 127 (mel = 1127 ln(1 + f/700))
    mel = lambda f: 1127 * np.log(1 + f / 700)
    centers = 700 * (np.exp((mel(0) + np.arange(1, 129) * (mel(15000) - mel(0)) / 129) / 1127) - 1)
    assert centers[0] == pytest.approx(17.08, abs=0.01) and centers[-1] == pytest.approx(14626, abs=1)
    with pytest.raises(ValueError):
        kaldi_mel_banks(3, 1024, 32000, 0.0, 15000.0)
    with pytest.raises(ValueError):
        kaldi_mel_banks(64, 1024, 32000, 16000.0, 15000.0)


def test_eval_mode_builds_the_filterbank_once(monkeypatch, metro):
    fe = AugmentMelSTFT().eval()
    calls = []
    monkeypatch.setattr(preprocess, "kaldi_mel_banks", lambda *a: calls.append(a))
    fe(metro[:, :32000])
    fe(metro[:, :32000])
    assert calls == []


def test_eval_mode_is_deterministic_and_leaves_rng_alone(metro):
    fe = AugmentMelSTFT().eval()
    torch.manual_seed(0)
    a = fe(metro[:, :64000])
    state = torch.get_rng_state()
    b = fe(metro[:, :64000])
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())


def test_train_mode_jitters_band_edges(monkeypatch, metro):
    seen = []
    real = preprocess.mel_banks
    monkeypatch.setattr(preprocess, "mel_banks",
                        lambda n, nfft, sr, fmin, fmax: seen.append((float(fmin), float(fmax)))
                        or real(n, nfft, sr, fmin, fmax))
    fe = AugmentMelSTFT(freqm=0, timem=0).train()
    torch.manual_seed(1)
    for _ in range(200):
        fe(metro[:, :3200])
    fmins, fmaxs = np.array(seen).T
    assert fmins.min() >= 0 and fmins.max() <= 9 and len(set(fmins)) > 5
    assert fmaxs.min() >= 14001 and fmaxs.max() <= 16000 and len(set(fmaxs)) > 100
    # with aug ranges of 1 the train output equals the eval output
    fixed = AugmentMelSTFT(freqm=0, timem=0, fmin_aug_range=1, fmax_aug_range=1)
    assert torch.allclose(fixed.train()(metro[:, :32000]), fixed.eval()(metro[:, :32000]))


def test_train_mode_keeps_the_draws_on_the_device(monkeypatch):
    """On the meta device any host value (.item(), a CPU-built filterbank or mask) fails or shows."""
    class DeviceLog(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.host_ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            if any(t.device.type == "cpu" for t in tensors):
                self.host_ops.append(str(func))
            return out

    monkeypatch.setattr(torch, "autocast", lambda **kwargs: contextlib.nullcontext())  # no meta autocast
    fe = AugmentMelSTFT(freqm=48, timem=192).to("meta").train()
    with DeviceLog() as log:
        out = fe(torch.zeros(4, 32000, device="meta"))
    assert out.shape == (4, 128, 100) and log.host_ops == []
    # the draws come from the generator of the input's device, in the order they always had
    fe = AugmentMelSTFT(freqm=0, timem=0).train()
    torch.manual_seed(3)
    fmin, fmax = torch.randint(10, (1,)).item(), 1000 - torch.randint(2000, (1,)).item()
    torch.manual_seed(3)
    out = fe(torch.ones(1, 3200))
    banks = kaldi_mel_banks(128, 1024, 32000, float(fmin), 15000.0 + fmax)
    monkeypatch.setattr(preprocess, "mel_banks", lambda *args: banks)
    torch.testing.assert_close(fe(torch.ones(1, 3200)), out, rtol=0, atol=0)


def test_train_masks_are_iid_and_within_bounds():
    torch.manual_seed(0)
    freqm, timem, batch = 48, 192, 64
    fe = AugmentMelSTFT(freqm=freqm, timem=timem, fmin_aug_range=1, fmax_aug_range=1).train()
    x = torch.randn(batch, 32000 * 5) * 0.1  # 501 frames
    out = fe(x)
    masked = out == 0.9  # log-domain 0 -> (0 + 4.5) / 5
    freq_rows = masked.all(dim=2)  # (B, n_mels): mel rows masked in every frame
    time_cols = masked.all(dim=1)  # (B, T): frames masked in every mel band
    freq_widths = freq_rows.sum(1)
    time_widths = time_cols.sum(1)
    assert freq_widths.max() < freqm and time_widths.max() < timem
    for b in range(batch):  # each mask is one contiguous band
        for row in (freq_rows[b], time_cols[b]):
            idx = torch.nonzero(row).flatten()
            if len(idx):
                assert idx[-1] - idx[0] + 1 == len(idx)
    # independent per example: widths and positions vary across the batch
    assert len(set(freq_widths.tolist())) > 10 and len(set(time_widths.tolist())) > 10
    starts = [torch.nonzero(r).flatten()[0].item() for r in freq_rows if r.any()]
    assert len(set(starts)) > 10
    # widths roughly uniform on [0, max): means near (max - 1) / 2
    assert abs(freq_widths.float().mean().item() - (freqm - 1) / 2) < 8
    assert abs(time_widths.float().mean().item() - (timem - 1) / 2) < 30


def test_masking_is_off_in_eval_mode():
    x = torch.randn(4, 32000) * 0.1
    fe = AugmentMelSTFT(freqm=48, timem=192).eval()
    assert not (fe(x) == 0.9).all(dim=2).any()


def test_bad_arguments():
    with pytest.raises(ValueError):
        AugmentMelSTFT(fmin_aug_range=0)
    with pytest.raises(ValueError):
        AugmentMelSTFT(win_length=2048)
    with pytest.raises(ValueError):
        AugmentMelSTFT().eval()(torch.zeros(2, 1, 1000))
