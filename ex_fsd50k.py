"""Fine-tune an MN or DyMN on FSD50K (200 classes, multi-label), selecting the model on the
validation split and reporting mAP / ROC AUC on the evaluation split.

    python ex_fsd50k.py --train --pretrained --model_name=mn10_as --dataset_dir=/data/FSD50K
    python ex_fsd50k.py --checkpoint runs/FSD50K/best.pt          # evaluate a fine-tuned model
    python ex_fsd50k.py --model_name=mn10_as                       # the original's evaluation mode

With --train the validation mAP after every epoch decides best.pt, which is then evaluated on the
evaluation split. Without --train the script evaluates --checkpoint or, as the original does, the
released --model_name with a new (untrained) 200-class classifier.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

from datasets import fsd50k
from common.errors import run_cli
from helpers.training.metrics import format_tagging_results
from helpers.training.args import finetune_parser, resolve_dataset_dir
from helpers.training.config import TrainingConfig
from helpers.training.distributed import setup_distributed
from helpers.training.evaluation import model_for_evaluation
from helpers.training.recipes import evaluate_trained, recipe_summary, train_recipe
from helpers.training.tasks import Task, multilabel_loss, tagging_metrics


def main(argv: Optional[list[str]] = None) -> None:
    parser = finetune_parser("Fine-tune on FSD50K.", experiment_name="FSD50K", batch_size=64, lr=7e-5,
                             dataset_env=fsd50k.ENV_VAR, conflicts=[
        ("train", "checkpoint", "--checkpoint is for evaluation only; drop it or --train")])
    parser.add_argument("--train", action="store_true", help="fine-tune (without it: evaluate only)")
    parser.add_argument("--variable_eval_length", action="store_true",
                        help="evaluate whole clips (batch size 1) instead of 10-s crops")
    args = parser.parse_args(argv)
    config = TrainingConfig.from_flags(vars(args))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    root = resolve_dataset_dir(config.data.dataset_dir, fsd50k.ENV_VAR)
    train_set, val_set, eval_set, class_names = fsd50k.get_datasets(
        root, config.sample_rate(), args.variable_eval_length, config.data.cache_path)
    dist = setup_distributed(config.run.cuda)
    eval_batch_size = 1 if args.variable_eval_length else config.loader.batch_size
    task = Task("fsd50k", class_names, multilabel=True, loss_fn=multilabel_loss(config.optim.mixup_alpha),
                metrics_fn=tagging_metrics, selection="mAP", metric_tag="mAP", project="FSD50K",
                tags=("FSD50K", "Audio Tagging"))

    if args.train:
        result = train_recipe(config, task, train_set, val_set, dist, config.run.out_dir, eval_batch_size)
        if dist.is_main:
            print(f"best validation mAP {result.best['mAP']:.4f} after epoch {result.best_epoch}")
    checkpoint = result.checkpoints["best"] if args.train else config.run.checkpoint
    model, frontend, loaded = model_for_evaluation(checkpoint, config, task, dist)
    metrics = evaluate_trained(checkpoint, model, frontend, eval_set, task, config, dist, eval_batch_size)
    if dist.is_main:
        print(f"Results on FSD50K evaluation split for loaded model: {loaded}")
        print(format_tagging_results(metrics))
        if args.train:
            print(recipe_summary(checkpoint))


if __name__ == "__main__":
    sys.exit(run_cli(main))
