"""The front door to the models: building any released model by name, and building a model from
the configuration dict a training checkpoint stores. The families and the registry are
assembled from the family packages (models/families.py; the interface is models/family.py).

    build_model("mn", num_classes, pretrained_name, width_mult=..., strides=..., head_type=...)
    create_model("dymn10_as")                     # a released model with its weights
    config = model_config("mn10_as", 50, pretrained=True)
    model = model_from_config(config)             # what training scripts and checkpoints use

Every family's model has the interface of `models.layers.AudioTagger` (forward_features,
forward_head, reset_classifier, update_params).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch import nn

from models.families import DEFAULT_FAMILY, ENV_VAR, FAMILIES, OPTIONS
from models.family import Family
from models.preprocess import SPECTROGRAM_SHAPE, AugmentMelSTFT
from models.pretrained import REGISTRY, get_entry, load_pretrained_weights, resolve_model_kwargs

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "FRONTEND_DEFAULTS", "Family", "OPTIONS", "REGISTRY", "build_model",
           "create_frontend", "create_model", "family_of", "family_options", "feature_maps", "frontend_kwargs",
           "get_entry", "get_family", "model_config", "model_from_config"]

FRONTEND_DEFAULTS = {key: value for key, value in AugmentMelSTFT().eval_settings().items()
                     if key in SPECTROGRAM_SHAPE}  # what a model without a registry entry is fed
ARCHITECTURE = ("width_mult", "strides", "head_type")  # the training scripts' architecture flags


def get_family(name: str) -> Family:
    """The family `name`; ValueError naming the known ones for a family that is not registered."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model family {name!r} is not registered (known: {', '.join(FAMILIES)}); list its "
                         f"module in models/families.py or in ${ENV_VAR}") from None


def family_of(name: Optional[str]) -> str:
    """The family of a registry name, else of a name's prefix ("dymn04" -> "dymn"); DEFAULT_FAMILY
    otherwise."""
    if name in REGISTRY:
        return REGISTRY[name].family
    prefixes = sorted((f for f, family in FAMILIES.items() if name and name.startswith(family.prefix)),
                      key=lambda f: len(FAMILIES[f].prefix), reverse=True)
    return prefixes[0] if prefixes else DEFAULT_FAMILY


def feature_maps(name: Optional[str]) -> int:
    """How many feature maps model `name` returns with return_fmaps (its family's count)."""
    return FAMILIES[family_of(name)].feature_maps


def family_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """The family options (of every family, `OPTIONS`) found in `values`, e.g. parsed arguments."""
    return {name: values[name] for name in OPTIONS if name in values}


def _check_accepted(family: Family, arch: Mapping[str, Any]) -> None:
    """ValueError for an architecture argument given (not None) that the family's builder lacks."""
    foreign = [k for k, v in arch.items() if v is not None and not family.accepts(k)]
    if foreign:
        raise ValueError(f"{family.label} models take no {', '.join(foreign)}")


def build_model(family_name: str, num_classes: int = 527, pretrained_name: Optional[str] = None,
                **arch: Any) -> nn.Module:
    """A model of family `family_name`. With `pretrained_name` its registry entry is resolved here,
    once: architecture arguments left at None take the entry's values (an explicit value the
    checkpoint cannot take is a ValueError), then the family's `pretrained_defaults`, and the
    released weights are loaded strictly. Arguments left at None take the builder's defaults."""
    family = get_family(family_name)
    if pretrained_name:
        entry = get_entry(pretrained_name)
        if entry.family != family_name:
            raise ValueError(f"{pretrained_name!r} is a {entry.family.upper()} checkpoint, not a "
                             f"{family_name.upper()} one; build it with models.factory.create_model")
        arch = resolve_model_kwargs(entry, {**dict.fromkeys(entry.model_kwargs), **arch})
        arch.update({k: v for k, v in family.pretrained_defaults.items() if arch.get(k) is None})
    _check_accepted(family, arch)
    model = family.build(num_classes=num_classes, **{k: v for k, v in arch.items() if v is not None})
    if pretrained_name:
        load_pretrained_weights(model, pretrained_name)
    return model


def create_model(name: str, num_classes: int = 527, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """The model `name` (of any registered family) with its released weights, in train mode like
    any new module.

    With pretrained=False the same architecture (the registry's model arguments, where `kwargs`
    that are not None override them) is built with fresh weights and nothing is downloaded, e.g.
    for complexity analysis or training from scratch."""
    entry = get_entry(name)
    if pretrained:
        return build_model(entry.family, num_classes, name, **kwargs)
    given = {k: v for k, v in kwargs.items() if v is not None}
    return build_model(entry.family, num_classes, None, **{**entry.model_kwargs, **given})


def model_config(name: Optional[str], num_classes: int, pretrained: bool = False, width_mult: float = 1.0,
                 strides: Optional[Sequence[int]] = None, head_type: Optional[str] = None,
                 **options: Any) -> dict[str, Any]:
    """A model's full configuration (family, classes, the width, strides and head its family's
    builder takes, the family's entries): with `pretrained` the architecture comes from the
    registry entry of `name` (explicit strides / head_type win), otherwise from the arguments
    and the builder's defaults, the family from the name's prefix. `options`: family options
    (`OPTIONS`; each family reads its own, the others are ignored). Stored in checkpoints so
    `model_from_config` rebuilds the model without the command line."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"model_config() got options no model family declares: {', '.join(unknown)}")
    family = get_family(get_entry(name).family if pretrained else family_of(name))
    arch = {k: family.default(k) for k in ARCHITECTURE if family.accepts(k)}
    _check_accepted(family, {"strides": strides, "head_type": head_type,
                             "width_mult": None if width_mult == 1.0 else width_mult})
    if family.accepts("width_mult"):
        arch["width_mult"] = width_mult
    if pretrained:
        arch.update(get_entry(name).model_kwargs)
    arch.update({k: v for k, v in (("strides", strides), ("head_type", head_type)) if v is not None})
    if "strides" in arch:
        arch["strides"] = list(arch["strides"])
    config = {"family": family.name, "num_classes": num_classes, **{k: arch[k] for k in ARCHITECTURE if k in arch},
              "pretrained_name": name if pretrained else None}
    return {**config, **family.config(arch, family.option_values(options), pretrained)}


def model_from_config(config: Mapping[str, Any], load_pretrained: bool = True,
                      epoch: Optional[int] = None) -> nn.Module:
    """Build the model a `model_config` dict describes. With `load_pretrained` and a pretrained
    name its released weights are loaded (the classifier is re-initialized for a different class
    count). A model restored after training epoch `epoch` gets that epoch's settings
    (`update_params`, e.g. a softmax temperature that is not part of the state dict)."""
    family = get_family(config["family"])
    pretrained = config.get("pretrained_name") if load_pretrained else None
    arch = {k: tuple(config[k]) if k == "strides" else config[k] for k in ARCHITECTURE if k in config}
    model = build_model(family.name, config["num_classes"], pretrained, **arch, **family.build_options(config))
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
