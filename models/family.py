"""The plug-in interface of a model family: the `Family` record a family package defines as
`FAMILY` (models/families.py lists the packages and assembles FAMILIES and REGISTRY from them),
the registry row of a released checkpoint (`PretrainedEntry`), a family-specific setting
(`Option`) and how the shared long-recording pass runs a stage type (`SharedStage`).

A family's record is everything the rest of the code knows of it; nothing outside its folder
names it. docs/architecture.md ("A model family") walks through a new one.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

RELEASE_URL = "https://github.com/fschmid56/EfficientAT/releases/download/v0.0.1/"


@dataclass(frozen=True)
class PretrainedEntry:
    """One released checkpoint: its file (at `base_url`), the family and model arguments it needs,
    the frontend arguments it was trained with and its published figures (AudioSet mAP in
    percent, parameters in millions, MACs of a 10-s clip in billions)."""
    name: str
    filename: str
    family: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    frontend_kwargs: dict[str, Any] = field(default_factory=dict)
    map: Optional[float] = None
    params_m: Optional[float] = None
    macs_g: Optional[float] = None
    sha256: Optional[str] = None
    description: str = ""
    base_url: str = RELEASE_URL

    @property
    def url(self) -> str:
        return self.base_url + self.filename

    @property
    def audioset(self) -> bool:
        """True for AudioSet-trained taggers (527 meaningful outputs); False for ImageNet inits."""
        return "_as" in self.name


@dataclass(frozen=True)
class Option:
    """A family-specific setting: a flag of the training scripts (`--<name>`) whose value the
    family's `config` turns into model-configuration entries. An `architecture` option is a
    keyword argument of the family's builder as well, which complexity.py also offers."""
    type: Callable[[str], Any]
    default: Any
    help: str
    architecture: bool = False


def _no_gate(stage: nn.Module) -> None:
    return None


@dataclass(frozen=True)
class SharedStage:
    """How the shared pass over a long recording (helpers/inference/shared_pass.py) runs one stage
    type. `gate(stage)`: the stage's channel gate, pooled context (B, T, C) -> scale (B, T, C),
    or None where the stage is local in time (it then runs as it is). `run(stage, x, scale)`: the
    stage on x with its gate's output replaced by `scale(h)`, the moving-window scale
    (B, C, 1, T) of the feature map h the gate would pool. `refusal(stage)`: why this stage
    cannot be shared (None: it can). A stage type no family lists and that is not a plain
    convolution makes the model run exact windows."""
    gate: Callable[[nn.Module], Optional[Callable[[torch.Tensor], torch.Tensor]]] = _no_gate
    run: Optional[Callable[[nn.Module, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]] = None
    refusal: Callable[[nn.Module], Optional[str]] = _no_gate


def _no_entries(*args: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Family:
    """A model family. Identity: `name` (the key in FAMILIES and in stored model configurations),
    `label` (display name), `prefix` (start of its model names, "mn04_as"), `weights_prefix`
    (start of the training scripts' per-epoch weight files; default `prefix`).

    Building: `build(num_classes=..., **arch)` a fresh model (a `models.layers.AudioTagger`) from
    plain architecture arguments; `width_mult`, `strides` and `head_type` where it takes them
    are the training scripts' --model_width, --strides, --head_type. `entries`: its released
    checkpoints. `widths`: name prefix -> width multiplier ("mn04" -> 0.4).
    `pretrained_defaults`: build arguments a released checkpoint runs with unless given.
    `input_size_kwargs(size)`: build arguments that follow the input spectrogram size
    (1, 1, mel bins, frames), for complexity analysis.

    Options: `options` (name -> Option) are the training scripts' family flags; `config(arch,
    options, pretrained)` the family's entries of a model configuration (arch: the architecture
    resolved so far; options: this family's option values) and `build_options(config)` the
    build arguments read back from one (checkpoints store the configuration).

    Inference: `fast_twins` (block type -> eval-only twin builder, models/fast.py),
    `export_twins` (layer type -> ONNX-exportable twin), `shared_pass` (stage type ->
    SharedStage; without it the family's models run exact windows), `feature_maps` (how many
    feature maps forward(x, return_fmaps=True) returns: the range of embeddings.py --layer).

    Complexity: `blocks` (block type -> (residual connection, squeeze-excitation over the whole
    map)) are the inverted-residual blocks the memory-efficient peak-memory rule slices;
    `dynamic_convs` (layer type with Conv2d's geometry attributes -> number of kernels it mixes
    per sample) the convolutions counted beside Conv2d. `plot_styles` (series -> matplotlib
    colour and marker) and `plot_series(row)` (which series a registry_costs row is drawn in;
    default the label) style the complexity figures."""
    name: str
    label: str
    prefix: str
    build: Callable[..., nn.Module]
    feature_maps: int
    entries: Sequence[PretrainedEntry] = ()
    widths: Mapping[str, float] = field(default_factory=dict)
    pretrained_defaults: Mapping[str, Any] = field(default_factory=dict)
    input_size_kwargs: Callable[[Sequence[int]], dict[str, Any]] = _no_entries
    options: Mapping[str, Option] = field(default_factory=dict)
    config: Callable[[Mapping[str, Any], Mapping[str, Any], bool], dict[str, Any]] = _no_entries
    build_options: Callable[[Mapping[str, Any]], dict[str, Any]] = _no_entries
    fast_twins: Mapping[type, Callable[[nn.Module], nn.Module]] = field(default_factory=dict)
    export_twins: Mapping[type, Callable[[nn.Module], nn.Module]] = field(default_factory=dict)
    shared_pass: Mapping[type, SharedStage] = field(default_factory=dict)
    blocks: Mapping[type, Callable[[nn.Module], tuple[bool, bool]]] = field(default_factory=dict)
    dynamic_convs: Mapping[type, Callable[[nn.Module], int]] = field(default_factory=dict)
    plot_styles: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    plot_series: Optional[Callable[[Mapping[str, Any]], str]] = None
    weights_prefix: str = ""

    def __post_init__(self) -> None:
        if not self.weights_prefix:
            object.__setattr__(self, "weights_prefix", self.prefix)
        foreign = [e.name for e in self.entries if e.family != self.name]
        if foreign:
            raise ValueError(f"family {self.name!r}: entries {', '.join(foreign)} name another family")

    def accepts(self, argument: str) -> bool:
        """Whether `build` takes this keyword argument (e.g. strides)."""
        return argument in inspect.signature(self.build).parameters

    def default(self, argument: str) -> Any:
        """The builder's default value of `argument`."""
        return inspect.signature(self.build).parameters[argument].default

    def series(self, row: Mapping[str, Any]) -> str:
        """The complexity-figure series of a registry_costs row of this family."""
        return self.plot_series(row) if self.plot_series else self.label

    def option_values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """This family's option values: those `given` that are not None, else their defaults."""
        return {name: given[name] if given.get(name) is not None else option.default
                for name, option in self.options.items()}
