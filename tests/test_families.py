"""Every registered model family (models.factory.FAMILIES), whatever it is: its record is
consistent, and its smallest released architecture builds, runs, runs the fast path with the same
outputs, exports to ONNX, is costed by complexity analysis and takes a fine-tuning step from the
training scripts' flags. A new family's folder is checked by these tests without editing them."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers.analysis.complexity import analyze, untrained_model, count_params
from helpers.analysis.complexity_plots import series_styles, tradeoff_points
from helpers.training.args import add_model_args
from models.config import ModelConfig
from helpers.training.checkpoints import epoch_weights_name
from helpers.training.data import train_loader
from helpers.training.distributed import DistInfo
from helpers.training.loop import train_one_epoch
from helpers.training.precision import Precision
from helpers.training.schedule import make_optimizer
from models.factory import FAMILIES, REGISTRY, create_frontend, create_model, model_config, model_from_config
from models.family import Family
from models.layers import AudioTagger
from models.runtime import for_inference
from tests.test_fast import EACH_FAMILY as EACH, assert_same_outputs, family_model, smallest_name as smallest
from tests.test_training_helpers import _bce, _toy_data

NUM_CLASSES = 10


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@EACH
def test_record_is_consistent(family: Family) -> None:
    assert FAMILIES[family.name] is family and family.weights_prefix
    for entry in family.entries:
        assert REGISTRY[entry.name] is entry and entry.family == family.name
        assert entry.name.startswith(family.prefix)
        width = entry.model_kwargs.get("width_mult")
        assert width is None or width == family.widths[max((p for p in family.widths if entry.name.startswith(p)),
                                                           key=len)]
    for name, option in family.options.items():
        assert isinstance(option.default, option.type) and option.help
        assert not option.architecture or family.accepts(name)


@EACH
def test_builds_and_runs(family: Family) -> None:
    model = family_model(family, NUM_CLASSES)
    assert isinstance(model, AudioTagger) and model.num_classes == NUM_CLASSES
    x = torch.randn(2, 1, 128, 100)
    with torch.no_grad():
        logits, embedding = model(x)
        _, fmaps = model(x, return_fmaps=True)
    assert logits.shape == (2, NUM_CLASSES) and embedding.shape == (2, model.embedding_dim)
    assert len(fmaps) == family.feature_maps  # embeddings.py --layer's range
    torch.testing.assert_close(fmaps[-1].mean(dim=(2, 3)), embedding)


@EACH
def test_building_prints_nothing(family: Family, capsys: pytest.CaptureFixture) -> None:
    create_model(smallest(family), pretrained=False)
    assert capsys.readouterr() == ("", "")


@EACH
def test_fast_path_matches(family: Family) -> None:
    model = family_model(family, NUM_CLASSES)
    fast = for_inference(model)
    assert fast is not model and not any(type(stage) in family.fast_twins for stage in fast.stages())
    assert_same_outputs(model, torch.randn(3, 1, 128, 64))


@EACH
def test_onnx_export_matches(family: Family, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from helpers.inference.onnx_export import compare_with_torch, export_onnx

    model, frontend = family_model(family, NUM_CLASSES), create_frontend()
    export_onnx(model, tmp_path / "model.onnx", frontend)
    rng = np.random.default_rng(0)
    waveforms = (0.1 * rng.standard_normal((2, 48000))).astype(np.float32)
    diffs, logits = compare_with_torch(tmp_path / "model.onnx", model, waveforms, frontend, True)
    assert logits.shape == (2, NUM_CLASSES) and max(diffs.values()) < 1e-4


@EACH
def test_complexity_counts_the_model(family: Family) -> None:
    name = smallest(family)
    size = (1, 1, 128, 1000)
    model = create_model(name, pretrained=False)
    cost = analyze(untrained_model(name, input_size=size), size)
    assert cost.params == count_params(model) and cost.macs.total > 0
    blocks = sum(any(isinstance(m, kind) for kind in family.blocks) for m in model.modules())
    dynamic = sum(any(isinstance(m, kind) for kind in family.dynamic_convs) for m in model.modules())
    assert cost.macs.dynamic_conv_layers == dynamic
    assert cost.peak_memory.peak_kb > 0 and cost.peak_memory_efficient.peak_kb > 0
    assert len(cost.peak_memory_efficient.entries) == (blocks or len(cost.peak_memory.entries))
    row = {"name": name, "family": family.name, "head_type": model.head_type, "n_mels": 128, "frames": 1000,
           "params": cost.params, "macs": cost.macs.total, "peak_memory_kB": 1.0, "peak_memory_efficient_kB": 1.0,
           "map": 40.0}
    points = tradeoff_points([row])["params"]
    assert [p.series for p in points] == [family.series(row)] and family.series(row) in series_styles(points)


@EACH
def test_fine_tuning_step_from_the_training_flags(family: Family) -> None:
    name = smallest(family)
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    width = REGISTRY[name].model_kwargs.get("width_mult", 1.0)
    args = parser.parse_args(["--model_name", name, "--model_width", str(width)])
    config = ModelConfig.from_flags(vars(args)).to_dict(num_classes=2)
    assert config["family"] == family.name and set(family.options) <= set(vars(args))
    torch.manual_seed(0)
    model = model_from_config(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    frontend = create_frontend(name, sr=16000, win_length=400, hopsize=160, n_fft=512)
    loader = train_loader(_toy_data(4), 4, 0, dist, seed=0)
    stats = train_one_epoch(model, frontend, loader, make_optimizer(model, 1e-3), _bce, Precision("fp32", dist.device),
                            dist, 0, progress=False)
    assert np.isfinite(stats["loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    rebuilt = model_from_config(config, load_pretrained=False)
    rebuilt.load_state_dict(model.state_dict())  # strictly: the stored configuration is the model
    assert epoch_weights_name(config, "esc50", 3, "acc", 0.5).startswith(family.weights_prefix)


# model configurations as training checkpoints written before families became plug-ins stored them
STORED_CONFIGS = [
    ({"family": "mn", "num_classes": 2, "width_mult": 0.1, "strides": [2, 2, 2, 2], "head_type": "mlp",
      "pretrained_name": None, "se_dims": "c"}, ("mn01", 2, False), {"width_mult": 0.1}),
    ({"family": "mn", "num_classes": 10, "width_mult": 0.4, "strides": [2, 2, 2, 2], "head_type": "mlp",
      "pretrained_name": "mn04_as", "se_dims": "cf"}, ("mn04_as", 10, True), {"se_dims": "cf"}),
    ({"family": "dymn", "num_classes": 5, "width_mult": 0.4, "strides": [2, 2, 2, 2], "head_type": "mlp",
      "pretrained_name": "dymn04_as", "use_dy_blocks": "all", "T_max": 30.0}, ("dymn04_as", 5, True),
     {"pretrain_final_temp": 30.0}),
    ({"family": "dymn", "num_classes": 3, "width_mult": 0.4, "strides": [2, 2, 1, 1], "head_type": "mlp",
      "pretrained_name": None, "use_dy_blocks": "all", "T_max": 30.0}, ("dymn04", 3, False),
     {"width_mult": 0.4, "strides": (2, 2, 1, 1)}),
]


@pytest.mark.parametrize("stored, args, kwargs", STORED_CONFIGS, ids=[c[0]["family"] + str(i)
                                                                      for i, c in enumerate(STORED_CONFIGS)])
def test_stored_model_configs_still_load(stored: dict, args: tuple, kwargs: dict) -> None:
    assert model_config(*args, **kwargs) == stored
    torch.manual_seed(0)
    model = model_from_config(stored, load_pretrained=False, epoch=0)
    rebuilt = model_from_config(dict(stored), load_pretrained=False)
    rebuilt.load_state_dict(model.state_dict())  # strictly
    assert model.num_classes == stored["num_classes"]
