"""Fine-tune an MN or DyMN on DCASE2020 Task 1a (TAU Urban Acoustic Scenes 2020 Mobile, 10 scenes),
reporting overall and per-device accuracy on the official fold-1 evaluation split.

    python ex_dcase20.py --pretrained --model_name=mn10_as --cache_path=cache --dataset_dir=/data/TAU
    python ex_dcase20.py --checkpoint runs/DCASE20/last.pt                  # evaluation only

The 44.1 kHz recordings are resampled to 32 kHz on every read unless --cache_path keeps the
resampled waveforms (recommended: the resampling is the bottleneck of an epoch).
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

import numpy as np
import torch

from datasets import dcase20
from datasets.items import Clip
from common.errors import run_cli
from helpers.training.args import finetune_parser, resolve_dataset_dir
from helpers.training.config import TrainingConfig
from helpers.training.distributed import setup_distributed
from helpers.training.script_main import train_or_evaluate
from helpers.training.tasks import Task, classification_metrics, mixstyle, single_label_loss


def main(argv: Optional[list[str]] = None) -> None:
    parser = finetune_parser("Fine-tune on DCASE2020 Task 1a (TAU Urban Acoustic Scenes 2020 Mobile).",
                             experiment_name="DCASE20", batch_size=64, lr=8e-4, dataset_env=dcase20.ENV_VAR)
    parser.add_argument("--mixstyle_p", type=float, default=0.0,
                        help="probability of frequency-wise MixStyle per batch (replaces mixup)")
    parser.add_argument("--mixstyle_alpha", type=float, default=0.4)
    args = parser.parse_args(argv)
    config = TrainingConfig.from_flags(vars(args))
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    root = resolve_dataset_dir(config.data.dataset_dir, dcase20.ENV_VAR)
    train_set, test_set, scenes = dcase20.get_datasets(root, config.sample_rate(), config.data.cache_path)
    dist = setup_distributed(config.run.cuda)

    # MixStyle, when on, replaces mixup: plain cross-entropy on the re-styled spectrograms
    cross_entropy = single_label_loss(0.0 if args.mixstyle_p > 0 else config.optim.mixup_alpha)

    def loss_fn(model: torch.nn.Module, x: torch.Tensor, batch: Clip) -> dict[str, torch.Tensor]:
        if args.mixstyle_p > 0:
            x = mixstyle(x, args.mixstyle_p, args.mixstyle_alpha)
        return cross_entropy(model, x, batch)

    def metrics_fn(logits: torch.Tensor, targets: torch.Tensor, mask: None = None) -> dict[str, float]:
        metrics = classification_metrics(logits, targets)
        correct = (logits.argmax(1) == targets.argmax(1)).numpy()
        devices = np.delete(test_set.devices, test_set.bad_indices())  # unusable clips are left out
        if len(devices) != len(correct):  # other processes left out clips this one has not seen
            logging.warning("per-device accuracy left out: %d evaluation clips were unusable",
                            len(test_set) - len(correct))
            return metrics
        for k, device in enumerate(test_set.device_names):
            on_device = devices == k
            if on_device.any():
                metrics[f"accuracy_{device}"] = float(correct[on_device].mean())
        return metrics

    task = Task("dcase", scenes, multilabel=False, loss_fn=loss_fn, metrics_fn=metrics_fn,
                selection="accuracy", metric_tag="acc", project="DCASE20",
                tags=("Tau Urban Acoustic Scenes 2020 Mobile", "Acoustic Scene Classification", "Fine-Tuning"))
    out_dir = None if config.run.checkpoint else config.run.out_dir
    metrics, made = train_or_evaluate(config, task, train_set, test_set, dist, out_dir)
    if dist.is_main:
        print(f"accuracy {metrics['accuracy']:.4f} (val_loss {metrics['val_loss']:.4f}); {made}")
        for device in test_set.device_names:
            if f"accuracy_{device}" in metrics:
                print(f"  device {device}: {metrics[f'accuracy_{device}']:.4f}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
