"""DyMN's family record (models/family.py describes the fields): the builder, the released
checkpoints, the training scripts' --pretrain_final_temp, the twins (fast and ONNX export), and
the complexity and plot rules. DyMN builds on MN's block table, so MN's block rules are part of
it. models/families.py lists it."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from models.dymn.arch import build_dymn
from models.dymn.dy_block import DynamicConv, DynamicInvertedResidual
from models.dymn.fast import EXPORT_TWINS, FAST_TWINS, FastDynamicInvertedResidual
from models.family import Family, Option, PretrainedEntry, SharedStage
from models.mn.family import FAMILY as MN, block_traits

WIDTHS = {"dymn04": 0.4, "dymn10": 1.0, "dymn20": 2.0}
NOT_SHARED = SharedStage(refusal=lambda block: "dynamic (DyMN) blocks pool context in every layer; "
                                               "they run exact windows")


def _entry(name: str, filename: str, map_: Optional[float] = None, params: Optional[float] = None,
           macs: Optional[float] = None, description: str = "", **model_kwargs: Any) -> PretrainedEntry:
    kwargs = {"width_mult": WIDTHS[name[:6]], "strides": (2, 2, 2, 2), "use_dy_blocks": "all", **model_kwargs}
    return PretrainedEntry(name, filename, "dymn", kwargs, {}, map_, params, macs, description=description)


ENTRIES = [
    *[_entry(f"dymn{w}_im", f"dymn{w}_im.pt", description="ImageNet initialization") for w in ("04", "10", "20")],
    _entry("dymn04_as", "dymn04_as.pt", 45.0, 1.97, 0.12),
    _entry("dymn10_as", "dymn10_as.pt", 47.7, 10.57, 0.58),
    _entry("dymn20_as", "dymn20_as_mAP_493.pt", 49.3, 40.02, 2.2),
    _entry("dymn20_as(1)", "dymn20_as.pt", 49.1, 40.02, 2.2, "previous default dymn20_as file"),
    _entry("dymn20_as(2)", "dymn20_as_mAP_489.pt", 48.9, 40.02, 2.2),
    _entry("dymn20_as(3)", "dymn20_as_mAP_490.pt", 49.0, 40.02, 2.2),
    _entry("dymn04_replace_se_as", "dymn04_replace_se_as.pt", description="dynamic blocks only where MN has SE",
           use_dy_blocks="replace_se"),
    # the original's URL for this file carries a stray leading space; this is the file's real name
    _entry("dymn10_replace_se_as", "dymn10_replace_se_as.pt", description="dynamic blocks only where MN has SE",
           use_dy_blocks="replace_se"),
]


def _config(arch: Mapping[str, Any], options: Mapping[str, Any], pretrained: bool) -> dict[str, Any]:
    # the temperature: a pretrained start runs the schedule from its final temperature
    return {"use_dy_blocks": arch.get("use_dy_blocks", "all"),
            "T_max": options["pretrain_final_temp"] if pretrained else 30.0}


FAMILY = Family(
    name="dymn", label="DyMN", prefix="dymn", build=build_dymn, feature_maps=17, entries=ENTRIES, widths=WIDTHS,
    weights_prefix="mn",  # the original names DyMN runs' epoch files by width alone, as MN's
    pretrained_defaults={"T_max": 1.0},
    options={"pretrain_final_temp": Option(float, 1.0, "DyMN starting temperature when pretrained")},
    config=_config, build_options=lambda config: {"use_dy_blocks": config["use_dy_blocks"], "T_max": config["T_max"]},
    fast_twins={**MN.fast_twins, **FAST_TWINS}, export_twins=EXPORT_TWINS,
    shared_pass={**MN.shared_pass, DynamicInvertedResidual: NOT_SHARED, FastDynamicInvertedResidual: NOT_SHARED},
    blocks={**MN.blocks, DynamicInvertedResidual: block_traits},
    dynamic_convs={DynamicConv: lambda conv: conv.k},
    plot_styles={"DyMN": ("tab:red", "^")},
)
