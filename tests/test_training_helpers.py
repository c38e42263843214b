"""The shared training-loop pieces: schedule values, mixup, seeding, checkpoints, precision, the
generic train/evaluate loops, and a two-process gloo run of them."""
from __future__ import annotations

import argparse
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from datasets.items import IndexedClip
from common.errors import InputError
from helpers.training.args import add_model_args, resolve_dataset_dir
from models.config import ModelConfig
from helpers.training.config import OptimConfig
from helpers.training.data import ShardSampler, eval_loader, train_loader
from helpers.training.distributed import DistInfo, cleanup_distributed, setup_distributed, unwrap, wrap_ddp
from helpers.training.evaluation import evaluate, mel
from helpers.training.loop import train_one_epoch
from helpers.training.mixup import mix, mixup
from helpers.training.precision import Precision
from helpers.training.run_log import RunLogger
from helpers.training.schedule import WarmupRampdown, make_optimizer, make_scheduler
from helpers.training.seeding import seed_epoch, seed_everything, worker_init_fn
from models.checkpoint import load_checkpoint, save_checkpoint
from models.factory import model_from_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine, two spinning threads per process make these
    small training runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _schedule(**kw) -> WarmupRampdown:
    return WarmupRampdown(kw["W"], kw["S"], kw["R"], kw["last"])


def test_schedule_audioset_values():
    f = _schedule(W=8, S=80, R=95, last=0.01)
    expected = [0.01234, 0.02175, 0.06005, 0.14183, 0.28650, 0.49504, 0.73162, 0.92485, 1, 1]
    np.testing.assert_allclose([f(e) for e in range(10)], expected, atol=5e-6)
    for e, v in {80: 1.0, 81: 0.98958, 100: 0.79158, 150: 0.27053, 174: 0.02042, 175: 0.01,
                 300: 0.01}.items():
        assert f(e) == pytest.approx(v, abs=5e-6), e


def test_schedule_finetuning_values_and_lambdalr():
    f = _schedule(W=10, S=10, R=65, last=0.01)
    expected = [0.01097, 0.01742, 0.04076, 0.08629, 0.16530, 0.28650, 0.44933, 0.63763, 0.81873,
                0.95123, 1, 0.98477]
    np.testing.assert_allclose([f(e) for e in range(12)], expected, atol=5e-6)
    assert f(40) == pytest.approx(0.54308, abs=5e-6)
    assert f(74) == pytest.approx(0.02523, abs=5e-6)
    assert f(75) == f(200) == pytest.approx(0.01)
    # the LambdaLR is stepped after each epoch: epoch e trains with lr * f(e)
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make_scheduler(opt, OptimConfig(warm_up_len=10, ramp_down_start=10, ramp_down_len=65, last_lr_value=0.01))
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(np.array(lrs) / 1e-3, expected, atol=5e-6)
    state = sched.state_dict()
    assert state["lr_lambdas"][0] == {"warm_up_len": 10, "ramp_down_start": 10, "ramp_down_len": 65,
                                      "last_lr_value": 0.01}


def test_mixup_and_mix():
    seed_everything(3)
    perm, lam = mixup(64, 0.3)
    assert sorted(perm.tolist()) == list(range(64))
    assert lam.dtype == torch.float32 and lam.shape == (64,)
    assert (lam >= 0.5).all() and (lam <= 1).all()
    x = torch.randn(64, 1, 5, 7)
    mixed = mix(x, perm, lam)
    i = 5
    assert torch.allclose(mixed[i], lam[i] * x[i] + (1 - lam[i]) * x[perm[i]])
    y = torch.rand(64, 527)
    assert torch.allclose(mix(y, perm, lam)[i], lam[i] * y[i] + (1 - lam[i]) * y[perm[i]])
    with pytest.raises(ValueError):
        mixup(4, 0.0)


def test_mel_reshape():
    from models.preprocess import AugmentMelSTFT
    frontend = AugmentMelSTFT(n_mels=32).eval()
    x = torch.randn(3, 1, 3200)
    spec = mel(frontend, x)
    assert spec.shape == (3, 1, 32, frontend.num_frames(3200)) == (3, 1, 32, 10)
    torch.testing.assert_close(spec[1, 0], frontend(x[1])[0])  # x[1] is (1, L)


class _RandomItems(Dataset):
    """Items made of the three global RNGs' draws, to observe worker seeding."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.tensor([float(torch.rand(1)), float(np.random.rand()), random.random()])


def _draws(seed: int, epoch: int) -> torch.Tensor:
    seed_epoch(seed, epoch)
    loader = DataLoader(_RandomItems(), batch_size=2, num_workers=2, worker_init_fn=worker_init_fn)
    return torch.cat(list(loader))


def test_worker_seeding_differs_across_workers_and_epochs_and_repeats():
    a0, a1, again = _draws(7, 0), _draws(7, 1), _draws(7, 0)
    assert torch.equal(a0, again)  # reproducible
    assert not torch.equal(a0, a1)  # epochs differ
    # worker 0 yields batches 0, 2, ...; worker 1 batches 1, 3, ...: their first draws differ
    assert not torch.equal(a0[0], a0[2])
    for rng in range(3):  # each RNG differs between the two workers
        assert a0[0, rng] != a0[2, rng]
    assert len(torch.unique(a0)) == a0.numel()


def test_seed_epoch_depends_on_rank():
    seed_epoch(1, 0, rank=0)
    a = torch.rand(3)
    seed_epoch(1, 0, rank=1)
    assert not torch.equal(a, torch.rand(3))


def test_checkpoint_atomic_roundtrip_and_errors(tmp_path):
    path = tmp_path / "sub" / "ck.pt"
    save_checkpoint(path, {"a": torch.arange(3), "config": {"x": 1}})
    assert load_checkpoint(path)["config"] == {"x": 1}
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]  # no temp file left
    with pytest.raises(InputError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt: not a readable torch checkpoint"):
        load_checkpoint(bad)


def test_precision_modes():
    cpu = torch.device("cpu")
    assert Precision(None, cpu).name == "fp32"
    with Precision("bf16", cpu).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with Precision("fp32", cpu).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert Precision("fp16", cpu).scaler.is_enabled()
    assert not Precision("bf16", cpu).scaler.is_enabled()
    with pytest.raises(InputError):
        Precision("fp8", cpu)


class _ToyNet(nn.Module):
    """Spectrogram -> logits, with the (logits, embedding) contract of the models."""

    def __init__(self, n_mels: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.num_classes = classes
        self.fc = nn.Linear(n_mels, classes)

    def forward(self, x: torch.Tensor):
        emb = x.mean(dim=(1, 3))
        return self.fc(emb), emb


class _ToyData(TensorDataset):
    """(waveforms, indices, one-hot targets) yielded as `IndexedClip`s."""

    def __getitem__(self, i: int) -> IndexedClip:
        wave, index, target = super().__getitem__(i)
        return IndexedClip(wave, f"clip{int(index)}", target, index)


def _toy_data(n: int = 32, seed: int = 0) -> _ToyData:
    """Class 1: loud high tone, class 0: quiet low tone; one-hot targets."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    t = torch.arange(1600) / 16000
    freq = torch.where(labels == 1, 3000.0, 300.0).unsqueeze(1)
    amp = torch.where(labels == 1, 0.5, 0.05).unsqueeze(1)
    wave = amp * torch.sin(2 * np.pi * freq * t) + 0.01 * torch.randn(n, 1600, generator=g)
    return _ToyData(wave.unsqueeze(1), torch.arange(n), nn.functional.one_hot(labels, 2).float())


def _bce(model, x, batch):
    logits = model(x)[0]
    return {"loss": nn.functional.binary_cross_entropy_with_logits(logits, batch.target),
            "mean_logit": logits.mean().detach()}


def _toy_setup(dist: DistInfo, seed: int = 0):
    from models.preprocess import AugmentMelSTFT
    seed_everything(seed)
    frontend = AugmentMelSTFT(n_mels=16, sr=16000, win_length=400, hopsize=160, n_fft=512,
                              freqm=0, timem=0)
    model = wrap_ddp(_ToyNet(), dist)
    opt = make_optimizer(model, 0.05)
    return frontend, model, opt


def _train_toy(dist: DistInfo, batch_size: int, epochs: int):
    """Train the toy net on the toy data; returns (frontend, model, epoch losses)."""
    frontend, model, opt = _toy_setup(dist)
    prec = Precision("fp32", dist.device)
    loader = train_loader(_toy_data(), batch_size, 0, dist, seed=0)
    losses = []
    for epoch in range(epochs):
        seed_epoch(0, epoch, dist.rank)
        stats = train_one_epoch(model, frontend, loader, opt, _bce, prec, dist, epoch, progress=False)
        assert set(stats) == {"loss", "mean_logit"}
        losses.append(stats["loss"])
    return frontend, model, losses


def test_train_one_epoch_lowers_loss_and_evaluate_matches_manual():
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    frontend, model, losses = _train_toy(dist, 8, 4)
    assert losses[-1] < 0.7 * losses[0]
    prec = Precision("fp32", dist.device)
    data = _toy_data()
    logits, targets, _ = evaluate(model, frontend, eval_loader(data, 5, 0, dist), prec, dist,
                                  progress=False)
    assert logits.shape == (32, 2) and torch.equal(targets, data.tensors[2])
    with torch.no_grad():
        manual = model(mel(frontend.eval(), data.tensors[0]))[0]
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)
    keep = evaluate(model, frontend, eval_loader(data, 5, 0, dist), prec, dist,
                      keep_fn=lambda b: b.index % 4 != 0, progress=False).logits
    torch.testing.assert_close(keep, manual[torch.arange(32) % 4 != 0])


def test_shard_sampler_covers_everything_once():
    for n in (0, 1, 7, 10):
        shards = [list(ShardSampler(n, r, 3)) for r in range(3)]
        assert sum(shards, []) == list(range(n))


def test_resolve_dataset_dir_errors(tmp_path):
    with pytest.raises(InputError, match="pass --dataset_dir or set \\$X_DIR"):
        resolve_dataset_dir(None, "X_DIR")
    with pytest.raises(InputError, match="dataset folder does not exist"):
        resolve_dataset_dir(str(tmp_path / "nope"), None)
    with pytest.raises(InputError, match="a.hdf: dataset file not found"):
        resolve_dataset_dir(str(tmp_path), None, ["a.hdf"])


def test_model_config_roundtrip_mn_and_dymn():
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--model_name", "mn01_as", "--model_width", "0.1"])
    config = ModelConfig.from_flags(vars(args)).to_dict(num_classes=10)
    assert config == {"family": "mn", "num_classes": 10, "width_mult": 0.1, "strides": [2, 2, 2, 2],
                      "head_type": "mlp", "pretrained_name": None, "se_dims": "c"}
    model = model_from_config(config)
    assert model.num_classes == 10
    args = parser.parse_args(["--model_name", "dymn04_as", "--model_width", "0.4"])
    config = ModelConfig.from_flags(vars(args)).to_dict(num_classes=5)
    assert config["family"] == "dymn" and config["T_max"] == 30.0
    dymn = model_from_config(config, epoch=3)
    temps = {m.temperature for m in dymn.modules() if hasattr(m, "temperature")}
    assert temps == {27.0}


def test_model_config_pretrained_uses_registry():
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--model_name", "mn04_as", "--pretrained"])
    config = ModelConfig.from_flags(vars(args)).to_dict(num_classes=527)
    assert config["width_mult"] == 0.4 and config["pretrained_name"] == "mn04_as"


def test_run_logger_writes_jsonl_only_on_main(tmp_path):
    main = RunLogger("none", "P", "run", {"a": 1}, tmp_path / "m", DistInfo(0, 0, 2, torch.device("cpu")))
    other = RunLogger("none", "P", "run", {"a": 1}, tmp_path / "o", DistInfo(1, 1, 2, torch.device("cpu")))
    main.log({"mAP": 0.5}, step=0)
    other.log({"mAP": 0.5}, step=0)
    assert (tmp_path / "m" / "metrics.jsonl").read_text() == '{"epoch": 0, "mAP": 0.5}\n'
    assert not (tmp_path / "o").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = setup_distributed(cuda=False)
    frontend, model, losses = _train_toy(dist, 4, 3)
    prec = Precision("fp32", dist.device)
    # 33 clips over 2 ranks: shards of 16 and 17, every clip exactly once
    eval_data = _toy_data(33, seed=1)
    logits, targets, _ = evaluate(model, frontend, eval_loader(eval_data, 5, 0, dist), prec, dist,
                                  progress=False)
    torch.save({"state": unwrap(model).state_dict(), "losses": losses, "logits": logits,
                "targets": targets}, os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup_distributed()


def test_two_process_gloo_training_and_gathered_evaluation(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert r0["losses"] == r1["losses"] and r0["losses"][-1] < r0["losses"][0]
    assert torch.equal(r0["logits"], r1["logits"]) and len(r0["logits"]) == 33
    # a single-process evaluation of the same weights gives the same outputs in the same order
    dist = DistInfo(0, 0, 1, torch.device("cpu"))
    frontend, model, _ = _toy_setup(dist)
    model.load_state_dict(r0["state"])
    eval_data = _toy_data(33, seed=1)
    logits, targets, _ = evaluate(model, frontend, eval_loader(eval_data, 7, 0, dist),
                                  Precision("fp32", dist.device), dist, progress=False)
    torch.testing.assert_close(logits, r0["logits"], rtol=1e-6, atol=1e-6)
    assert torch.equal(targets, r0["targets"])
