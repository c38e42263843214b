"""MN's family record (models/family.py describes the fields): the builder, the released
checkpoints, the training scripts' --se_dims, the fast twin, shared-pass support and the
complexity and plot rules. models/families.py lists it."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from models.family import Family, Option, PretrainedEntry
from models.mn.arch import build_mn
from models.mn.block_types import ConcurrentSEBlock, InvertedResidual
from models.mn.fast import FAST_TWINS
from models.mn.shared import SHARED_STAGES

WIDTHS = {"mn01": 0.1, "mn02": 0.2, "mn04": 0.4, "mn05": 0.5, "mn06": 0.6, "mn08": 0.8, "mn10": 1.0,
          "mn12": 1.2, "mn14": 1.4, "mn16": 1.6, "mn20": 2.0, "mn30": 3.0, "mn40": 4.0}


def _entry(name: str, filename: str, map_: Optional[float] = None, params: Optional[float] = None,
           macs: Optional[float] = None, description: str = "", frontend: Optional[dict] = None,
           sha256: Optional[str] = None, **model_kwargs: Any) -> PretrainedEntry:
    kwargs = {"width_mult": WIDTHS[name[:4]], "head_type": "mlp", "strides": (2, 2, 2, 2), **model_kwargs}
    return PretrainedEntry(name, filename, "mn", kwargs, frontend or {}, map_, params, macs, sha256, description)


_FC = {"head_type": "fully_convolutional"}
ENTRIES = [
    # AudioSet (README figures where the README has them)
    _entry("mn01_as", "mn01_as_mAP_298.pt", 29.8, 0.124, 0.018),
    _entry("mn02_as", "mn02_as_mAP_378.pt", 37.8, 0.325, 0.040),
    _entry("mn04_as", "mn04_as_mAP_432.pt", 43.2, 0.983, 0.11,
           sha256="899a8c6217063f6941793102a2780b3dd788ab11fce468d9cf5f0577c453321c"),
    _entry("mn05_as", "mn05_as_mAP_443.pt", 44.3, 1.43, 0.16),
    _entry("mn10_as", "mn10_as_mAP_471.pt", 47.1, 4.88, 0.54),
    _entry("mn20_as", "mn20_as_mAP_478.pt", 47.8, 17.91, 2.06),
    _entry("mn30_as", "mn30_as_mAP_482.pt", 48.2, 39.09, 4.55),
    _entry("mn40_as", "mn40_as_mAP_484.pt", 48.4, 68.43, 8.03),
    _entry("mn40_as(2)", "mn40_as_mAP_483.pt", 48.3, 68.43, 8.03, "second mn40_as run (ensemble member)"),
    _entry("mn40_as(3)", "mn40_as_mAP_483(2).pt", 48.3, 68.43, 8.03, "third mn40_as run (ensemble member)"),
    _entry("mn40_as_ext", "mn40_as_ext_mAP_487.pt", 48.7, 68.43, 8.03, "extended training (300 epochs)"),
    _entry("mn40_as_ext(2)", "mn40_as_ext_mAP_486.pt", 48.6, 68.43, 8.03, "extended training, second run"),
    _entry("mn40_as_ext(3)", "mn40_as_ext_mAP_485.pt", 48.5, 68.43, 8.03, "extended training, third run"),
    _entry("mn40_as_no_im_pre", "mn40_as_no_im_pre_mAP_483.pt", 48.3, 68.43, 8.03, "no ImageNet pre-training"),
    _entry("mn40_as_no_im_pre(2)", "mn40_as_no_im_pre_mAP_483(2).pt", 48.3, 68.43, 8.03,
           "no ImageNet pre-training, second run"),
    _entry("mn40_as_no_im_pre(3)", "mn40_as_no_im_pre_mAP_482.pt", 48.2, 68.43, 8.03,
           "no ImageNet pre-training, third run"),
    _entry("mn10_as_hop_5", "mn10_as_hop_5_mAP_475.pt", 47.5, 4.88, None, "hop 5 ms", {"hopsize": 160}),
    _entry("mn10_as_hop_15", "mn10_as_hop_15_mAP_463.pt", 46.3, 4.88, 0.36, "hop 15 ms", {"hopsize": 480}),
    _entry("mn10_as_hop_20", "mn10_as_hop_20_mAP_456.pt", 45.6, 4.88, 0.27, "hop 20 ms", {"hopsize": 640}),
    _entry("mn10_as_hop_25", "mn10_as_hop_25_mAP_447.pt", 44.7, 4.88, 0.22, "hop 25 ms", {"hopsize": 800}),
    _entry("mn10_as_mels_40", "mn10_as_mels_40_mAP_453.pt", 45.3, 4.88, 0.21, "40 mel bands", {"n_mels": 40}),
    _entry("mn10_as_mels_64", "mn10_as_mels_64_mAP_461.pt", 46.1, 4.88, 0.27, "64 mel bands", {"n_mels": 64}),
    _entry("mn10_as_mels_256", "mn10_as_mels_256_mAP_474.pt", 47.4, 4.88, 1.08, "256 mel bands",
           {"n_mels": 256}),
    _entry("mn10_as_fc", "mn10_as_fc_mAP_465.pt", 46.5, None, None, "fully convolutional head", **_FC),
    _entry("mn10_as_fc_s2221", "mn10_as_fc_s2221_mAP_466.pt", 46.6, None, None,
           "fully convolutional head, strides 2,2,2,1", strides=(2, 2, 2, 1), **_FC),
    _entry("mn10_as_fc_s2211", "mn10_as_fc_s2211_mAP_466.pt", 46.6, None, None,
           "fully convolutional head, strides 2,2,1,1", strides=(2, 2, 1, 1), **_FC),
    # ImageNet initializations (classifier not trained on AudioSet)
    _entry("mn10_im_pytorch", "mn10_im_pytorch.pt", description="torchvision ImageNet weights, random classifier"),
    *[_entry(f"mn{w}_im", f"mn{w}_im.pt", description="ImageNet initialization")
      for w in ("01", "02", "04", "05", "10", "20", "30", "40")],
]


def block_traits(block: InvertedResidual) -> tuple[bool, bool]:
    """(residual connection, squeeze-excitation) of a block, for the peak-memory rules."""
    return block.use_res_connect, any(isinstance(m, ConcurrentSEBlock) for m in block.modules())


def _series(row: Mapping[str, Any]) -> str:
    if row["head_type"] == "fully_convolutional":
        return "MN, fully convolutional head"
    if (row["n_mels"], row["frames"]) != (128, 1000):
        return "MN, other spectrogram size"
    return "MN"


FAMILY = Family(
    name="mn", label="MN", prefix="mn", build=build_mn, feature_maps=17, entries=ENTRIES, widths=WIDTHS,
    input_size_kwargs=lambda size: {"input_dim_f": size[2], "input_dim_t": size[3]},  # SE over f / t
    options={"se_dims": Option(str, "c", "MN squeeze-excitation axes: letters of c, f, t, or none",
                               architecture=True)},
    config=lambda arch, options, pretrained: {"se_dims": options["se_dims"]},
    build_options=lambda config: {"se_dims": config["se_dims"]},
    fast_twins=FAST_TWINS, shared_pass=SHARED_STAGES, blocks={InvertedResidual: block_traits},
    plot_styles={"MN": ("tab:blue", "o"), "MN, other spectrogram size": ("tab:green", "s"),
                 "MN, fully convolutional head": ("tab:purple", "D")},
    plot_series=_series,
)
