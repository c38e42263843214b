"""One of each: the model-reference resolver, the state-dict loader, the resampler and the
commands' exit status (helpers/inference/resolve.py, models/weights.py, datasets/audio.py,
common/errors.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soxr
import torch

from common.errors import InputError, exit_status
from datasets.audio import Resampler, resample
from helpers.inference.resolve import BACKENDS, ModelRef, RuntimeConfig, load_network, resolve_model
from models.checkpoint import model_from_weights
from models.config import FrontendConfig, ModelConfig
from models.dymn.model import get_model as get_dymn
from models.factory import model_config
from models.mn.model import get_model as get_mn
from models.pretrained import DEFAULT_MODEL, REGISTRY
from models.weights import load_weights


@pytest.mark.parametrize("given, kind, label", [
    ("mn04_as", "registry", "mn04_as"),
    (["mn04_as", "mn10_as"], "ensemble", "ensemble(mn04_as, mn10_as)"),
    (("mn04_as",), "ensemble", "ensemble(mn04_as)"),
    ("runs/x/best.pt", "checkpoint", "runs/x/best.pt"),
    (Path("weights.pt"), "checkpoint", "weights.pt"),
    ("model.ONNX", "onnx", "model.ONNX"),
    ("mn04_sa", "registry", "mn04_sa"),  # unknown: loading it names the close ones
])
def test_one_rule_says_what_a_reference_is(given, kind, label):
    ref = ModelRef.parse(given)
    assert (ref.kind, ref.label) == (kind, label)
    assert ModelRef.parse(ref) is ref


def test_the_default_model_is_the_shipped_one():
    assert DEFAULT_MODEL == "mn04_as" and REGISTRY[DEFAULT_MODEL].sha256
    assert (Path(__file__).parents[1] / "resources" / REGISTRY[DEFAULT_MODEL].filename).is_file()


def test_every_reference_of_one_model_gives_its_numbers(mn04_checkpoint: Path, labels_file: Path, tmp_path: Path):
    waves = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, (2, 32000)).astype(np.float32))
    named = resolve_model("mn04_as")
    expected = named.predict(waves)
    assert named.name == "mn04_as" and len(named.class_names) == 527 and named.class_ids[0].startswith("/m/")
    np.testing.assert_allclose(resolve_model(["mn04_as"]).predict(waves), expected, atol=1e-6)
    # the released file as a bare state dict, in its registry architecture or in the flags' one
    for arch in (ModelConfig("mn04_as", pretrained=True), ModelConfig("mn04_as", width=0.4)):
        loaded = resolve_model(mn04_checkpoint, arch=arch)
        np.testing.assert_allclose(loaded.predict(waves), expected, atol=1e-6)
    plain = resolve_model("mn04_as", RuntimeConfig(fast=False))
    assert type(plain.model).__name__ == "MN"
    np.testing.assert_allclose(plain.predict(waves), expected, atol=1e-4)


def test_frontend_settings_other_than_the_shape_are_passed_on(mn04_checkpoint: Path, labels_file: Path):
    loaded = resolve_model("mn04_as", frontend=FrontendConfig(fmin=50.0, fmax=14000.0))
    assert (loaded.frontend.fmin, loaded.frontend.fmax) == (50.0, 14000.0)
    with pytest.raises(ValueError, match="mn04_as was trained with n_fft=1024, not 2048"):
        resolve_model("mn04_as", frontend=FrontendConfig(n_fft=2048))


def test_a_bare_state_dict_needs_an_architecture_that_fits(mn04_checkpoint: Path, labels_file: Path):
    with pytest.raises(InputError, match="not a checkpoint of a training script"):
        load_network(ModelRef.parse(mn04_checkpoint))
    with pytest.raises(InputError) as error:
        load_network(ModelRef.parse(mn04_checkpoint), ModelConfig("mn10_as", width=1.0))
    assert str(error.value).startswith(f"{mn04_checkpoint} does not fit mn10_as of width 1 (0 missing, 0 unexpected, ")
    assert "\n" not in str(error.value)


def test_backends_are_checked_and_onnx_runs_on_onnxruntime(mn04_checkpoint: Path):
    assert set(BACKENDS) >= {"torch", "onnxruntime"}
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        resolve_model("mn04_as", RuntimeConfig(backend="tpu"))
    with pytest.raises(ValueError, match="onnxruntime runs an ONNX file"):
        resolve_model("mn04_as", RuntimeConfig(backend="onnxruntime"))
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_model("mn04_as", RuntimeConfig(precision="fp8"))


def test_state_dict_loader_sizes_the_classifier_and_names_what_does_not_fit():
    source = get_mn(num_classes=10, width_mult=0.1)
    target = get_mn(width_mult=0.1)  # 527 classes
    assert load_weights(target, source.state_dict(), "a.pt", "mn01") == 10 and target.num_classes == 10
    torch.testing.assert_close(target.state_dict(), source.state_dict())
    with pytest.raises(ValueError) as error:
        load_weights(get_mn(width_mult=0.2), source.state_dict(), "a.pt", "mn02", hint=": try again")
    message = str(error.value)
    assert message.startswith("a.pt does not fit mn02 (28 missing, 10 unexpected, ") and message.endswith(": try again")
    assert "e.g. missing features." in message and "\n" not in message
    with pytest.raises(ValueError, match="b.pt does not hold a state dict"):
        load_weights(target, {"x": 1}, "b.pt", "mn01")


def test_dymn_weights_run_at_the_temperature_of_a_trained_model():
    state = get_dymn(width_mult=0.4).state_dict()
    config = model_config("dymn04_as", 527, pretrained=False, width_mult=0.4)  # a fresh run starts at 30
    assert config["T_max"] == 30.0
    model = model_from_weights(state, config, "d.pt", "dymn04")
    assert {round(float(m.temperature), 6) for m in model.modules() if hasattr(m, "temperature")} == {1.0}


def test_one_resampler_whatever_the_blocks():
    x = np.random.default_rng(1).standard_normal(44100 * 2).astype(np.float32)
    whole = soxr.resample(x, 44100, 32000, quality="HQ").astype(np.float32)
    np.testing.assert_array_equal(resample(x, 44100, 32000), whole)
    resampler = Resampler(44100, 32000)
    parts = [resampler(x[:1000]), resampler(x[1000:50001]), resampler(x[50001:], last=True)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    same = Resampler(32000, 32000)
    assert np.shares_memory(same(x), x) and len(same(np.zeros(0, np.float32), last=True)) == 0


@pytest.mark.parametrize("done, failed, signum, status", [
    (3, 0, None, 0), (2, 1, None, 1), (0, 3, None, 2), (0, 0, None, 2), (1, 0, 2, 130), (0, 0, 15, 143)])
def test_one_exit_status_for_every_command(done, failed, signum, status):
    assert exit_status(done, failed, signum) == status
