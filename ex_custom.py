"""Fine-tune an MN or DyMN on your own labelled audio: a folder of clips plus a CSV.

    python ex_custom.py --pretrained --model_name=mn10_as --dataset_dir=my_sounds
    python ex_custom.py --pretrained --model_name=mn04_as --dataset_dir=my_sounds --csv=labels.csv \\
        --clip_length=5 --n_epochs=30
    python inference.py --checkpoint runs/Custom/best.pt --audio_path new_clip.wav

labels.csv (in --dataset_dir unless --csv says otherwise):

    filename,label[,split | fold]
    dogs/bark_01.wav,dog
    street/0003.flac,car;horn          <- several labels: a multi-label task

The task is single-label (softmax, cross-entropy, accuracy) when every clip has one label and
multi-label (sigmoid, binary cross-entropy, mAP) when any clip has several; --multilabel forces
multi-label (clips may then also have no label). A `split` column (train/val/test) or `fold` column
(--fold = the validation fold, --all_folds = cross-validation) fixes the evaluation data; otherwise
a stratified --val_fraction is held out. The best epoch on the validation data is kept as
best.pt, which carries the class names, and is evaluated on the test split when there is one.

--recipe auto (the default) picks by the median number of labelled training clips per class: a
linear probe on the frozen model below 50, the original's fine-tuning from 50
(helpers/training/recipes.py, docs/small-data.md); --recipe probe | probe_finetune | finetune asks
for one. The probe chooses its regularization by cross-validation on the training clips, then is
refitted on training + validation clips; the validation line then gives the score before the refit.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from datasets import custom
from common.errors import InputError, run_cli
from helpers.training.args import finetune_parser, resolve_dataset_dir
from helpers.training.config import TrainingConfig
from helpers.training.distributed import DistInfo, setup_distributed
from helpers.training.evaluation import model_for_evaluation
from helpers.training.recipes import evaluate_trained, recipe_summary, train_recipe
from models.checkpoint import load_checkpoint
from helpers.training.tasks import (Task, classification_metrics, mean_std, multilabel_loss, single_label_loss,
                                    tagging_metrics)


def evaluate_splits(checkpoint: str | Path, splits: dict[str, Dataset], task: Task, config: TrainingConfig,
                    dist: DistInfo) -> dict[str, dict[str, float]]:
    """Metrics of the checkpoint on each split (the first one being the validation split), printed;
    a probe refitted on the validation clips reports its validation score from before the refit."""
    model, frontend, loaded = model_for_evaluation(checkpoint, config, task, dist)
    probe = load_checkpoint(checkpoint, mmap=True).get("probe") or {}
    results = {}
    for split, dataset in splits.items():
        if split == next(iter(splits)) and probe.get("refit"):  # the final head has seen these clips
            metrics, seen = probe["validation_before_refit"], ", head fitted on the training clips"
        else:
            metrics, seen = evaluate_trained(checkpoint, model, frontend, dataset, task, config, dist), ""
        if dist.is_main:
            print(f"{split} ({loaded}{seen}): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        results[split] = metrics
    return results


def custom_task(data: custom.CustomData, mixup_alpha: float) -> Task:
    """The task of your labels: tagging (mAP) when multi-label, classification (accuracy) otherwise."""
    if data.multilabel:
        return Task("custom", data.class_names, True, multilabel_loss(mixup_alpha), tagging_metrics,
                    selection="mAP", metric_tag="mAP", project="EfficientAT-custom")
    return Task("custom", data.class_names, False, single_label_loss(mixup_alpha), classification_metrics,
                selection="accuracy", metric_tag="acc", project="EfficientAT-custom")


def main(argv: Optional[list[str]] = None) -> None:
    parser = finetune_parser("Fine-tune on your own folder of labelled audio.", experiment_name="Custom",
                             batch_size=32, lr=6e-5, dataset_env=custom.ENV_VAR, recipe="auto", conflicts=[
        ("all_folds", "checkpoint", "--checkpoint evaluates one model on its own validation --fold; drop --all_folds")])
    g = parser.add_argument_group("your data")
    g.add_argument("--csv", type=str, default=None, help="label table (default: <dataset_dir>/labels.csv)")
    g.add_argument("--clip_length", type=float, default=10.0,
                   help="seconds per clip: shorter ones are zero-padded, longer ones cut (randomly when training)")
    g.add_argument("--multilabel", action="store_true", help="multi-label even if every clip has one label")
    g.add_argument("--fold", type=int, default=None, help="validation fold of a CSV with a fold column")
    g.add_argument("--all_folds", action="store_true", help="cross-validate over every fold of the fold column")
    g.add_argument("--val_fraction", type=float, default=0.2,
                   help="share of clips held out for validation when the CSV has no split or fold column")
    args = parser.parse_args(argv)
    config = TrainingConfig.from_flags(vars(args))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    root = resolve_dataset_dir(config.data.dataset_dir, custom.ENV_VAR)

    def load(fold: Optional[int]) -> custom.CustomData:
        return custom.get_datasets(root, args.csv, fold, args.val_fraction, config.run.seed,
                                   True if args.multilabel else None, config.sample_rate(),
                                   args.clip_length, config.data.cache_path)

    first = load(args.fold)
    if (args.all_folds or args.fold is not None) and not first.folds:
        raise InputError(f"--fold and --all_folds need a fold column in {args.csv or root / custom.DEFAULT_CSV}")
    runs = {fold: load(fold) for fold in first.folds} if args.all_folds else {args.fold: first}
    dist = setup_distributed(config.run.cuda)
    if dist.is_main:
        kind = "multi-label" if first.multilabel else "single-label"
        print(f"{kind} task, {len(first.class_names)} classes: {', '.join(first.class_names)}")

    scores = []
    for fold, data in runs.items():
        task = custom_task(data, config.optim.mixup_alpha)
        name = f"fold {fold}" if fold is not None else "validation"
        if not config.run.checkpoint:  # else evaluate the given checkpoint only
            out_dir = config.run.out_dir / (f"fold{fold}" if args.all_folds else "")
            result = train_recipe(config, task, data.train, data.val, dist, out_dir, refit=True)
        checkpoint = config.run.checkpoint or result.checkpoints["best"]
        evaluations = {name: data.val, **({"test": data.test} if data.test is not None else {})}
        results = evaluate_splits(checkpoint, evaluations, task, config, dist)
        if dist.is_main:  # the other processes get no metrics
            scores.append(results[name][task.selection])
            print(recipe_summary(checkpoint) + (" (chosen by --recipe auto)" if config.recipe.recipe == "auto" else ""))
    if dist.is_main and len(scores) > 1:
        mean, std = mean_std(scores)
        print(f"{task.selection} over {len(scores)} folds: {mean:.4f} +- {std:.4f} (sample std)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
