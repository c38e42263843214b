"""The front door to the models: the family registry (family name -> builder), building any
released model by name, and building a model from the configuration dict a training checkpoint
stores.

    build_model("mn", num_classes, pretrained_name, width_mult=..., strides=..., head_type=...)
    create_model("dymn10_as")                     # a released model with its weights
    config = model_config("mn10_as", 50, pretrained=True)
    model = model_from_config(config)             # what training scripts and checkpoints use

Every family's model has the interface of `models.layers.AudioTagger` (forward_features,
forward_head, reset_classifier, update_params).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import nn

from models.dymn import fast as dymn_fast
from models.dymn.dy_block import DynamicInvertedResidual
from models.dymn.arch import build_dymn
from models.mn import fast as mn_fast
from models.mn.block_types import InvertedResidual
from models.mn.arch import build_mn
from models.preprocess import SPECTROGRAM_SHAPE, AugmentMelSTFT
from models.pretrained import REGISTRY, get_entry, load_pretrained_weights, resolve_model_kwargs

FRONTEND_DEFAULTS = {key: value for key, value in AugmentMelSTFT().eval_settings().items()
                     if key in SPECTROGRAM_SHAPE}  # what a model without a registry entry is fed


@dataclass(frozen=True)
class Family:
    """A model family, everything the rest of the code needs to know of it: `label` its display
    name, `prefix` the start of its model names ("dymn04_as"), `build` its builder (plain
    architecture arguments, fresh weights), `pretrained_defaults` the arguments a released
    checkpoint runs with unless given (DyMN's final temperature);
    `options(arch, settings)` gives the family-specific entries of a model configuration and
    `build_options(config)` the family-specific keyword arguments of `build` for one;
    `block_types` the blocks complexity analysis counts; `fast_twins` (block type -> eval-only
    twin builder, models/fast.py) and `export_twins` (layer type -> ONNX-exportable twin);
    `cli_options` the training scripts' family-specific flags (name -> argparse keywords), whose
    values `options` reads."""
    label: str
    prefix: str
    build: Callable[..., nn.Module]
    options: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
    build_options: Callable[[Mapping[str, Any]], dict[str, Any]]
    block_types: tuple[type, ...]
    pretrained_defaults: Mapping[str, Any] = field(default_factory=dict)
    cli_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    fast_twins: Mapping[type, Callable[[nn.Module], nn.Module]] = field(default_factory=dict)
    export_twins: Mapping[type, Callable[[nn.Module], nn.Module]] = field(default_factory=dict)

    def accepts(self, argument: str) -> bool:
        """Whether `build` takes this keyword argument (e.g. se_dims: MN only)."""
        return argument in inspect.signature(self.build).parameters


def _mn_options(arch: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    return {"se_dims": settings["se_dims"]}


def _dymn_options(arch: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    # DyMN temperature: a pretrained start runs the schedule from its final temperature
    return {"use_dy_blocks": arch.get("use_dy_blocks", "all"),
            "T_max": settings["pretrain_final_temp"] if settings["pretrained"] else 30.0}


FAMILIES: dict[str, Family] = {
    "mn": Family("MN", "mn", build_mn, _mn_options, lambda c: {"se_dims": c["se_dims"]}, (InvertedResidual,),
                 fast_twins=mn_fast.FAST_TWINS,
                 cli_options={"se_dims": {"type": str, "default": "c", "help": "MN squeeze-excitation dimensions"}}),
    "dymn": Family("DyMN", "dymn", build_dymn, _dymn_options,
                   lambda c: {"use_dy_blocks": c["use_dy_blocks"], "T_max": c["T_max"]},
                   (InvertedResidual, DynamicInvertedResidual), pretrained_defaults={"T_max": 1.0},
                   cli_options={"pretrain_final_temp": {"type": float, "default": 1.0,
                                                        "help": "DyMN starting temperature when pretrained"}},
                   fast_twins={**mn_fast.FAST_TWINS, **dymn_fast.FAST_TWINS}, export_twins=dymn_fast.EXPORT_TWINS),
}


DEFAULT_FAMILY = "mn"  # of names without a family prefix (and of no name)


def family_of(name: Optional[str]) -> str:
    """The family of a registry name, else of a name's prefix ("dymn04" -> "dymn"); DEFAULT_FAMILY
    otherwise."""
    if name in REGISTRY:
        return REGISTRY[name].family
    prefixes = sorted((f for f, family in FAMILIES.items() if name and name.startswith(family.prefix)),
                      key=lambda f: len(FAMILIES[f].prefix), reverse=True)
    return prefixes[0] if prefixes else DEFAULT_FAMILY


def build_model(family_name: str, num_classes: int = 527, pretrained_name: Optional[str] = None,
                **arch: Any) -> nn.Module:
    """A model of family `family_name`. With `pretrained_name` its registry entry is resolved here,
    once: architecture arguments left at None take the entry's values (an explicit value the
    checkpoint cannot take is a ValueError), then the family's `pretrained_defaults`, and the
    released weights are loaded strictly. Arguments left at None take the builder's defaults."""
    family = FAMILIES[family_name]
    if pretrained_name:
        entry = get_entry(pretrained_name)
        if entry.family != family_name:
            raise ValueError(f"{pretrained_name!r} is a {entry.family.upper()} checkpoint; build it with "
                             f"models.{entry.family}.model.get_model")
        arch = resolve_model_kwargs(entry, {**dict.fromkeys(entry.model_kwargs), **arch})
        arch.update({k: v for k, v in family.pretrained_defaults.items() if arch.get(k) is None})
    model = family.build(num_classes=num_classes, **{k: v for k, v in arch.items() if v is not None})
    if pretrained_name:
        load_pretrained_weights(model, pretrained_name)
    return model


def create_model(name: str, num_classes: int = 527, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """The model `name` (MN or DyMN) with its released weights, in train mode like any new module.

    With pretrained=False the same architecture (the registry's model arguments, where `kwargs`
    that are not None override them) is built with fresh weights and nothing is downloaded, e.g.
    for complexity analysis or training from scratch."""
    entry = get_entry(name)
    if pretrained:
        return build_model(entry.family, num_classes, name, **kwargs)
    arch = {**entry.model_kwargs, **{k: v for k, v in kwargs.items() if v is not None}}
    return FAMILIES[entry.family].build(num_classes=num_classes, **arch)


def model_config(name: Optional[str], num_classes: int, pretrained: bool = False, width_mult: float = 1.0,
                 strides: Optional[Sequence[int]] = None, head_type: Optional[str] = None,
                 se_dims: str = "c", pretrain_final_temp: float = 1.0) -> dict[str, Any]:
    """A model's full configuration (family, classes, width, strides, head, family options):
    with `pretrained` the architecture comes from the registry entry of `name` (explicit strides /
    head_type win), otherwise from the arguments, the family from the name's prefix. Stored in
    checkpoints so `model_from_config` rebuilds the model without the command line."""
    family = family_of(name)
    arch: dict[str, Any] = {"width_mult": width_mult, "strides": [2, 2, 2, 2], "head_type": "mlp"}
    if pretrained:
        entry = get_entry(name)
        family = entry.family
        arch.update(entry.model_kwargs)
    if strides is not None:
        arch["strides"] = list(strides)
    if head_type is not None:
        arch["head_type"] = head_type
    config = {"family": family, "num_classes": num_classes, "width_mult": arch["width_mult"],
              "strides": list(arch["strides"]), "head_type": arch["head_type"],
              "pretrained_name": name if pretrained else None}
    settings = {"se_dims": se_dims, "pretrained": pretrained, "pretrain_final_temp": pretrain_final_temp}
    return {**config, **FAMILIES[family].options(arch, settings)}


def model_from_config(config: Mapping[str, Any], load_pretrained: bool = True,
                      epoch: Optional[int] = None) -> nn.Module:
    """Build the model a `model_config` dict describes. With `load_pretrained` and a pretrained
    name its released weights are loaded (the classifier is re-initialized for a different class
    count). A model restored after training epoch `epoch` gets that epoch's settings
    (`update_params`: DyMN's softmax temperature, which is not part of the state dict)."""
    family = FAMILIES[config["family"]]
    pretrained = config.get("pretrained_name") if load_pretrained else None
    model = build_model(config["family"], config["num_classes"], pretrained, width_mult=config["width_mult"],
                        strides=tuple(config["strides"]), head_type=config["head_type"],
                        **family.build_options(config))
    if epoch is not None:
        model.update_params(epoch)
    return model


def frontend_kwargs(name: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Frontend settings for model `name` (registry values over the defaults); overrides that are
    not None win."""
    settings = dict(FRONTEND_DEFAULTS)
    if name is not None:
        settings.update(get_entry(name).frontend_kwargs)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def create_frontend(name: str | None = None, **overrides: Any) -> AugmentMelSTFT:
    """The eval-mode frontend model `name` was trained with; see `frontend_kwargs`."""
    return AugmentMelSTFT(**frontend_kwargs(name, **overrides)).eval()
