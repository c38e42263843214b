"""Training speed settings, checked on the CPU: the training step reads nothing back from the
device, the fused optimizer keeps fp16's overflow check on the device, and the speed options
reach the model, the optimizer and the loaders."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ex_audioset
import ex_esc50
from datasets.items import IndexedClip
from helpers.training import loop
from helpers.training.data import eval_loader, train_loader
from helpers.training.distributed import DistInfo
from helpers.training.loop import train_step
from helpers.training.precision import Precision
from helpers.training.schedule import make_optimizer
from models.checkpoint import load_checkpoint
from models.factory import FAMILIES, create_model
from models.preprocess import AugmentMelSTFT
from tests.datagen import make_esc50
from tests.test_fast import smallest_name


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor value by the host (.item(), float(t), bool(t))."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


class Teacher:
    """Stands in for TeacherPredictions: host tensors, as the memory-mapped logits give."""

    def lookup(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((len(names), 527), 0.1), torch.ones(len(names), dtype=torch.bool)


def _batch(n: int = 2, samples: int = 16000) -> IndexedClip:
    return IndexedClip(0.1 * torch.randn(n, 1, samples), [f"c{i}" for i in range(n)],
                       (torch.rand(n, 527) < 0.05).float(), torch.arange(n))


def _audioset_loss() -> loop.LossFn:
    return ex_audioset.distillation_loss_fn(0.3, 0.1, Teacher())


@pytest.mark.parametrize("name", [smallest_name(family) for family in FAMILIES.values() if family.entries])
def test_training_step_reads_nothing_from_the_device(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the meta device every read of a device value fails: the step (train-mode frontend with
    masks, mixup, distillation loss, backward, Adam) completes, so it never waits for the device."""
    monkeypatch.setattr(torch, "autocast", lambda **kwargs: contextlib.nullcontext())  # no meta autocast
    device = torch.device("meta")
    model = create_model(name, pretrained=False).to(device)
    frontend = AugmentMelSTFT().to(device)
    out = train_step(model, frontend, _batch(), make_optimizer(model, 1e-3), _audioset_loss(),
                     Precision("fp32", device), device)
    assert out["loss"].device == device


@pytest.mark.parametrize("fused", [True, False])
def test_fused_optimizer_keeps_the_fp16_overflow_check_on_the_device(fused: bool) -> None:
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = create_model("mn04_as", pretrained=False)
    optimizer = make_optimizer(model, 1e-3, fused=fused)
    with HostReads() as log:
        train_step(model, AugmentMelSTFT(), _batch(), optimizer, _audioset_loss(), Precision("fp16", cpu), cpu)
    # unfused, the GradScaler reads the overflow flag (and Adam its step counts) on the host
    assert (log.count == 0) == fused


def test_loader_options_apply_with_workers() -> None:
    data = torch.utils.data.TensorDataset(torch.arange(8))
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    fast = train_loader(data, 2, 1, dist, seed=0, persistent_workers=True, prefetch_factor=3)
    assert fast.persistent_workers and fast.prefetch_factor == 3 and not fast.pin_memory
    assert eval_loader(data, 2, 1, dist, persistent_workers=True).persistent_workers
    assert not train_loader(data, 2, 0, dist, seed=0, persistent_workers=True).persistent_workers


def test_speed_options_reach_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    compiled: list[nn.Module] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    built: list[loop.Run] = []
    real_build = loop.build_run
    monkeypatch.setattr(loop, "build_run", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    data_dir = make_esc50(tmp_path / "ESC-50", clips_per_fold=1, seconds=0.5)
    common = ["--dataset_dir", data_dir, "--fold", 1, "--num_workers", 0, "--logger", "none", "--batch_size", 4,
              "--compile", "--channels_last", "--cudnn_benchmark"]
    ex_esc50.main([str(a) for a in [*common, "--model_name", "mn01_as", "--model_width", 0.1, "--n_epochs", 1,
                                    "--out_dir", tmp_path / "run"]])
    model = built[0].model
    assert compiled == [model] and torch.backends.cudnn.benchmark
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    state = load_checkpoint(tmp_path / "run" / "fold1" / "last.pt")
    assert not any(k.startswith("_orig_mod") for k in state["model"])  # compiled in place: plain keys
    # evaluation alone takes the same options
    ex_esc50.main([str(a) for a in [*common, "--checkpoint", tmp_path / "run" / "fold1" / "last.pt"]])
    assert len(compiled) == 2 and compiled[1] is not model
