"""The pretrained registry, strict loading, class-count changes and ensembles."""
import logging

import pytest
import torch

from models import pretrained
from models.dymn.model import get_model as get_dymn
from models.ensemble import ensemble_frontend_kwargs, get_ensemble_model
from models.factory import create_frontend, create_model, frontend_kwargs
from models.mn.model import get_model as get_mn
from models.pretrained import REGISTRY, get_entry, name_to_width

SPEC_NAMES = (
    ["mn10_im_pytorch"] + [f"mn{w}_im" for w in ("01", "02", "04", "05", "10", "20", "30", "40")]
    + [f"mn{w}_as" for w in ("01", "02", "04", "05", "10", "20", "30", "40")]
    + ["mn40_as(2)", "mn40_as(3)", "mn40_as_ext", "mn40_as_ext(2)", "mn40_as_ext(3)", "mn40_as_no_im_pre",
       "mn40_as_no_im_pre(2)", "mn40_as_no_im_pre(3)", "mn10_as_hop_5", "mn10_as_hop_15", "mn10_as_hop_20",
       "mn10_as_hop_25", "mn10_as_mels_40", "mn10_as_mels_64", "mn10_as_mels_256", "mn10_as_fc",
       "mn10_as_fc_s2221", "mn10_as_fc_s2211"]
    + ["dymn04_im", "dymn10_im", "dymn20_im", "dymn04_as", "dymn10_as", "dymn20_as", "dymn20_as(1)",
       "dymn20_as(2)", "dymn20_as(3)", "dymn04_replace_se_as", "dymn10_replace_se_as"])


def test_every_released_name_is_registered():
    assert sorted(SPEC_NAMES) == sorted(REGISTRY)
    for name, entry in REGISTRY.items():
        assert entry.url == pretrained.RELEASE_URL + entry.filename and " " not in entry.url
        assert entry.family == ("dymn" if name.startswith("dymn") else "mn")
        assert entry.model_kwargs["width_mult"] == name_to_width(name)


def test_registry_settings_of_variants():
    assert get_entry("mn10_as_hop_5").frontend_kwargs == {"hopsize": 160}
    assert frontend_kwargs("mn10_as_mels_64")["n_mels"] == 64
    assert frontend_kwargs("mn10_as_hop_25", hopsize=None)["hopsize"] == 800
    assert frontend_kwargs("mn10_as_hop_25", hopsize=320)["hopsize"] == 320  # explicit wins
    assert get_entry("mn10_as_fc_s2211").model_kwargs == {"width_mult": 1.0, "head_type": "fully_convolutional",
                                                          "strides": (2, 2, 1, 1)}
    assert get_entry("dymn10_replace_se_as").model_kwargs["use_dy_blocks"] == "replace_se"
    assert get_entry("dymn20_as").filename == "dymn20_as_mAP_493.pt"
    assert get_entry("dymn20_as(1)").filename == "dymn20_as.pt"
    assert get_entry("mn04_as").sha256 == "899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"
    assert create_frontend("mn10_as_hop_15").hopsize == 480 and not create_frontend("mn04_as").training


def test_name_to_width():
    assert name_to_width("mn04_as") == 0.4 and name_to_width("dymn20_as(2)") == 2.0
    assert name_to_width("mn16_custom") == 1.6 and name_to_width("resnet") == 1.0 and name_to_width(None) == 1.0


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean mn04_as"):
        get_entry("mn04_sa")
    with pytest.raises(ValueError, match="unknown model name"):
        get_mn(pretrained_name="nonsense_model_name_xyz")


def test_pretrained_name_fixes_the_architecture(mn04_checkpoint, capsys):
    model = get_mn(pretrained_name="mn04_as")  # no width_mult needed
    assert model.embedding_dim == 384 and model.num_classes == 527
    assert capsys.readouterr() == ("", "")  # building and loading print nothing
    with pytest.raises(ValueError, match="width_mult=0.4"):
        get_mn(pretrained_name="mn04_as", width_mult=1.0)  # the original silently loaded non-strictly
    with pytest.raises(ValueError, match="head_type"):
        get_mn(pretrained_name="mn04_as", head_type="fully_convolutional")
    with pytest.raises(ValueError, match="DYMN"):
        get_mn(pretrained_name="dymn04_as")
    with pytest.raises(ValueError, match="MN checkpoint"):
        get_dymn(pretrained_name="mn04_as")


def test_other_class_count_replaces_only_the_last_layer(mn04_checkpoint, caplog):
    state = torch.load(mn04_checkpoint, map_location="cpu", weights_only=True)
    with caplog.at_level(logging.INFO, logger="models.pretrained"):
        model = get_mn(num_classes=10, pretrained_name="mn04_as")
    assert "527 classes" in caplog.text and "10 classes" in caplog.text
    new = model.state_dict()
    assert new["classifier.5.weight"].shape == (10, 512)
    assert torch.equal(new["classifier.2.weight"], state["classifier.2.weight"])  # hidden layer kept
    assert torch.equal(new["features.7.block.0.0.weight"], state["features.7.block.0.0.weight"])
    assert torch.all(new["classifier.5.bias"] == 0) and new["classifier.5.weight"].std() < 0.02  # fresh init


def test_mismatching_checkpoint_is_rejected_in_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path))
    path = tmp_path / get_entry("mn10_as").filename
    torch.save(get_mn(width_mult=0.4).state_dict(), path)  # a width-0.4 file under the width-1.0 name
    for num_classes in (527, 10):
        with pytest.raises(ValueError) as error:
            create_model("mn10_as", num_classes=num_classes)
        message = str(error.value)
        assert message.startswith(f"{path} does not fit mn10_as (0 missing, 0 unexpected, ")
        assert message.endswith("delete it and run again to download it") and "\n" not in message
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"{path} is not a PyTorch checkpoint .*; delete it and run again") as error:
        create_model("mn10_as")
    assert "\n" not in str(error.value)


def _fake_checkpoint(cache, name, **kwargs):
    """A random-weight checkpoint saved under a released name (no network in tests)."""
    build = get_dymn if name.startswith("dymn") else get_mn
    torch.manual_seed(len(name))
    model = build(**{k: v for k, v in get_entry(name).model_kwargs.items()}, **kwargs)
    torch.save(model.state_dict(), cache / get_entry(name).filename)
    return model


def test_create_model_builds_variants_from_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path))
    _fake_checkpoint(tmp_path, "mn10_as_fc_s2221")
    model = create_model("mn10_as_fc_s2221")
    assert model.head_type == "fully_convolutional"
    assert [b.block[1][0].stride for b in list(model.features)[13:14]] == [(1, 1)]  # s4 = 1
    _fake_checkpoint(tmp_path, "dymn04_replace_se_as")
    dymn = create_model("dymn04_replace_se_as", num_classes=5)
    assert dymn.classifier[5].out_features == 5 and dymn.layers[3].depth_conv.temperature == 1.0


def test_ensemble_averages_logits(tmp_path, monkeypatch, mn04_checkpoint):
    monkeypatch.setenv("EFFICIENTAT_MODEL_DIR", str(tmp_path))
    (tmp_path / mn04_checkpoint.name).write_bytes(mn04_checkpoint.read_bytes())
    other = _fake_checkpoint(tmp_path, "mn01_as").eval()
    ensemble = get_ensemble_model(["mn04_as", "mn01_as"]).eval()
    x = torch.randn(2, 1, 128, 100)
    with torch.no_grad():
        logits, second = ensemble(x)
        expected = (create_model("mn04_as").eval()(x)[0] + other(x)[0]) / 2
    torch.testing.assert_close(logits, expected)
    assert second is logits


def test_ensemble_needs_one_frontend():
    assert ensemble_frontend_kwargs(["mn04_as", "dymn10_as", "mn10_as_fc"])["n_mels"] == 128
    with pytest.raises(ValueError, match="different frontends.*n_mels: 128 vs 64"):
        ensemble_frontend_kwargs(["mn10_as", "mn10_as_mels_64"])
    with pytest.raises(ValueError):
        get_ensemble_model([])
