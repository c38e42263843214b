"""Fine-tune an MN or DyMN on OpenMIC-2018 (20 instruments, partially annotated multi-label),
reporting masked mAP / ROC AUC on the test split.

    python ex_openmic.py --train --pretrained --model_name=mn10_as --dataset_dir=/data/openmic
    python ex_openmic.py --checkpoint runs/OpenMic/last.pt          # evaluation only

Loss and metrics count only the annotated (observed) instrument labels of each clip. Without
--train the script evaluates --checkpoint, or the released --model_name with a new (untrained)
20-class classifier (the original has no working evaluation mode).
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

from datasets import openmic
from common.errors import run_cli
from helpers.training.metrics import format_tagging_results
from helpers.training.args import finetune_parser, resolve_dataset_dir
from helpers.training.config import TrainingConfig
from helpers.training.distributed import setup_distributed
from helpers.training.script_main import train_or_evaluate
from helpers.training.tasks import Task, augment_training_set, masked_multilabel_loss, masked_tagging_metrics


def main(argv: Optional[list[str]] = None) -> None:
    parser = finetune_parser("Fine-tune on OpenMIC-2018.", experiment_name="OpenMic", batch_size=64,
                             lr=1e-5, dataset_env=openmic.ENV_VAR, conflicts=[
        ("train", "checkpoint", "--checkpoint is for evaluation only; drop it or --train")])
    parser.add_argument("--train", action="store_true", help="fine-tune (without it: evaluate only)")
    args = parser.parse_args(argv)
    config = TrainingConfig.from_flags(vars(args))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    root = resolve_dataset_dir(config.data.dataset_dir, openmic.ENV_VAR)
    train_set, test_set, class_names = openmic.get_datasets(root, config.sample_rate(), config.data.cache_path)
    dist = setup_distributed(config.run.cuda)
    task = Task("openmic", class_names, multilabel=True, loss_fn=masked_multilabel_loss(config.optim.mixup_alpha),
                metrics_fn=masked_tagging_metrics, selection="mAP", metric_tag="mAP", project="OpenMic",
                tags=("OpenMic", "Instrument Recognition"))

    metrics, loaded = train_or_evaluate(
        config, task, train_set, test_set, dist, config.run.out_dir if args.train else None,
        augment=lambda d: augment_training_set(d, config.data, mix_target=openmic.mix_targets))
    if dist.is_main:
        print(f"Results on OpenMIC test split for model: {loaded}")
        print(format_tagging_results(metrics))


if __name__ == "__main__":
    sys.exit(run_cli(main))
