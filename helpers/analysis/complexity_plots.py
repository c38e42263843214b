"""Performance-complexity figures: published AudioSet mAP against parameters, MACs and analytical
peak memory, from the rows of `helpers.analysis.complexity.registry_costs`.

Rendered with matplotlib's object-oriented API (Agg canvas), so no display and no global backend
state are involved.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.files import atomic_write
from models.factory import FAMILIES


@dataclass(frozen=True)
class Panel:
    filename: str  # in folder mode
    quantity: str
    unit: str
    fields: tuple[str, ...]  # row fields on the x axis; a second one is drawn with hollow markers
    scale: float


PANELS = {
    "params": Panel("map_vs_params.png", "parameters", "millions", ("params",), 1e-6),
    "macs": Panel("map_vs_macs.png", "MACs", "billions, 10-s clip", ("macs",), 1e-9),
    "peak_memory": Panel("map_vs_peak_memory.png", "analytical peak memory", "kB, 10-s clip",
                         ("peak_memory_efficient_kB", "peak_memory_kB"), 1.0),
}
MEMORY_RULES = {"peak_memory_efficient_kB": "memory-efficient", "peak_memory_kB": "layer-by-layer"}
# every family's series styles (Family.plot_styles), in family order
SERIES_STYLE = {series: style for family in FAMILIES.values() for series, style in family.plot_styles.items()}
# for series no family styles (a family without plot_styles still gets its points)
FALLBACK_STYLES = [("tab:orange", "v"), ("tab:brown", "P"), ("tab:pink", "X"), ("tab:gray", "*"),
                   ("tab:olive", "p"), ("tab:cyan", "h")]


@dataclass(frozen=True)
class Point:
    name: str
    series: str
    x: float
    y: float
    hollow: bool = False  # layer-by-layer memory, drawn unfilled beside the memory-efficient point


def series_of(row: dict[str, Any]) -> str:
    """The series a row is drawn in: its family's choice (`Family.series`)."""
    return FAMILIES[row["family"]].series(row)


def series_styles(points: Sequence[Point]) -> dict[str, tuple[str, str]]:
    """(colour, marker) of every series among `points`: the families' styles, then fallback
    styles in turn for the series none styles."""
    unstyled = [s for s in dict.fromkeys(p.series for p in points) if s not in SERIES_STYLE]
    extra = {s: FALLBACK_STYLES[i % len(FALLBACK_STYLES)] for i, s in enumerate(unstyled)}
    return {**SERIES_STYLE, **extra}


def plotted_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Models that get a point: those with a published mAP, without the numbered re-runs
    ("mn40_as(2)") that share an architecture with their default checkpoint."""
    return [r for r in rows if r["map"] is not None and "(" not in r["name"]]


def tradeoff_points(rows: Sequence[dict[str, Any]]) -> dict[str, list[Point]]:
    """The points of each panel: one per plotted model, two in the memory panel (both rules)."""
    points: dict[str, list[Point]] = {}
    for key, panel in PANELS.items():
        points[key] = [Point(r["name"], series_of(r), r[field] * panel.scale, r["map"], hollow=i > 0)
                       for i, field in enumerate(panel.fields) for r in plotted_rows(rows)]
    return points


def _draw(ax: Any, panel: Panel, points: list[Point], bits_per_elem: int) -> None:
    for series, (color, marker) in series_styles(points).items():
        for hollow in (False, True):
            chosen = [p for p in points if p.series == series and p.hollow == hollow]
            if not chosen:
                continue
            label = series if len(panel.fields) == 1 else f"{series} ({MEMORY_RULES[panel.fields[hollow]]})"
            ax.scatter([p.x for p in chosen], [p.y for p in chosen], marker=marker, label=label,
                       color=color, facecolors="none" if hollow else color, s=30, zorder=3)
    for p in points:
        if not p.hollow:
            ax.annotate(p.name, (p.x, p.y), xytext=(3, 3), textcoords="offset points", fontsize=6)
    ax.set_xscale("log")
    unit = panel.unit + (f", {bits_per_elem}-bit activations" if panel.fields[0] in MEMORY_RULES else "")
    ax.set_xlabel(f"{panel.quantity} ({unit})")
    ax.set_title(f"AudioSet mAP against {panel.quantity}")
    ax.set_ylabel("AudioSet mAP (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=150, bbox_inches="tight")


def plot_tradeoffs(rows: Sequence[dict[str, Any]], out: str | os.PathLike,
                   bits_per_elem: int = 16) -> dict[Path, list[Point]]:
    """Draw mAP against parameters, MACs and peak memory. `out` ending in .png gets one image with
    the three panels side by side; any other path is a folder that receives map_vs_params.png,
    map_vs_macs.png and map_vs_peak_memory.png. Files are written atomically. Returns the points
    drawn, per written file."""
    out = Path(out)
    points = tradeoff_points(rows)
    if not points["params"]:
        raise ValueError("no model with a published mAP to plot")
    if out.suffix.lower() == ".png":
        fig = Figure(figsize=(18, 5.5))
        for ax, key in zip(fig.subplots(1, len(PANELS)), PANELS):
            _draw(ax, PANELS[key], points[key], bits_per_elem)
        fig.suptitle("EfficientAT models: AudioSet mAP against complexity (10-s clip)")
        _save(fig, out)
        return {out: [p for panel in PANELS for p in points[panel]]}
    if out.suffix:
        raise ValueError(f"{out}: --plot takes a .png file or a folder")
    written = {}
    for key, panel in PANELS.items():
        fig = Figure(figsize=(7, 5.5))
        _draw(fig.add_subplot(), panel, points[key], bits_per_elem)
        _save(fig, out / panel.filename)
        written[out / panel.filename] = points[key]
    return written
