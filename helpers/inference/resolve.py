"""The one model-reference resolver: whatever names a model becomes a `LoadedModel` ready to run.

    resolve_model("mn04_as")                                   # a registry name (the shipped default)
    resolve_model("runs/Custom/best.pt")                       # a training script's checkpoint: its classes
    resolve_model(["mn10_as", "dymn10_as"])                    # an ensemble (logits averaged)
    resolve_model("mn10_as_int8.onnx")                         # an export of export_onnx.py (onnxruntime)
    resolve_model("epoch.pt", arch=ModelConfig("mn10_as"))     # a bare state dict in a given architecture
    resolve_model("mn10_as", RuntimeConfig(device="cuda"), FrontendConfig(fmax=14000))

Every command, the Python API (`efficientat.Tagger`), the HEAR module and AudioSet evaluation
resolve their model here. `ModelRef.parse` is the one rule for what a reference is;
`load_network` builds the torch model a reference names with its frontend settings and classes;
`resolve_model` adds the frontend and the backend that runs it.

Backends (`RuntimeConfig.backend`): "torch" runs registry names, checkpoints and ensembles (on the
CPU as the eval-only fast copies of models/fast.py, on a GPU under fp16 autocast); "onnxruntime"
runs ONNX files, which it is chosen for by default. Another backend is one function
`(ModelRef, RuntimeConfig, FrontendConfig, ModelConfig | None) -> LoadedModel` added to `BACKENDS`.

Spectrogram shape settings (`sr`, `win_length`, `hopsize`, `n_fft`, `n_mels`) are the model's:
on another spectrogram a model gives confident nonsense, so a `FrontendConfig` that contradicts
them is a ValueError; the other settings given replace the model's.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from common.download import sha256sum
from common.labels import label_table
from helpers.inference.onnx_export import OnnxModel
from helpers.inference.tagging import LoadedModel
from models.checkpoint import is_run_record, load_checkpoint, load_finetuned, model_from_weights
from models.config import FrontendConfig, ModelConfig
from models.ensemble import ensemble_frontend_kwargs, get_ensemble_model
from models.factory import FRONTEND_DEFAULTS, create_model, frontend_kwargs
from models.fast import PRECISIONS
from models.frontend_twins import FastMelFrontend
from models.preprocess import AugmentMelSTFT
from models.pretrained import DEFAULT_MODEL, REGISTRY
from models.runtime import fast_inference

logger = logging.getLogger(__name__)

ModelSource = Union[str, os.PathLike, Sequence[str], "ModelRef"]
KINDS = ("registry", "ensemble", "checkpoint", "onnx")


@dataclass(frozen=True)
class ModelRef:
    """What a model reference names: `kind` "registry" (a name of models.pretrained.REGISTRY),
    "ensemble" (several names), "checkpoint" (a .pt file: a training script's checkpoint, or a
    bare state dict given an architecture) or "onnx" (an .onnx file); `names` or `path`."""
    kind: str
    names: tuple[str, ...] = ()
    path: Optional[Path] = None

    @classmethod
    def parse(cls, model: ModelSource) -> "ModelRef":
        """The one rule: a list or tuple is an ensemble; a registry name is itself; a name ending
        in .onnx is an ONNX file; any other path (a suffix or a folder in it) a checkpoint file;
        anything else an unknown registry name (loading it names the closest ones)."""
        if isinstance(model, ModelRef):
            return model
        if not isinstance(model, (str, os.PathLike)):
            names = tuple(str(n) for n in model)
            if not names:
                raise ValueError("an ensemble needs at least one model name")
            return cls("ensemble", names)
        if str(model) in REGISTRY:
            return cls("registry", (str(model),))
        path = Path(model)
        if path.suffix.lower() == ".onnx":
            return cls("onnx", path=path)
        if path.suffix or len(path.parts) > 1:
            return cls("checkpoint", path=path)
        return cls("registry", (str(model),))

    def checksum(self) -> str:
        """What the weights are: a registry name's released file (its sha256 where known, else its
        file name), an ensemble's, a file's sha256. Outputs record it (`tagging.model_record`)."""
        if self.kind in ("registry", "ensemble"):
            return ",".join(REGISTRY[n].sha256 or f"release:{REGISTRY[n].filename}" for n in self.names)
        return "sha256:" + sha256sum(self.path)

    @property
    def label(self) -> str:
        """How results name the model: the registry name, ensemble(a, b), or the file."""
        if self.kind == "ensemble":
            return "ensemble(" + ", ".join(self.names) + ")"
        return self.names[0] if self.kind == "registry" else str(self.path)


@dataclass(frozen=True)
class RuntimeConfig:
    """How a resolved model runs: `device` ("cpu", "cuda", ...), `precision` of the CPU fast path
    ("fp32", or "bf16" on CPUs with native bfloat16), `backend` (a key of BACKENDS; an ONNX file
    runs on onnxruntime whatever is asked) and `fast` (torch on the CPU: the eval-only fast copies;
    False: the plain modules, e.g. for an ONNX export)."""
    device: str = "cpu"
    precision: str = "fp32"
    backend: str = "torch"
    fast: bool = True

    def torch_device(self) -> torch.device:
        """The device, checked: ValueError for a precision or backend that does not exist and for
        CUDA without a GPU (a user would otherwise wait for a CPU run believing it a GPU one)."""
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but PyTorch sees no CUDA GPU (--cuda: leave it out "
                             "to run on the CPU)")
        return device


@dataclass
class Network:
    """What a reference names before it runs: the torch `model` (eval mode, on the CPU), the
    frontend `settings` it was trained with, its `class_names` (with AudioSet MIDs `class_ids`
    where the classes are AudioSet's), whether it is `multilabel` (sigmoid; else softmax) and the
    `name` results carry."""
    model: nn.Module
    settings: dict[str, Any]
    class_names: list[str]
    class_ids: Optional[list[str]]
    multilabel: bool
    name: str


def _classes(num_classes: int) -> tuple[list[str], Optional[list[str]]]:
    """Class names and MIDs of a model with `num_classes` outputs: AudioSet's for 527."""
    if num_classes != 527:
        return [f"class {i}" for i in range(num_classes)], None
    table = label_table()
    return [n for _, n in table], [mid for mid, _ in table]


def _checkpoint_network(ref: ModelRef, arch: Optional[ModelConfig], given: dict[str, Any]) -> Network:
    """A training script's checkpoint (its own classes and settings), or with `arch` a bare state
    dict (or {"model": state dict}) in that architecture, any class count."""
    state = load_checkpoint(ref.path)
    if is_run_record(state) or arch is None:
        model, settings, names, multilabel = load_finetuned(ref.path, state)
        check_frontend(ref.label, settings, given)
        return Network(model, {**settings, **given}, names, None, multilabel, ref.label)
    settings = frontend_kwargs(arch.name if arch.name in REGISTRY else None)
    check_frontend(ref.label, settings, given)
    what = f"the architecture of {arch.name}" if arch.pretrained else (
        f"{arch.name} of width {arch.width:g}" + (f", head {arch.head_type}" if arch.head_type else "")
        + (f", strides {list(arch.strides)}" if arch.strides else ""))
    model = model_from_weights(state.get("model", state), arch.to_dict(527), ref.path, what)
    return Network(model, {**settings, **given}, *_classes(model.num_classes), True, ref.label)


def load_network(ref: ModelRef, arch: Optional[ModelConfig] = None,
                 frontend: FrontendConfig = FrontendConfig()) -> Network:
    """The torch model `ref` names (registry names with their released weights, downloaded once
    unless shipped) and its frontend settings with `frontend`'s over them, checked (`check_frontend`)
    before any weights are read where the settings are known without them. `arch`'s strides /
    head_type apply to a registry name (they must be the checkpoint's), and `arch` is the
    architecture of a bare state dict file."""
    given = frontend.given()
    if ref.kind == "checkpoint":
        return _checkpoint_network(ref, arch, given)
    if ref.kind not in ("ensemble", "registry"):
        raise ValueError(f"{ref.label}: an {ref.kind} model has no torch network")
    settings = ensemble_frontend_kwargs(list(ref.names)) if ref.kind == "ensemble" else frontend_kwargs(ref.names[0])
    check_frontend(ref.label, settings, given)
    if ref.kind == "ensemble":
        model = get_ensemble_model(list(ref.names))
    else:
        model = create_model(ref.names[0], **(arch.architecture() if arch is not None else {}))
    return Network(model.eval(), {**settings, **given}, *_classes(527), True, ref.label)


def check_frontend(name: str, settings: dict[str, Any], given: dict[str, Any]) -> None:
    """ValueError naming the spectrogram settings in `given` that differ from the trained `settings`."""
    wrong = [f"{key}={settings.get(key)}, not {value}" for key, value in given.items()
             if key in FRONTEND_DEFAULTS and value is not None and settings.get(key) != value]
    if wrong:
        raise ValueError(f"{name} was trained with {'; '.join(wrong)}: leave the spectrogram settings to "
                         "the model (another spectrogram gives meaningless tags)")


def _on_torch(ref: ModelRef, runtime: RuntimeConfig, frontend: FrontendConfig,
              arch: Optional[ModelConfig]) -> LoadedModel:
    device = runtime.torch_device()
    network = load_network(ref, arch, frontend)
    model = network.model.to(device).eval()
    mel = AugmentMelSTFT(**network.settings).to(device).eval()
    if runtime.fast:
        model, mel = fast_inference(model, mel, runtime.precision)
    return LoadedModel(model, mel, network.class_names, network.name, device, network.class_ids, network.multilabel)


def _on_onnxruntime(ref: ModelRef, runtime: RuntimeConfig, frontend: FrontendConfig,
                    arch: Optional[ModelConfig]) -> LoadedModel:
    """An ONNX export on the CPU in fp32, on the spectrogram settings stored in it at export
    (`arch`'s name and `frontend` must agree with them); an export from before the settings were
    stored gets `arch`'s (default: the default model's) with `frontend`, and a warning."""
    if ref.kind != "onnx":
        raise ValueError(f"{ref.label}: onnxruntime runs an ONNX file; export the model with export_onnx.py")
    if runtime.torch_device().type != "cpu" or runtime.precision != "fp32":
        raise ValueError(f"{ref.path}: an ONNX model runs on the CPU in fp32 (onnxruntime)")
    model = OnnxModel(ref.path)
    named = arch.name if arch is not None else None
    settings = model.frontend_settings
    if settings is None:
        logger.warning("%s holds no spectrogram settings (exported before they were stored): assuming "
                       "%s's; export it again to have them checked", ref.path, named or DEFAULT_MODEL)
        settings = frontend_kwargs(named or DEFAULT_MODEL, **frontend.given())
    elif named is not None:
        check_frontend(str(ref.path), settings, frontend_kwargs(named))
    check_frontend(str(ref.path), settings, frontend.given())
    if model.n_mels is not None and model.n_mels != settings["n_mels"]:
        raise ValueError(f"{ref.path} takes spectrograms of {model.n_mels} mel bands, not {settings['n_mels']}: "
                         "leave the spectrogram settings to the model")
    names, ids = _classes(model.num_classes)
    return LoadedModel(model, FastMelFrontend(AugmentMelSTFT(**settings)), names, str(ref.path), torch.device("cpu"),
                       ids, model_takes_waveforms=model.takes_waveforms)


Backend = Callable[[ModelRef, RuntimeConfig, FrontendConfig, Optional[ModelConfig]], LoadedModel]
BACKENDS: dict[str, Backend] = {"torch": _on_torch, "onnxruntime": _on_onnxruntime}


def resolve_model(model: ModelSource = DEFAULT_MODEL, runtime: RuntimeConfig = RuntimeConfig(),
                  frontend: FrontendConfig = FrontendConfig(), arch: Optional[ModelConfig] = None) -> LoadedModel:
    """The `LoadedModel` for `model` (a registry name, a list of names, a checkpoint or state-dict
    file, an ONNX file, or a `ModelRef`; see the module doc) run as `runtime` says, with the
    `frontend` settings given over the model's and, for a registry name or a bare state dict,
    the architecture `arch`. ValueError (one line) for anything that does not resolve."""
    ref = ModelRef.parse(model)
    backend = "onnxruntime" if ref.kind == "onnx" and runtime.backend == "torch" else runtime.backend
    runtime.torch_device()  # checked before anything is loaded
    loaded = BACKENDS[backend](ref, runtime, frontend, arch)
    overrides = arch.architecture() if arch is not None and ref.kind == "registry" else {}
    loaded.checksum = ref.checksum() + "".join(f" {k}={v}" for k, v in sorted(overrides.items()))
    return loaded
