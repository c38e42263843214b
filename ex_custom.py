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
linear probe on the frozen model below 10, the probe then a short fine-tuning below 50, the
original's fine-tuning from 50 (helpers/training/probe.py); --recipe probe | probe_finetune |
finetune asks for one.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

from datasets import custom
from common.errors import InputError, run_cli
from helpers.training.args import check_args, finetune_parser, resolve_dataset_dir, resolve_out_dir, sample_rate
from helpers.training.distributed import setup_distributed
from helpers.training.evaluation import model_for_evaluation
from helpers.training.probe import add_recipe_args, evaluate_trained, train_recipe
from helpers.training.tasks import (Task, classification_metrics, mean_std, multilabel_loss, single_label_loss,
                                    tagging_metrics)


def custom_task(data: custom.CustomData, mixup_alpha: float) -> Task:
    """The task of your labels: tagging (mAP) when multi-label, classification (accuracy) otherwise."""
    if data.multilabel:
        return Task("custom", data.class_names, True, multilabel_loss(mixup_alpha), tagging_metrics,
                    selection="mAP", metric_tag="mAP", project="EfficientAT-custom")
    return Task("custom", data.class_names, False, single_label_loss(mixup_alpha), classification_metrics,
                selection="accuracy", metric_tag="acc", project="EfficientAT-custom")


def main(argv: Optional[list[str]] = None) -> None:
    parser = finetune_parser("Fine-tune on your own folder of labelled audio.", experiment_name="Custom",
                             batch_size=32, lr=6e-5, dataset_env=custom.ENV_VAR)
    g = parser.add_argument_group("your data")
    g.add_argument("--csv", type=str, default=None, help="label table (default: <dataset_dir>/labels.csv)")
    g.add_argument("--clip_length", type=float, default=10.0,
                   help="seconds per clip: shorter ones are zero-padded, longer ones cut (randomly when training)")
    g.add_argument("--multilabel", action="store_true", help="multi-label even if every clip has one label")
    g.add_argument("--fold", type=int, default=None, help="validation fold of a CSV with a fold column")
    g.add_argument("--all_folds", action="store_true", help="cross-validate over every fold of the fold column")
    g.add_argument("--val_fraction", type=float, default=0.2,
                   help="share of clips held out for validation when the CSV has no split or fold column")
    add_recipe_args(parser, default="auto")
    args = parser.parse_args(argv)
    check_args(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    root = resolve_dataset_dir(args.dataset_dir, custom.ENV_VAR)

    def load(fold: Optional[int]) -> custom.CustomData:
        return custom.get_datasets(root, args.csv, fold, args.val_fraction, args.seed,
                                   True if args.multilabel else None, sample_rate(args),
                                   args.clip_length, args.cache_path)

    if args.all_folds and args.checkpoint:
        raise InputError("--checkpoint evaluates one model on its own validation --fold; drop --all_folds")
    first = load(args.fold)
    if (args.all_folds or args.fold is not None) and not first.folds:
        raise InputError(f"--fold and --all_folds need a fold column in {args.csv or root / custom.DEFAULT_CSV}")
    runs = {fold: load(fold) for fold in first.folds} if args.all_folds else {args.fold: first}
    dist = setup_distributed(args.cuda)
    if dist.is_main:
        kind = "multi-label" if first.multilabel else "single-label"
        print(f"{kind} task, {len(first.class_names)} classes: {', '.join(first.class_names)}")

    scores = []
    for fold, data in runs.items():
        task = custom_task(data, args.mixup_alpha)
        name = f"fold {fold}" if fold is not None else "validation"
        if not args.checkpoint:  # else evaluate the given checkpoint only
            out_dir = resolve_out_dir(args) / (f"fold{fold}" if args.all_folds else "")
            result = train_recipe(args, task, data.train, data.val, dist, out_dir)
        checkpoint = args.checkpoint or result.checkpoints["best"]
        model, frontend, loaded = model_for_evaluation(checkpoint, args, task, dist)
        evaluations = {name: data.val, **({"test": data.test} if data.test is not None else {})}
        for split, dataset in evaluations.items():
            metrics = evaluate_trained(checkpoint, model, frontend, dataset, task, args, dist)
            if dist.is_main:
                print(f"{split} ({loaded}): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if split == name:
                    scores.append(metrics[task.selection])
    if dist.is_main and len(scores) > 1:
        mean, std = mean_std(scores)
        print(f"{task.selection} over {len(scores)} folds: {mean:.4f} +- {std:.4f} (sample std)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
