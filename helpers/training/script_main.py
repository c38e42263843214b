"""The skeleton every fine-tuning script's main shares: parse and check the arguments, then
either train by --recipe or evaluate --checkpoint, and say at the end how the model was made."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from common.errors import InputError
from helpers.training.distributed import DistInfo
from helpers.training.evaluation import model_for_evaluation
from helpers.training.recipes import add_recipe_args, evaluate_trained, recipe_summary, train_recipe
from helpers.training.tasks import Task
from torch.utils.data import Dataset


def parse_script_args(parser: argparse.ArgumentParser, argv: Optional[list[str]], recipe: str = "finetune",
                      conflicts: Sequence[tuple[str, str, str]] = ()) -> argparse.Namespace:
    """The script's arguments with the recipe options (default `recipe`; the script's
    `TrainingParser` checks the values), logging switched on; each (flag, other flag, message) of `conflicts` set together is an
    InputError with that message."""
    add_recipe_args(parser, default=recipe)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for first, second, message in conflicts:
        if getattr(args, first) and getattr(args, second):
            raise InputError(message)
    return args


def train_or_evaluate(args: argparse.Namespace, task: Task, train_set: Dataset, eval_set: Dataset, dist: DistInfo,
                      out_dir: Optional[Path], **train_options: Any) -> tuple[dict[str, float], str]:
    """(metrics, what was evaluated): with `out_dir`, train by --recipe (`train_recipe`, with
    `train_options`) and return the last epoch's metrics on `eval_set`; without, evaluate
    --checkpoint (or the untrained model of the arguments) on `eval_set`."""
    if out_dir is not None:
        result = train_recipe(args, task, train_set, eval_set, dist, out_dir, **train_options)
        made = f"recipe {args.recipe}"
        if dist.is_main and result.checkpoints.get("best") and Path(result.checkpoints["best"]).is_file():
            made = recipe_summary(result.checkpoints["best"])
        return result.last, made + (" (chosen by --recipe auto)" if args.recipe == "auto" else "")
    model, frontend, loaded = model_for_evaluation(args.checkpoint, args, task, dist)
    return evaluate_trained(args.checkpoint, model, frontend, eval_set, task, args, dist), loaded
