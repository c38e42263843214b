"""A model family from outside the repository: a tiny 2-block CNN generated as a package in a
temporary folder and registered the documented way (its module named in $EFFICIENTAT_FAMILIES,
the package on PYTHONPATH; models/families.py), then run through what the released families run
through: `create_model` with its "released" weights, the fast path, a fine-tuning script whose
checkpoint `inference.py --checkpoint` tags with, `complexity.py`, `export_onnx.py`, the
--layer range and the shared long-recording pass (which it does not support: exact windows).
Every step runs in a fresh interpreter, as a user's would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.datagen import make_custom

FAMILY_SOURCE = '''
"""TinyCNN: two strided conv blocks and the mlp head, a model family kept outside EfficientAT."""
from torch import nn

from models.family import Family, Option, PretrainedEntry
from models.layers import AudioTagger, classification_head, init_weights, make_divisible


class TinyBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.norm(self.conv(x)).relu()


class TinyCNN(AudioTagger):
    def __init__(self, num_classes: int, channels: int, head_type: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([TinyBlock(1, channels), TinyBlock(channels, 2 * channels)])
        self.classifier = classification_head(head_type, 2 * channels, 32, num_classes, dropout=0.1)
        self.head_type, self.head_args = head_type, (32, 4, 0.1)
        self.embedding_dim, self.num_classes = 2 * channels, num_classes
        init_weights(self)

    def stages(self):
        return self.blocks


def build_tiny(num_classes=527, width_mult=1.0, head_type="mlp", tiny_channels=16):
    return TinyCNN(num_classes, make_divisible(tiny_channels * width_mult), head_type)


FAMILY = Family(
    name="tiny", label="TinyCNN", prefix="tiny", build=build_tiny, feature_maps=2, widths={"tiny10": 1.0},
    entries=[PretrainedEntry("tiny10_as", "tiny10_as.pt", "tiny", {"width_mult": 1.0},
                             base_url="http://127.0.0.1:9/never/")],
    options={"tiny_channels": Option(int, 16, "TinyCNN channels of the first block", architecture=True)},
    config=lambda arch, options, pretrained: {"tiny_channels": options["tiny_channels"]},
    build_options=lambda config: {"tiny_channels": config["tiny_channels"]},
)
'''

IN_PROCESS_CHECKS = '''
import json, sys
import torch
from models.factory import FAMILIES, REGISTRY, build_model, create_model, create_frontend
from models.runtime import for_inference
from helpers.inference.tagging import LoadedModel as Tagger
from helpers.inference.windows import shared_support
from common.errors import InputError
import embeddings

assert list(FAMILIES)[-1] == "tiny" and REGISTRY["tiny10_as"].family == "tiny"
torch.manual_seed(0)
released = build_model("tiny", 527).eval()
for m in released.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 2.0)
torch.nn.init.normal_(released.classifier[-1].weight, std=0.5)
torch.save(released.state_dict(), sys.argv[1])  # the family's "released" file, in the cache
model = create_model("tiny10_as").eval()  # loads it strictly
x = torch.randn(2, 1, 128, 200)
with torch.no_grad():
    expected, fast = released(x), for_inference(model)(x)
    assert torch.equal(model(x)[0], expected[0])
assert (fast[0] - expected[0]).abs().max() < 1e-4 and (fast[1] - expected[1]).abs().max() < 1e-4
tagger = Tagger(for_inference(model), create_frontend("tiny10_as"), ["c"] * 527, "tiny10_as", torch.device("cpu"))
reason = shared_support(tagger)
embeddings.parse_args(["--audio_path", "x.wav", "--output", "e.npz", "--model", "tiny10_as", "--layer", "-2"])
try:
    embeddings.parse_args(["--audio_path", "x.wav", "--output", "e.npz", "--model", "tiny10_as", "--layer", "2"])
    layer_error = None
except InputError as e:
    layer_error = str(e)
print(json.dumps({"shared": reason, "layer_error": layer_error,
                  "params": sum(p.numel() for p in model.parameters())}))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(folder, environment) of the registered tiny family; its weights file goes to cache/."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "tinycnn").mkdir()
    (root / "tinycnn" / "__init__.py").write_text("")
    (root / "tinycnn" / "family.py").write_text(textwrap.dedent(FAMILY_SOURCE))
    (root / "cache").mkdir()
    env = {**os.environ, "EFFICIENTAT_FAMILIES": "tinycnn.family", "EFFICIENTAT_MODEL_DIR": str(root / "cache"),
           "PYTHONPATH": os.pathsep.join([str(root), str(REPO)]), "OMP_NUM_THREADS": "1"}
    return root, env


def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def released(tiny: tuple[Path, dict[str, str]]) -> dict:
    """The in-process checks' findings, after they wrote the family's released weights."""
    root, env = tiny
    proc = run(env, "-c", IN_PROCESS_CHECKS, str(root / "cache" / "tiny10_as.pt"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_registered_family_builds_loads_and_runs_fast(released: dict) -> None:
    assert released["params"] == (9 * 16 + 2 * 16) + (9 * 16 * 32 + 2 * 32) + (32 * 32 + 32) + (32 * 527 + 527)
    assert "TinyBlock stages have no shared-pass support" in released["shared"]  # exact windows
    assert released["layer_error"] == "--layer must be in -2..1 (tiny10_as has 2 feature maps), got 2"


def test_fine_tuned_checkpoint_is_tagged_by_inference(tiny: tuple[Path, dict[str, str]], released: dict) -> None:
    root, env = tiny
    data = make_custom(root / "mine", clips_per_class=4, split=True)
    out = root / "run"
    proc = run(env, "ex_custom.py", "--dataset_dir", str(data), "--recipe", "finetune", "--pretrained_name",
               "tiny10_as", "--tiny_channels", "16", "--n_epochs", "1", "--clip_length", "1", "--out_dir", str(out),
               "--num_workers", "0", "--logger", "none", "--batch_size", "4", "--warm_up_len", "0")
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("tiny10_custom_epoch_0_*.pt"))) == 1  # the family's weight-file prefix
    clips = [data / "clips" / "a" / f"{kind}_0.wav" for kind in ("tone", "noise")]
    proc = run(env, "inference.py", "--checkpoint", str(out / "best.pt"), "--audio_path", *map(str, clips),
               "--top_k", "2", "--output", str(root / "tags.json"))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((root / "tags.json").read_text())["results"]
    assert len(results) == 2 and {t["label"] for t in results[0]["tags"]} == {"noise", "tone"}


def test_complexity_counts_the_family(tiny: tuple[Path, dict[str, str]]) -> None:
    """Channels 8: convs 8 * 9 * 64 * 500 + 16 * 72 * 32 * 250 MACs on a 10-s clip; the mlp head's
    Linear layers 16 * 32 + 32 and 32 * 527 + 527."""
    _, env = tiny
    proc = run(env, "complexity.py", "--model_name", "tiny10_as", "--tiny_channels", "8")
    assert proc.returncode == 0, proc.stderr
    assert "Conv2d: 2 layers, 11520000 MACs" in proc.stdout and "Linear: 2 layers, 17935 MACs" in proc.stdout
    proc = run(env, "complexity.py", "--model_name", "tiny10_as", "--complexity_type", "memory",
               "--memory_efficient_inference")  # no inverted residual blocks: layer by layer
    assert proc.returncode == 0, proc.stderr
    assert "conv 2 memory: " in proc.stdout


def test_export_onnx_checks_the_family(tiny: tuple[Path, dict[str, str]], released: dict) -> None:
    pytest.importorskip("onnxruntime")
    root, env = tiny
    proc = run(env, "export_onnx.py", "--model", "tiny10_as", "--with_frontend", "--output", str(root / "t.onnx"),
               "--check", str(REPO / "resources" / "demo_bells.wav"))
    assert proc.returncode == 0, proc.stderr
    assert "(tolerance 1e-04): OK" in proc.stdout


def test_a_family_that_is_not_registered_is_named(tiny: tuple[Path, dict[str, str]]) -> None:
    _, env = tiny
    proc = run({**env, "EFFICIENTAT_FAMILIES": "tinycnn.nothing"}, "complexity.py")
    assert proc.returncode != 0 and "model family module 'tinycnn.nothing' (from $EFFICIENTAT_FAMILIES)" in proc.stderr
