"""What inference runs: `for_inference(model, precision)` gives the eval-only fast copy of a
tagger (its family's twins, models/fast.py), of each member of an ensemble, and leaves a model
that is fast by itself (an ONNX model run by onnxruntime, an already fast copy) as it is;
`fast_inference` picks the (model, frontend) pair a command runs on its device."""
from __future__ import annotations

import logging

from torch import nn

from models.ensemble import EnsembleModel
from models.factory import FAMILIES
from models.fast import PRECISIONS, FastTagger, fast_model
from models.frontend_twins import FastMelFrontend
from models.layers import AudioTagger
from models.preprocess import AugmentMelSTFT

logger = logging.getLogger(__name__)


def for_inference(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """The eval-only copy of `model` computing the same outputs faster, in `precision` ("fp32" or
    "bf16"): a tagger's fast copy, an ensemble of its members' fast copies; a fast copy itself
    (a different precision needs the original: ValueError); any other model (ONNX) in eval mode."""
    if isinstance(model, FastTagger):
        if PRECISIONS.get(precision) is not model.dtype:
            raise ValueError(f"this fast model computes in {model.dtype}; build {precision!r} from the original")
        return model
    if isinstance(model, EnsembleModel):
        return EnsembleModel([for_inference(m, precision) for m in model.models]).eval()
    if isinstance(model, AudioTagger):
        twins = {block: twin for family in FAMILIES.values() for block, twin in family.fast_twins.items()}
        return fast_model(model, precision, twins)
    logger.info("%s has no fast path; it runs as it is", type(model).__name__)
    return model.eval()


def fast_inference(model: nn.Module, frontend: AugmentMelSTFT, precision: str = "fp32"
                   ) -> tuple[nn.Module, AugmentMelSTFT]:
    """The (model, frontend) pair to run inference with: on the CPU the fast eval-only copies
    (`for_inference`, `FastMelFrontend`); on a GPU, which runs the plain models under autocast,
    the eval-mode originals (there `precision` must be "fp32")."""
    if next(model.parameters(), None) is not None and next(model.parameters()).device.type != "cpu":
        if precision != "fp32":
            raise ValueError(f"precision {precision!r} is for the CPU; the GPU path runs fp16 autocast")
        return model.eval(), frontend.eval()
    return for_inference(model, precision), FastMelFrontend(frontend)
