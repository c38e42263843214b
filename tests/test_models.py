"""MN and DyMN: key/shape parity with the original, golden outputs, options the original lacks."""
import gzip
import json

import numpy as np
import pytest
import torch

from models.dymn.dy_block import DynamicConv
from models.dymn.model import context_size, get_model as get_dymn
from models.layers import make_divisible
from models.mn.model import get_model as get_mn
from models.preprocess import AugmentMelSTFT
from tests.conftest import expect_path, shared_path
from tests.expect.derive import outputs, seeded_mn, seeded_state


def golden(name: str) -> np.ndarray:
    return np.load(shared_path("golden", name))


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads(shared_path("golden", "meta.json").read_text())


@pytest.fixture(scope="module")
def random_input() -> torch.Tensor:
    return torch.from_numpy(golden("random_input.npy"))


def test_make_divisible():
    assert make_divisible(184 * 0.6) == 112  # 110.39999... rounds to the nearest multiple of 8
    assert make_divisible(16 * 0.1) == 8  # minimum 8
    assert make_divisible(12) == 16  # ties go up
    assert make_divisible(1280 * 0.4) == 512
    assert make_divisible(40 * 0.5) == 24 and make_divisible(10.0) == 16  # 8 < 0.9 * 10 -> +8


def test_random_weights_reproduce_original_outputs(meta, random_input):
    """The original's random-weight configurations with their golden weights (../shared; every
    clone checks the seeded ones below)."""
    for config in ["mn01_mlp", "mn02_fc_s2221", "mn01_mhap", "dymn04"]:
        spec = meta["random"][config]
        build = get_dymn if spec["constructor"] == "dymn" else get_mn
        model = build(**spec["kwargs"]).eval()
        state = torch.load(shared_path("golden", f"random_{config}.pt"), map_location="cpu", weights_only=True)
        assert list(model.state_dict()) == list(state), config  # same keys, same order
        model.load_state_dict(state)  # strict
        with torch.no_grad():
            logits, embedding = model(random_input)
        np.testing.assert_allclose(logits.numpy(), golden(f"random_{config}_logits.npy"), rtol=0, atol=1e-5)
        np.testing.assert_allclose(embedding.numpy(), golden(f"random_{config}_embedding.npy"), rtol=0, atol=1e-5)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
            spec["params"] if spec["constructor"] == "mn" else 1961239)


@pytest.fixture(scope="module")
def expected_outputs() -> dict[str, np.ndarray]:
    with np.load(expect_path("models.npz")) as data:
        return dict(data)


@pytest.mark.parametrize("config", ["mn01_mlp", "mn02_fc_s2221", "mn01_mhap"])
def test_seeded_weights_reproduce_original_outputs(config, expected_outputs):
    """In every clone (tests/expect/): the original's random weights are torch.manual_seed(1) and
    the constructor, plus committed batch-norm statistics."""
    spec = json.loads(expect_path("random_models.json").read_text())[config]
    model = seeded_mn(spec)
    stats = {k.split("/", 1)[1]: torch.from_numpy(v) for k, v in expected_outputs.items()
             if k.startswith(f"{config}/") and k.rsplit(".", 1)[-1] in ("running_mean", "running_var")}
    assert stats and set(stats) < set(model.state_dict())
    model.load_state_dict({**model.state_dict(), **stats})
    logits, embedding = outputs(model)
    np.testing.assert_allclose(logits, expected_outputs[f"{config}/logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(embedding, expected_outputs[f"{config}/embedding"], rtol=0, atol=1e-5)


def test_seeded_dymn_outputs_are_unchanged(expected_outputs):
    """In every clone: DyMN (checked against the original where tests/expect/ was derived) with
    weights drawn per key gives the committed outputs."""
    model = get_dymn(width_mult=0.4, T_max=1.0)
    model.load_state_dict(seeded_state(model))
    logits, embedding = outputs(model)
    np.testing.assert_allclose(logits, expected_outputs["dymn04_seeded/logits"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(embedding, expected_outputs["dymn04_seeded/embedding"], rtol=0, atol=1e-5)


def _shape_table_configs():
    with gzip.open(expect_path("state_dict_shapes.json.gz")) as f:
        return sorted(json.load(f).items())


@pytest.mark.parametrize("key", ["mn_w0.1_mlp", "mn_w0.2_mlp", "mn_w0.4_mlp", "mn_w0.5_mlp", "mn_w1.0_mlp",
                                 "mn_w2.0_mlp", "mn_w3.0_mlp", "mn_w4.0_mlp", "mn_w1.0_fully_convolutional",
                                 "dymn_w0.4", "dymn_w1.0", "dymn_w2.0", "dymn_w0.4_replace_se"])
def test_state_dict_keys_and_shapes_match_original(key):
    expected = dict(_shape_table_configs())[key]
    width = float(key.split("_")[1][1:])
    if key.startswith("dymn"):
        model = get_dymn(width_mult=width, use_dy_blocks="replace_se" if "replace_se" in key else "all")
    else:
        model = get_mn(width_mult=width, head_type=key.split("_", 2)[2])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected


def test_released_checkpoint_reproduces_original_logits(mn04_checkpoint):
    model = get_mn(pretrained_name="mn04_as").eval()
    waveform = torch.from_numpy(golden("metro_32k.npy")).unsqueeze(0)
    with torch.no_grad():
        logits, embedding = model(AugmentMelSTFT().eval()(waveform).unsqueeze(1))
    np.testing.assert_allclose(logits.numpy(), golden("mn04_as_metro_logits.npy"), rtol=0, atol=1e-4)
    np.testing.assert_allclose(embedding.numpy(), golden("mn04_as_metro_embedding.npy"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("se_dims", ["f", "t", "cf", "ft", "cft"])
@pytest.mark.parametrize("se_agg", ["max", "avg", "add", "min"])
def test_frequency_and_time_squeeze_excitation_work(se_dims, se_agg):
    # the original crashes for any se_dims containing 'f'; ours rescales along frequency
    model = get_mn(width_mult=0.1, se_dims=se_dims, se_agg=se_agg, input_dim_f=128, input_dim_t=200).eval()
    with torch.no_grad():
        logits, embedding = model(torch.randn(2, 1, 128, 200))
    assert logits.shape == (2, 527) and embedding.shape == (2, 96)
    assert torch.isfinite(logits).all()
    se = model.features[4].block[1]  # block 4 at width 0.1: no expansion conv, SE is child 1
    sizes = {"c": 8, "f": 16, "t": 25}  # 128x200 -> stem 64x100 -> 32x50 -> 16x25
    assert [layer.fc1.in_features for layer in se.conc_se_layers] == [sizes[d] for d in se_dims]


def test_frequency_se_rescales_along_frequency():
    from models.mn.block_types import SqueezeExcitation
    se = SqueezeExcitation(size=6, squeeze_size=8, dim=2).eval()
    x = torch.randn(2, 3, 6, 5)
    scale = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean(dim=(1, 3))))))  # (B, F)
    torch.testing.assert_close(se(x), x * scale[:, None, :, None])


def test_return_fmaps_and_batch_of_one():
    for model in (get_mn(width_mult=0.4).eval(), get_dymn(width_mult=0.4).eval()):
        x = torch.randn(1, 1, 128, 100)
        with torch.no_grad():
            logits, embedding = model(x)
            logits2, fmaps = model(x, return_fmaps=True)
        assert logits.shape == (1, 527) and embedding.shape == (1, 384)
        assert len(fmaps) == 17 and fmaps[-1].shape[1] == 384
        torch.testing.assert_close(fmaps[-1].mean(dim=(2, 3)), embedding)
        torch.testing.assert_close(logits, logits2)


def test_strides_set_the_final_resolution():
    for strides, size in (((2, 2, 2, 2), (4, 32)), ((2, 2, 2, 1), (8, 63)), ((2, 2, 1, 1), (16, 125))):
        model = get_mn(width_mult=0.1, strides=strides, head_type="fully_convolutional").eval()
        with torch.no_grad():
            _, fmaps = model(torch.randn(1, 1, 128, 1000), return_fmaps=True)
        assert tuple(fmaps[-1].shape[2:]) == size
    with pytest.raises(ValueError):
        get_mn(strides=(2, 2, 3, 2))


def test_reduced_tail_dilated_and_heads():
    model = get_mn(width_mult=1.0, reduced_tail=True, dilated=True, head_type="multihead_attention_pooling",
                   multihead_attention_heads=2).eval()
    assert model.embedding_dim == 6 * 80  # tail halved: 160 // 2 = 80
    with torch.no_grad():
        logits, _ = model(torch.randn(2, 1, 128, 100))
    assert logits.shape == (2, 527)
    with pytest.raises(ValueError, match="head_type"):
        get_mn(head_type="transformer")
    with pytest.raises(ValueError, match="se_dims"):
        get_mn(se_dims="x")


def test_dymn_context_sizes_and_temperature_schedule():
    assert [context_size(e, 1.0) for e in (16, 64, 72, 72, 120, 120, 240, 200, 184, 184, 480, 672, 672, 960, 960)] \
        == [32, 32, 32, 32, 32, 32, 64, 48, 48, 48, 120, 128, 128, 128, 128]
    model = get_dymn(width_mult=0.4)
    convs = [m for m in model.modules() if isinstance(m, DynamicConv)]
    assert all(c.temperature == 30 for c in convs)
    temps = []
    for epoch in range(35):
        model.update_params(epoch)
        temps.append(convs[0].temperature)
        assert len({c.temperature for c in convs}) == 1
    assert temps[:30] == pytest.approx([30 - e for e in range(29)] + [1.0]) and temps[30:] == [1] * 5


def test_pretrained_dymn_runs_at_final_temperature(monkeypatch):
    # a pretrained name sets T_max := pretrain_final_temp (the temperature is not in checkpoints)
    from models import pretrained
    monkeypatch.setattr(pretrained, "load_pretrained_weights", lambda model, name: None)
    model = get_dymn(pretrained_name="dymn04_as")
    assert model.layers[0].depth_conv.temperature == 1.0
    assert get_dymn(pretrained_name="dymn04_as", pretrain_final_temp=30).layers[0].depth_conv.temperature == 30
    assert model.layers[1].has_expansion and not model.layers[0].has_expansion


def test_dynamic_conv_equals_per_sample_convolution():
    torch.manual_seed(0)
    conv = DynamicConv(8, 8, context_dim=16, kernel_size=3, stride=2, padding=1, groups=8, k=4)
    conv.temperature = 2.0
    x, h = torch.randn(3, 8, 10, 12), torch.randn(3, 16)
    out = conv(x, (h, None, None))
    attention = torch.softmax(conv.residuals(h) / 2.0, dim=-1)
    for b in range(3):
        kernel = (attention[b, :, None] * conv.weight[0, 0]).sum(0).view(8, 1, 3, 3)
        ref = torch.nn.functional.conv2d(x[b:b + 1], kernel, stride=2, padding=1, groups=8)
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-5, atol=1e-5)


def test_dymn_ablations_build_and_run():
    model = get_dymn(width_mult=0.4, no_dyconv=True, no_dyrelu=True, no_ca=True).eval()
    keys = model.state_dict().keys()
    assert "layers.1.exp_conv.module.weight" in keys and not any("residuals" in k for k in keys)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 50))[0].shape == (2, 527)


def test_dropout_option():
    assert get_mn(width_mult=0.1, dropout=0.5).classifier[4].p == 0.5
    assert get_dymn(width_mult=0.4, dropout=0.0).classifier[4].p == 0.0


def test_building_prints_nothing(capsys):
    get_mn(width_mult=0.4)
    get_dymn(width_mult=0.4)
    assert capsys.readouterr() == ("", "")
