"""The end every fine-tuning script's main shares: either train by --recipe or evaluate
--checkpoint, and say at the end how the model was made."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch.utils.data import Dataset

from helpers.training.config import TrainingConfig
from helpers.training.distributed import DistInfo
from helpers.training.evaluation import model_for_evaluation
from helpers.training.recipes import evaluate_trained, recipe_summary, train_recipe
from helpers.training.tasks import Task


def train_or_evaluate(config: TrainingConfig, task: Task, train_set: Dataset, eval_set: Dataset, dist: DistInfo,
                      out_dir: Optional[Path], **train_options: Any) -> tuple[dict[str, float], str]:
    """(metrics, what was evaluated): with `out_dir`, train by --recipe (`train_recipe`, with
    `train_options`) and return the last epoch's metrics on `eval_set`; without, evaluate
    --checkpoint (or the untrained model of the model flags) on `eval_set`."""
    if out_dir is not None:
        result = train_recipe(config, task, train_set, eval_set, dist, out_dir, **train_options)
        made = f"recipe {config.recipe.recipe}"
        if dist.is_main and result.checkpoints.get("best") and Path(result.checkpoints["best"]).is_file():
            made = recipe_summary(result.checkpoints["best"])
        return result.last, made + (" (chosen by --recipe auto)" if config.recipe.recipe == "auto" else "")
    checkpoint = config.run.checkpoint
    model, frontend, loaded = model_for_evaluation(checkpoint, config, task, dist)
    return evaluate_trained(checkpoint, model, frontend, eval_set, task, config, dist), loaded
