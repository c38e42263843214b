"""The eval-only fast paths (models/fast.py, the families' twins, models/frontend_twins.py): same
outputs as the plain eval models and frontend."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from models import fast
from models.dymn.model import get_model as get_dymn
from models.ensemble import EnsembleModel
from models.factory import FAMILIES, create_model
from models.family import Family
from models.fast import check_precision
from models.frontend_twins import FastMelFrontend
from models.mn.block_types import InvertedResidual
from models.mn.fast import FastInvertedResidual
from models.mn.model import get_model as get_mn
from models.preprocess import AugmentMelSTFT
from models.runtime import for_inference
from tests.conftest import REPO, shared_path

TOLERANCE = 1e-4


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere plus non-trivial batch-norm statistics (folding must use them),
    scaled so that logits are of order one; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features ** 0.5)
    return model.eval()


def smallest_name(family: Family) -> str:
    """The family's released architecture of the smallest width (AudioSet taggers first)."""
    entries = [e for e in family.entries if e.audioset] or list(family.entries)
    if not entries:
        pytest.skip(f"family {family.name} has no registry rows")
    return min(entries, key=lambda e: e.model_kwargs.get("width_mult", 1.0)).name


def family_model(family: Family, num_classes: int = 10) -> torch.nn.Module:
    """The family's smallest released architecture with random weights (`randomize`), in eval mode."""
    torch.manual_seed(0)
    return randomize(create_model(smallest_name(family), num_classes=num_classes, pretrained=False))


EACH_FAMILY = pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))


def assert_same_outputs(model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x)
        got = for_inference(model)(x)
    assert expected[0].abs().max() > 0.01 # the comparison is not between near-zero values
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32 and g.shape == e.shape
        assert (g - e).abs().max() <= TOLERANCE


@pytest.mark.parametrize("kwargs, batch", [
    ({"width_mult": 0.4}, 1),
    ({"width_mult": 0.4}, 3),
    ({"width_mult": 1.0, "head_type": "fully_convolutional", "strides": (2, 2, 1, 1)}, 2),
    ({"width_mult": 0.2, "head_type": "multihead_attention_pooling", "se_dims": "cf", "se_agg": "avg"}, 3),
    ({"width_mult": 0.3, "se_dims": "tf", "strides": (2, 1, 2, 1), "input_dim_t": 50}, 2),
    ({"width_mult": 0.5, "se_dims": "none", "reduced_tail": True, "dilated": True}, 1),
])
def test_fast_mn_matches_plain_eval_model(kwargs, batch):
    model = randomize(get_mn(num_classes=20, **kwargs))
    assert_same_outputs(model, torch.randn(batch, 1, 128, kwargs.get("input_dim_t", 64)))


@pytest.mark.parametrize("kwargs, batch", [
    ({"width_mult": 0.4}, 1),
    ({"width_mult": 0.4}, 3),
    ({"width_mult": 1.0, "head_type": "fully_convolutional", "strides": (2, 2, 1, 1)}, 1),
    ({"width_mult": 0.3, "use_dy_blocks": "replace_se"}, 2),
    ({"width_mult": 0.2, "no_dyconv": True, "no_dyrelu": True, "no_ca": True}, 2),
    ({"width_mult": 0.2, "dyrelu_k": 3, "dyconv_k": 2}, 2),
])
def test_fast_dymn_matches_plain_eval_model(kwargs, batch):
    model = randomize(get_dymn(num_classes=20, **kwargs))
    model.update_params(5)  # a temperature other than 1
    assert_same_outputs(model, torch.randn(batch, 1, 128, 48))


def test_feature_maps_match_and_original_is_untouched():
    model = randomize(get_dymn(width_mult=0.4, num_classes=10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast_model = for_inference(model)
    x = torch.randn(2, 1, 128, 64)
    with torch.no_grad():
        _, expected = model(x, return_fmaps=True)
        _, got = fast_model(x, return_fmaps=True)
    assert len(got) == len(expected) == 17
    for e, g in zip(expected, got):
        assert (g - e).abs().max() <= TOLERANCE
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training is False and not any(p.requires_grad is False for p in model.parameters())


class ScaledInvertedResidual(InvertedResidual):
    """A subclass computing something else: the fast path must not take it for its parent."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(x)


def test_stage_without_a_twin_runs_folded_and_unchanged(caplog):
    model = randomize(get_mn(width_mult=0.4, num_classes=20))
    model.features[4].__class__ = ScaledInvertedResidual  # a subclassed block
    channels = model.features[7].out_channels
    model.features.insert(8, torch.nn.Sequential(  # a new kind of stage: conv, norm, activation
        torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False), torch.nn.BatchNorm2d(channels),
        torch.nn.ReLU()))
    randomize(model.features[8])
    with caplog.at_level("INFO", logger="models.fast"):
        assert_same_outputs(model, torch.randn(2, 1, 128, 64))
    assert "ScaledInvertedResidual has no fast twin" in caplog.text and "Sequential has no fast twin" in caplog.text
    fast_model = for_inference(model)
    assert isinstance(fast_model.blocks[4], fast.FoldedStage) and isinstance(fast_model.blocks[3], FastInvertedResidual)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast_model.blocks[8].modules())  # folded


def test_for_inference_takes_an_ensemble_and_leaves_other_models():
    members = [randomize(get_mn(width_mult=0.1, num_classes=5), seed) for seed in (0, 1)]
    ensemble = EnsembleModel(members).eval()
    fast_ensemble = for_inference(ensemble)
    assert all(isinstance(m, fast.FastTagger) for m in fast_ensemble.models)
    x = torch.randn(2, 1, 128, 32)
    with torch.no_grad():
        assert (fast_ensemble(x)[0] - ensemble(x)[0]).abs().max() <= TOLERANCE
    other = torch.nn.Linear(3, 3).train()  # e.g. an ONNX model, fast by itself
    assert for_inference(other) is other and not other.training


def test_frontend_twins_take_the_originals_settings():
    frontend = AugmentMelSTFT(n_mels=64, hopsize=160, fmin=20.0, fmax=15000.0, fmax_aug_range=1)
    assert frontend.eval_settings() == {"n_mels": 64, "sr": 32000, "win_length": 800, "hopsize": 160,
                                        "n_fft": 1024, "fmin": 20.0, "fmax": 15000.0}
    assert AugmentMelSTFT(**frontend.settings()).settings() == frontend.settings()
    assert FastMelFrontend(frontend).eval_settings() == frontend.eval_settings()
    assert AugmentMelSTFT().eval_settings()["fmax"] == 15000  # the default fmax, resolved


def test_fast_model_is_eval_only():
    fast_model = for_inference(get_mn(width_mult=0.1))
    assert not fast_model.training and not any(p.requires_grad for p in fast_model.parameters())
    with pytest.raises(RuntimeError, match="eval-only"):
        fast_model.train()
    fast_model.eval()  # allowed
    with pytest.raises(RuntimeError, match="eval-only"):
        FastMelFrontend(AugmentMelSTFT()).train()


def float64_log_mel(frontend: AugmentMelSTFT, x: torch.Tensor) -> torch.Tensor:
    """The eval frontend's math in float64: the reference both float32 frontends are held to."""
    x = x.double()
    x = x[:, 1:] - 0.97 * x[:, :-1]
    length = x.shape[-1]
    if length <= frontend.n_fft // 2:
        x = torch.nn.functional.pad(x, (0, frontend.n_fft // 2 + 1 - length))
    spec = torch.stft(x, frontend.n_fft, frontend.hopsize, frontend.win_length, frontend.window.double(),
                      center=True, pad_mode="reflect", return_complex=True)[..., :1 + length // frontend.hopsize]
    mel = frontend.mel_basis.double() @ spec.abs().square()
    return ((mel + 0.00001).log() + 4.5) / 5.0


@pytest.mark.parametrize("settings", [{}, {"n_mels": 64}, {"hopsize": 160, "n_mels": 40},
                                      {"win_length": 640, "n_fft": 1024, "fmin": 50.0, "fmax": 8000.0},
                                      {"win_length": 1024, "n_mels": 200}])
@pytest.mark.parametrize("length", [2, 300, 513, 32000 + 17])
def test_fast_frontend_matches_augment_mel_stft(settings, length):
    frontend = AugmentMelSTFT(**settings).eval()
    x = torch.randn(3, length, generator=torch.Generator().manual_seed(length)) * 0.1
    with torch.no_grad():
        expected = frontend(x)
        got = FastMelFrontend(frontend)(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= TOLERANCE
    # about as accurate as the plain frontend (both differ from float64 by a few 1e-5 in the quietest bands)
    truth = float64_log_mel(frontend, x)
    assert (expected.double() - truth).abs().max() <= 1e-4
    assert (got.double() - truth).abs().max() <= 2 * (expected.double() - truth).abs().max() + 1e-5


def test_fast_frontend_rejects_bad_input():
    with pytest.raises(ValueError, match="batch, samples"):
        FastMelFrontend(AugmentMelSTFT())(torch.zeros(10))


def test_released_mn04_fast_path_matches_plain(mn04_checkpoint):
    model = get_mn(pretrained_name="mn04_as").eval()
    frontend = AugmentMelSTFT().eval()
    waveform = torch.from_numpy(np.load(shared_path("golden", "metro_32k.npy"))).unsqueeze(0)
    with torch.no_grad():
        logits, embedding = model(frontend(waveform).unsqueeze(1))
        fast_logits, fast_embedding = for_inference(model)(FastMelFrontend(frontend)(waveform).unsqueeze(1))
    assert (fast_logits - logits).abs().max() <= TOLERANCE
    assert (fast_embedding - embedding).abs().max() <= TOLERANCE


def test_precision_names_and_bf16_without_cpu_support(monkeypatch):
    assert check_precision("fp32") is torch.float32
    with pytest.raises(ValueError, match="fp32, bf16"):
        check_precision("fp16")
    monkeypatch.setattr(fast, "bf16_supported", lambda: False)
    with pytest.raises(RuntimeError, match="no native bfloat16"):
        for_inference(get_mn(width_mult=0.1), "bf16")


@EACH_FAMILY
def test_bf16_path_close_to_fp32(family, monkeypatch):
    monkeypatch.setattr(fast, "bf16_supported", lambda: True)  # runs emulated where unsupported
    model = family_model(family)
    x = torch.randn(2, 1, 128, 40)
    with torch.no_grad():
        logits, embedding = model(x)
        bf_logits, bf_embedding = for_inference(model, "bf16")(x)
    assert bf_logits.dtype == torch.float32 and bf_embedding.shape == embedding.shape
    assert (bf_logits - logits).abs().max() <= 0.05 * logits.abs().max()


def test_taggers_use_the_fast_path_on_the_cpu(mn04_checkpoint):
    from helpers.inference.resolve import RuntimeConfig, resolve_model

    tagger = resolve_model("mn04_as")
    assert isinstance(tagger.model, fast.FastTagger) and isinstance(tagger.frontend, FastMelFrontend)
    plain = resolve_model("mn04_as", RuntimeConfig(fast=False))
    assert type(plain.model).__name__ == "MN" and type(plain.frontend) is AugmentMelSTFT
    waveform = torch.from_numpy(np.load(shared_path("golden", "metro_32k.npy")))[None]
    assert np.abs(tagger.predict(waveform) - plain.predict(waveform)).max() <= TOLERANCE
    assert for_inference(tagger.model) is tagger.model
    ensemble = resolve_model(["mn04_as", "mn04_as"])
    assert all(isinstance(m, fast.FastTagger) for m in ensemble.model.models)
    assert np.abs(ensemble.predict(waveform) - plain.predict(waveform)).max() <= TOLERANCE


def test_inference_precision_flag(mn04_checkpoint):
    demo = REPO / "resources" / "demo_bells.wav"
    result = subprocess.run([sys.executable, "inference.py", "--model_name", "mn04_as", "--audio_path", str(demo),
                             "--precision", "bf16", "--top_k", "5"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    if fast.bf16_supported():
        assert result.returncode == 0, result.stderr
        assert {line.split(":")[0] for line in result.stdout.splitlines()[1:3]} == {"Clang", "Ding"}
    else:
        assert result.returncode == 2 and "no native bfloat16" in result.stderr


@pytest.mark.parametrize("make", [pytest.param(lambda f=f: family_model(f), id=name) for name, f in FAMILIES.items()]
                         + [pytest.param(lambda: randomize(get_mn(num_classes=10, width_mult=0.3, se_dims="cf")),
                                         id="mn-se-cf")])
def test_fused_convolutions_match(make, monkeypatch):
    """Large layers run as oneDNN convolutions with the activation fused; forced for every layer here."""
    monkeypatch.setattr(fast, "FUSED_MIN_OUTPUTS", 0)
    assert_same_outputs(make(), torch.randn(2, 1, 128, 48))


def test_narrow_pointwise_paths_match():
    """1x1 convolutions: oneDNN conv (narrow), matrix product (wide), per-sample weights (bmm)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 24, 8, 10, generator=gen).to(memory_format=torch.channels_last)
    for out_channels, in_channels in ((8, 24), (32, 24)):
        conv = torch.nn.Conv2d(in_channels, out_channels, 1)
        expected = conv(x)
        got = fast.pointwise(x, conv.weight.flatten(1), conv.bias)
        assert (got - expected).abs().max() <= 1e-5 and got.is_contiguous(memory_format=torch.channels_last)
        per_sample = torch.randn(3, out_channels, in_channels, generator=gen)
        got = fast.pointwise(x, per_sample, conv.bias)
        for i in range(3):
            expected = torch.nn.functional.conv2d(x[i:i + 1], per_sample[i, :, :, None, None], conv.bias)
            assert (got[i:i + 1] - expected).abs().max() <= 1e-5


def test_fast_path_keeps_freed_memory_on_glibc():
    import platform

    for_inference(get_mn(width_mult=0.1))
    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert fast.keep_freed_memory() is expected
