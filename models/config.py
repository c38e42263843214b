"""Typed configurations of the model a command runs and its frontend, as the scripts build them
from their flags (the layers below never see the command line).

    frontend = FrontendConfig(n_mels=64)                 # None: the model's setting
    frontend.settings("mn10_as_mels_64")                # AugmentMelSTFT arguments
    model = ModelConfig("mn10_as", pretrained=True)      # name, weights, architecture overrides
    model.to_dict(num_classes=50)                       # the configuration a checkpoint stores
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional

from common.flags import frontend_settings
from models.factory import family_options, frontend_kwargs, model_config
from models.pretrained import DEFAULT_MODEL, REGISTRY


@dataclass(frozen=True)
class FrontendConfig:
    """Settings of the mel frontend (models.preprocess.AugmentMelSTFT's arguments); None leaves a
    setting to the model (its registry entry or checkpoint), else to the standard frontend."""
    sr: Optional[int] = None
    win_length: Optional[int] = None
    hopsize: Optional[int] = None
    n_fft: Optional[int] = None
    n_mels: Optional[int] = None
    fmin: Optional[float] = None
    fmax: Optional[float] = None
    freqm: Optional[int] = None
    timem: Optional[int] = None
    fmin_aug_range: Optional[int] = None
    fmax_aug_range: Optional[int] = None

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "FrontendConfig":
        """From parsed flag values (`common.flags.add_frontend_flags`)."""
        return cls(**frontend_settings(values))

    def given(self) -> dict[str, Any]:
        """The settings that are not None."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def settings(self, model_name: Optional[str] = None) -> dict[str, Any]:
        """AugmentMelSTFT arguments: these settings over registry entry `model_name`'s (a name
        outside the registry has none) over the standard ones."""
        return frontend_kwargs(model_name if model_name in REGISTRY else None, **self.given())

    def for_eval(self) -> "FrontendConfig":
        """Without the settings that change only training (masking, fmin jitter)."""
        return FrontendConfig(**{f.name: getattr(self, f.name) for f in fields(self)
                                 if f.name not in ("freqm", "timem", "fmin_aug_range")})


@dataclass(frozen=True)
class ModelConfig:
    """The model a command builds: registry `name` (its family, and with `pretrained` its weights
    and architecture), `width` (without `pretrained`), `strides` / `head_type` (None: the
    registry's, else the family's), and the family-specific `options` the families declare
    (`models.factory.OPTIONS`, each family's `Family.options`: MN's se_dims, DyMN's
    pretrain_final_temp); `models.factory.model_config` lets each family read its own."""
    name: str = DEFAULT_MODEL
    pretrained: bool = False
    width: float = 1.0
    strides: Optional[tuple[int, ...]] = None
    head_type: Optional[str] = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """From parsed flag values (the training scripts' model group): --model_name,
        --pretrained, --model_width, --strides, --head_type and every family's options."""
        strides = values.get("strides")
        return cls(values["model_name"], bool(values.get("pretrained")), values.get("model_width", 1.0),
                   tuple(strides) if strides is not None else None, values.get("head_type"),
                   family_options(values))

    def to_dict(self, num_classes: int) -> dict[str, Any]:
        """The full model configuration (`models.factory.model_config`) for `num_classes`: what a
        checkpoint stores and `model_from_config` builds."""
        return model_config(self.name, num_classes, self.pretrained, self.width, self.strides, self.head_type,
                            **self.options)

    def architecture(self) -> dict[str, Any]:
        """The architecture arguments given (strides, head_type), for `models.factory.create_model`."""
        return {k: v for k, v in (("strides", self.strides), ("head_type", self.head_type)) if v is not None}
