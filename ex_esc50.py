"""Fine-tune an MN or DyMN on ESC-50 (2,000 clips, 50 classes, 5 folds), reporting accuracy.

    python ex_esc50.py --pretrained --model_name=mn10_as --fold=1 --dataset_dir=/data/ESC-50
    python ex_esc50.py --pretrained --model_name=mn10_as --all_folds     # 5 folds, mean +- std
    python ex_esc50.py --checkpoint runs/ESC50/fold1/last.pt --fold=1     # evaluation only

One run trains on four folds and evaluates on the test fold after every epoch; the reported
accuracy is the last epoch's, as in the original. Checkpoints go to <out_dir>/fold<k>/.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

from datasets import esc50
from common.errors import run_cli
from helpers.training.args import finetune_parser, resolve_dataset_dir
from helpers.training.config import TrainingConfig
from helpers.training.distributed import setup_distributed
from helpers.training.script_main import train_or_evaluate
from helpers.training.tasks import Task, classification_metrics, mean_std, single_label_loss


def main(argv: Optional[list[str]] = None) -> None:
    parser = finetune_parser("Fine-tune on ESC-50.", experiment_name="ESC50", batch_size=128, lr=6e-5,
                             dataset_env=esc50.ENV_VAR, conflicts=[
        ("all_folds", "checkpoint", "--checkpoint evaluates one model on its own test --fold; drop --all_folds")])
    parser.add_argument("--fold", type=int, default=1, choices=range(1, esc50.NUM_FOLDS + 1), help="test fold")
    parser.add_argument("--all_folds", action="store_true",
                        help="run folds 1-5 one after another and report mean +- std accuracy")
    args = parser.parse_args(argv)
    config = TrainingConfig.from_flags(vars(args))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # data: every fold's files are checked before anything trains
    root = resolve_dataset_dir(config.data.dataset_dir, esc50.ENV_VAR)
    folds = list(range(1, esc50.NUM_FOLDS + 1)) if args.all_folds else [args.fold]
    splits = {fold: esc50.get_datasets(root, fold, config.sample_rate(), config.data.cache_path) for fold in folds}
    dist = setup_distributed(config.run.cuda)

    accuracies = []
    for fold, (train_set, test_set, class_names) in splits.items():
        task = Task("esc50", class_names, multilabel=False, loss_fn=single_label_loss(config.optim.mixup_alpha),
                    metrics_fn=classification_metrics, selection="accuracy", metric_tag="acc",
                    project="ESC50", tags=("Environmental Sound Classification", "Fine-Tuning"))
        out_dir = None if config.run.checkpoint else config.run.out_dir / f"fold{fold}"
        metrics, made = train_or_evaluate(config, task, train_set, test_set, dist, out_dir)
        if dist.is_main:
            print(f"fold {fold}: accuracy {metrics['accuracy']:.4f} (val_loss {metrics['val_loss']:.4f}); {made}")
            accuracies.append(metrics["accuracy"])
    if dist.is_main and len(accuracies) > 1:
        mean, std = mean_std(accuracies)
        print(f"accuracy over {len(accuracies)} folds: {mean:.4f} +- {std:.4f} (sample std)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
