"""Derive the expected outputs in tests/expect/ from ../shared/golden (the original code's outputs),
small enough to commit, so that architecture and frontend parity are checked in every clone:

    python tests/expect/derive.py [--shared ../shared]

- frontend.npz: a 0.3-s excerpt of the metro clip (32 kHz, starting at 3 s) and, for every frontend
  of golden/meta.json, the original's log-mel frames that lie wholly inside the excerpt
  (`<name>`, (n_mels, frames)) and the excerpt frame they start at (`<name>_first`).
- models.npz: for the random-weight MN configurations of golden/meta.json, whose weights are
  `torch.manual_seed(1)` followed by the constructor (the original's initialization, which ours
  reproduces), the batch-norm running statistics the golden files set afterwards (`<config>/<key>`)
  and the original's logits and embedding (`<config>/logits`, `<config>/embedding`) for the input
  `torch.manual_seed(0); torch.randn(2, 1, 128, 300)`. DyMN's golden weights do not come from a
  seed and are too large to commit: `dymn04_seeded/...` holds the outputs of our DyMN (checked here
  against the golden outputs first) with weights drawn per key from `seeded_state` below.
- state_dict_shapes.json.gz: the golden file itself (compressed).
- complexity_figures.json: the original tools' parameter, MAC and peak-memory figures of the MN
  widths (golden/complexity.json), one figure per "width/head/figure" path.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

EXPECT = Path(__file__).resolve().parent
REPO = EXPECT.parent.parent
EXCERPT_START, EXCERPT_SAMPLES = 3 * 32000, 9600  # the start is a multiple of every hop size
MAX_FRAMES = 16
MN_SEED, INPUT_SEED = 1, 0
RUNNING_STATS = ("running_mean", "running_var")


def random_input() -> torch.Tensor:
    """The golden models' input (2, 1, 128, 300)."""
    torch.manual_seed(INPUT_SEED)
    return torch.randn(2, 1, 128, 300)


def build(spec: dict) -> torch.nn.Module:
    """A model of a golden/meta.json `random` entry."""
    from models.dymn.model import get_model as get_dymn
    from models.mn.model import get_model as get_mn
    return (get_dymn if spec["constructor"] == "dymn" else get_mn)(**spec["kwargs"])


def seeded_mn(spec: dict) -> torch.nn.Module:
    """The golden MN configuration's weights apart from the batch-norm running statistics."""
    torch.manual_seed(MN_SEED)
    return build(spec)


def seeded_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state with every parameter and batch-norm statistic drawn from a generator seeded
    by the crc32 of its key (independent of the order in which modules are built): weights with
    std 1/sqrt(fan_in), 1-d weights around 1, biases and running means around 0, running variances
    in [0.5, 1.5]. Other buffers keep their values."""
    state = model.state_dict()
    drawn = {name for name, _ in model.named_parameters()}
    drawn |= {k for k in state if k.rsplit(".", 1)[-1] in RUNNING_STATS}
    for key in drawn:
        value = state[key]
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        normal = torch.randn(value.shape, generator=g)
        if key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(value.shape, generator=g)
        elif value.dim() >= 2:
            state[key] = normal / (value[0].numel() ** 0.5)
        elif key.endswith("weight"):
            state[key] = 1.0 + 0.1 * normal
        else:
            state[key] = 0.1 * normal
    return state


@torch.no_grad()
def outputs(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    logits, embedding = model.eval()(random_input())
    return logits.numpy(), embedding.numpy()


def frontend_frames(golden: Path, meta: dict) -> dict[str, np.ndarray]:
    """The excerpt and the golden frames inside it (module docstring)."""
    waveform = np.load(golden / "metro_32k.npy").reshape(-1)
    out = {"waveform": waveform[EXCERPT_START:EXCERPT_START + EXCERPT_SAMPLES].astype(np.float32)}
    for name, entry in meta["frontends"].items():
        hop, half = entry["kwargs"]["hopsize"], 1024 // 2
        first = -(-half // hop)  # frames reach n_fft / 2 samples back and forth (centered STFT)
        last = (EXCERPT_SAMPLES - 1 - half) // hop  # pre-emphasis leaves L - 1 samples
        frames = range(first, min(last + 1, first + MAX_FRAMES))
        mel = np.load(golden / f"mel_{name}.npy")[0]
        out[name] = mel[:, [EXCERPT_START // hop + t for t in frames]]
        out[f"{name}_first"] = np.array(first)
    return out


def model_outputs(golden: Path, meta: dict) -> dict[str, np.ndarray]:
    """Running statistics and golden outputs of the MN configurations; seeded DyMN outputs."""
    x = torch.from_numpy(np.load(golden / "random_input.npy"))
    assert torch.equal(random_input(), x), "the golden input is no longer torch.manual_seed(0) randn"
    out = {}
    for config, spec in meta["random"].items():
        state = torch.load(golden / f"random_{config}.pt", map_location="cpu", weights_only=True)
        logits, embedding = np.load(golden / f"random_{config}_logits.npy"), \
            np.load(golden / f"random_{config}_embedding.npy")
        if spec["constructor"] == "mn":
            seeded = seeded_mn(spec).state_dict()
            differ = [k for k in state if not torch.equal(seeded[k], state[k])]
            assert all(k.rsplit(".", 1)[-1] in RUNNING_STATS for k in differ), differ
            out.update({f"{config}/{k}": state[k].numpy() for k in differ})
            out.update({f"{config}/logits": logits, f"{config}/embedding": embedding})
            continue
        model = build(spec)
        model.load_state_dict(state)
        ours = outputs(model)
        assert np.abs(ours[0] - logits).max() < 1e-5 and np.abs(ours[1] - embedding).max() < 1e-5
        model.load_state_dict(seeded_state(model))
        out[f"{config}_seeded/logits"], out[f"{config}_seeded/embedding"] = outputs(model)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    golden = parser.parse_args().shared / "golden"
    sys.path.insert(0, str(REPO))
    meta = json.loads((golden / "meta.json").read_text())
    np.savez_compressed(EXPECT / "frontend.npz", **frontend_frames(golden, meta))
    np.savez_compressed(EXPECT / "models.npz", **model_outputs(golden, meta))
    (EXPECT / "frontends.json").write_text(json.dumps(
        {name: entry["kwargs"] for name, entry in meta["frontends"].items()}, indent=1) + "\n")
    (EXPECT / "random_models.json").write_text(json.dumps(meta["random"], indent=1) + "\n")
    with gzip.GzipFile(EXPECT / "state_dict_shapes.json.gz", "wb", compresslevel=9, mtime=0) as f:
        f.write((golden / "state_dict_shapes.json").read_bytes())
    (EXPECT / "complexity_figures.json").write_text(json.dumps(
        flatten(json.loads((golden / "complexity.json").read_text())), indent=1, sort_keys=True) + "\n")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"mn04/mlp/params": 983599, ...}: one figure per path (tests/test_complexity.py rebuilds the tree)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


if __name__ == "__main__":
    main()
