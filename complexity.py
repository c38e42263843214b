"""Parameters, multiply-accumulate operations, analytical peak memory and receptive field of a model.

    python complexity.py --model_name mn10_as
    python complexity.py --model_name dymn10_as --complexity_type memory --memory_efficient_inference
    python complexity.py --model_width 0.4 --head_type fully_convolutional --receptive_field
    python complexity.py --model_name mn10_as_fc_s2221 --receptive_field
    python complexity.py --table costs.csv --plot figures/

The model is built with fresh weights (costs do not depend on them; nothing is downloaded) and
traced on one 10-second clip whose spectrogram size follows the model's frontend settings in the
registry (hop size, mel bands) unless the frontend flags say otherwise. --table and --plot cover
every AudioSet model of the registry with its registry settings. Exit code 2 for unknown names
and impossible settings.
"""
from __future__ import annotations

import argparse
import math
import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional

from helpers.analysis.complexity import CLIP_SECONDS, analyze, untrained_model, clip_input_size, registry_costs
from helpers.analysis.complexity_plots import plot_tradeoffs
from common.errors import InputError, check_suffix, run_cli
from common.files import atomic_write, check_output
from common.flags import FRONTEND_FLAGS, add_frontend_flags, frontend_settings
from models.factory import DEFAULT_FAMILY, FAMILIES, OPTIONS, create_frontend, family_of
from models.pretrained import DEFAULT_MODEL, get_entry, name_to_width

ARCHITECTURE_OPTIONS = {name: option for name, option in OPTIONS.items() if option.architecture}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default = FAMILIES[DEFAULT_FAMILY]
    parser.add_argument("--model_name", default=None,
                        help=f"registry name: any model of any family, any variant (default: {DEFAULT_MODEL})")
    parser.add_argument("--model_width", type=float, default=None,
                        help=f"analyze a plain {default.label} of this width instead (printed as "
                             f"{default.prefix}<width without the dot>)")
    parser.add_argument("--head_type", default=None,
                        choices=("mlp", "fully_convolutional", "multihead_attention_pooling"),
                        help="classification head (default: the registry's)")
    for option, spec in ARCHITECTURE_OPTIONS.items():  # the families' architecture options
        parser.add_argument(f"--{option}", type=spec.type, default=None, help=f"{spec.help} (default: {spec.default})")
    parser.add_argument("--strides", type=int, nargs=4, default=None,
                        help="block strides, 1 or 2 (default: the registry's)")
    parser.add_argument("--complexity_type", default="computation", choices=("computation", "memory"))
    parser.add_argument("--memory_efficient_inference", action="store_true",
                        help="peak memory with the memory-efficient inverted-residual rule, not layer by layer")
    parser.add_argument("--bits_per_elem", type=int, default=16, help="bits per activation element (16 = fp16)")
    parser.add_argument("--receptive_field", action="store_true", help="also print the receptive field")
    add_frontend_flags(parser, bands=False)
    parser.add_argument("--table", default=None,
                        help="write the costs of every AudioSet model to a .csv or .json file")
    parser.add_argument("--plot", default=None,
                        help="write the mAP-vs-complexity figures: one .png file, or a folder for three PNGs")
    args = parser.parse_args(argv)
    if args.bits_per_elem < 1:
        raise InputError(f"--bits_per_elem must be positive, got {args.bits_per_elem}")
    if args.model_width is not None and not (math.isfinite(args.model_width) and 0 < args.model_width <= 100):
        raise InputError(f"--model_width must be positive, finite and at most 100, got {args.model_width}")
    if args.model_name and args.model_width is not None and (
            family_of(args.model_name) != DEFAULT_FAMILY or name_to_width(args.model_name) != args.model_width):
        raise InputError(f"--model_width {args.model_width} analyzes a plain {default.label} of that width, which "
                         f"--model_name {args.model_name} is not: give one of them")
    return args


def model_flags(args: argparse.Namespace) -> dict[str, object]:
    """The flags that change one model's settings (not allowed with --table / --plot)."""
    values = vars(args)
    options = {f"--{option}": values[option] for option in ARCHITECTURE_OPTIONS}
    return {"--model_width": args.model_width, "--head_type": args.head_type, **options, "--strides": args.strides,
            **{f"--{flag}": values[flag] for flag in FRONTEND_FLAGS if flag in values}}


def registry_report(args: argparse.Namespace) -> None:
    """Every registry model: --table and/or --plot figures."""
    given = [flag for flag, value in model_flags(args).items() if value is not None]
    if given:
        raise InputError(f"--table and --plot use each model's registry settings; drop {', '.join(given)}")
    check_suffix("--table", args.table, (".csv", ".json"))
    if args.plot and Path(args.plot).suffix.lower() not in ("", ".png"):
        raise InputError(f"{args.plot}: --plot takes a .png file or a folder")
    if args.table:
        check_output(args.table, "--table")
    if args.plot:  # a .png, or a folder of them
        check_output(args.plot if Path(args.plot).suffix else Path(args.plot, "map_vs_params.png"), "--plot")
    rows = registry_costs(args.bits_per_elem)
    if args.table:
        table = Path(args.table)
        with atomic_write(table, "w", newline="", encoding="utf-8") as f:
            if table.suffix.lower() == ".json":
                json.dump({"clip_seconds": CLIP_SECONDS, "bits_per_elem": args.bits_per_elem,
                           "models": rows}, f, indent=2)
            else:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        print(f"Wrote the costs of {len(rows)} models to {table}")
    if args.plot:
        for path, points in plot_tradeoffs(rows, args.plot, args.bits_per_elem).items():
            print(f"Wrote {len(points)} points to {path}")


def print_computation(name: str, input_size: tuple[int, ...], cost: Any) -> None:
    """Parameters and MACs, by layer kind."""
    macs = cost.macs
    dynamic = "/".join(macs.dynamic_conv_kinds) or "dynamic conv"
    counted = [("Conv2d", macs.conv_layers, macs.conv),
               (dynamic, macs.dynamic_conv_layers, macs.dynamic_conv),
               (f"{dynamic} kernel mixing", macs.dynamic_conv_layers, macs.kernel_mixing),
               ("Linear", macs.linear_layers, macs.linear)]
    print(f"Input spectrogram: {input_size[2]} mel bins x {input_size[3]} frames")
    for kind, layers, count in counted:
        if layers:
            print(f"{kind}: {layers} layers, {count} MACs ({100 * count / macs.total:.2f} %)")
    print("Not counted: " + ", ".join(f"{kind} ({calls})" for kind, calls in sorted(macs.uncounted.items())))
    if macs.dynamic_conv_layers:
        print(f"(The original counter skips dynamic convolutions: {macs.reference_total / 1e9:.2f} billion.)")
    print(f"Model '{name}' has {cost.params / 1e6:.2f} million parameters and inference of a single "
          f"10-seconds audio clip requires {macs.total / 1e9:.2f} billion multiply-accumulate operations.")


def print_memory(args: argparse.Namespace, name: str, cost: Any) -> None:
    """Peak activation memory, layer by layer."""
    memory = cost.peak_memory_efficient if args.memory_efficient_inference else cost.peak_memory
    for label, elements in memory.entries:
        print(f"{label} memory: {memory.kilobytes(elements):.2f} kB")
    print(f"Analytical peak memory: {memory.peak_kb:.2f} kB")
    mode = " (memory efficient)" if args.memory_efficient_inference else ""
    print(f"Model '{name}' inference{mode} of a single 10-seconds audio clip has a peak memory of "
          f"{memory.peak_kb:.2f} kB.")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.table or args.plot:
        registry_report(args)
        return 0
    if args.model_width is not None:
        name, registry_name = FAMILIES[DEFAULT_FAMILY].prefix + str(args.model_width).replace(".", ""), None
        strides = FAMILIES[DEFAULT_FAMILY].default("strides")
    else:
        name = args.model_name or DEFAULT_MODEL
        try:
            entry = get_entry(name)
        except ValueError as e:
            raise InputError(str(e)) from None
        registry_name, strides = name, entry.model_kwargs.get("strides")
    strides = list(args.strides or strides or ())
    try:
        frontend = create_frontend(registry_name, **frontend_settings(vars(args)))
        input_size = clip_input_size(frontend)
        options = {option: getattr(args, option) for option in ARCHITECTURE_OPTIONS}
        model = untrained_model(registry_name, args.model_width, args.head_type, args.strides, options, input_size)
        cost = analyze(model, input_size, args.bits_per_elem)
    except ValueError as e:
        raise InputError(str(e)) from None

    if args.complexity_type == "computation":
        print_computation(name, input_size, cost)
    else:
        print_memory(args, name, cost)
    if args.receptive_field:
        rf_f, rf_t = cost.receptive_field
        with_strides = f" with strides {strides}" if strides else ""
        print(f"Receptive field size of {name}{with_strides}: Frequency: {rf_f}, Time: {rf_t}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
