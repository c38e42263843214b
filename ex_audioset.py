"""AudioSet: evaluate a released model, an ensemble or a checkpoint (default), or train an MN /
DyMN by knowledge distillation from PaSST ensemble logits (--train).

    python ex_audioset.py --model_name=mn10_as --dataset_dir=/data/audioset
    python ex_audioset.py --train --pretrained --model_name=mn10_im --batch_size=60 --max_lr=0.0004
    torchrun --nproc_per_node=4 ex_audioset.py --cuda --train --pretrained --model_name=dymn10_im \
        --batch_size=30 --max_lr=0.001 --pretrain_final_temp=30

The dataset folder comes from --dataset_dir or $AUDIOSET_DIR. Under torchrun every process trains
on its share of each epoch (DistributedDataParallel), --batch_size is per process, and only rank 0
prints, logs and writes checkpoints.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datasets.audioset import (BALANCED_FILE, DATASET_ENV, EVAL_FILE, UNBALANCED_FILE,
                               AudioSetDataset, TeacherPredictions, is_valid, sample_weights,
                               teacher_paths)
from datasets.augment import RollDataset, WavMixDataset
from helpers.common.errors import InputError, run_cli
from helpers.common.files import atomic_write
from helpers.common.labels import class_names
from helpers.metrics import format_tagging_results, multilabel_metrics
from helpers.inference.tagging import build_tagger
from helpers.training import (DistInfo, DistributedWeightedSampler, Precision, RunLogger,
                              add_model_args, add_optimizer_args, add_preprocessing_args,
                              add_run_args, all_reduce_sum, save_epoch_weights,
                              eval_loader, evaluate, frontend_config_from_args,
                              frontend_overrides, gather_cat, load_checkpoint, load_finetuned,
                              make_optimizer, make_scheduler, mix, mixup, model_config_from_args,
                              model_from_config, resolve_dataset_dir, resolve_out_dir,
                              restore_training_state, save_checkpoint, seed_epoch, seed_everything,
                              setup_distributed, train_loader, train_one_epoch, training_state,
                              unwrap, wrap_ddp)
from models.preprocess import AugmentMelSTFT

WANDB_PROJECT = "EfficientAudioTagging"
WANDB_TAGS = ("AudioSet", "Audio Tagging", "Knowledge Disitillation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(parser, experiment_name="AudioSet", batch_size=120, dataset_env=DATASET_ENV)
    parser.add_argument("--train", action="store_true", help="train; without it, evaluate")
    parser.add_argument("--ensemble", nargs="+", default=[], help="evaluate this ensemble")
    parser.add_argument("--checkpoint", type=str, default=None,
                        help="evaluate this checkpoint (a training checkpoint or a state dict)")
    parser.add_argument("--save_predictions", type=str, default=None,
                        help="evaluation only: write names, logits and targets to this .npz")
    add_model_args(parser, model_name="mn10_as", pretrain_final_temp=30.0)
    add_optimizer_args(parser, lr=0.0008, lr_flag="max_lr", n_epochs=200, warm_up_len=8,
                       ramp_down_start=80, ramp_down_len=95)
    data = parser.add_argument_group("data")
    data.add_argument("--epoch_len", type=int, default=100000, help="clips per epoch (weighted sampler)")
    data.add_argument("--balanced_only", action="store_true", help="train on the balanced set only")
    data.add_argument("--clip_length", type=float, default=10.0, help="seconds per clip")
    data.add_argument("--roll", action="store_true", help="random circular time shift")
    data.add_argument("--wavmix", action="store_true", help="waveform mixing")
    data.add_argument("--gain_augment", type=int, default=0, help="random gain range in dB")
    data.add_argument("--in_mem", action="store_true", help="load the HDF5 files into memory")
    kd = parser.add_argument_group("knowledge distillation")
    kd.add_argument("--teacher_preds", type=str, default=None,
                    help="teacher logits .npy (default: the released file, downloaded to resources/)")
    kd.add_argument("--fname_to_index", type=str, default=None,
                    help="pickled YouTube ID -> row dict (default: the released file)")
    kd.add_argument("--missing_teacher", choices=("error", "mask"), default="error",
                    help="training clips without a teacher row: stop, or train them on labels only")
    kd.add_argument("--temperature", type=float, default=1.0, help="KD temperature")
    kd.add_argument("--kd_lambda", type=float, default=0.1, help="weight of the label loss")
    add_preprocessing_args(parser)
    args = parser.parse_args(argv)
    if args.train and (args.ensemble or args.checkpoint or args.save_predictions):
        parser.error("--ensemble, --checkpoint and --save_predictions are for evaluation (without --train)")
    if not 0.0 <= args.kd_lambda <= 1.0:
        parser.error(f"--kd_lambda must be in [0, 1], got {args.kd_lambda}")
    return args


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, known: torch.Tensor,
                      perm: torch.Tensor | None = None, lam: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of the student logits against the teacher probabilities, mean over classes per clip,
    mixed like the inputs: lam * BCE(own row) + (1 - lam) * BCE(partner's row), which equals the
    BCE against the mixed rows since BCE is linear in its target. Clips whose own name has no
    teacher row contribute 0 but count in the batch mean."""
    target = teacher if perm is None else mix(teacher, perm, lam)
    per_clip = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").mean(dim=1)
    return (per_clip * known).mean()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    dist = setup_distributed(args.cuda)
    (train if args.train else evaluate_only)(args, dist)


def evaluate_only(args: argparse.Namespace, dist: DistInfo) -> None:
    dataset_dir = resolve_dataset_dir(args.dataset_dir, DATASET_ENV, [EVAL_FILE])
    if args.checkpoint:
        state = load_checkpoint(args.checkpoint)
        if "model_config" in state:  # a checkpoint written by --train
            model, settings, _, _ = load_finetuned(args.checkpoint, state)
            frontend = AugmentMelSTFT(**settings)
        else:  # a bare state dict (e.g. a released file or the original's epoch files)
            config = model_config_from_args(argparse.Namespace(**{**vars(args), "pretrained": False}), 527)
            config["T_max"] = 1.0  # the temperature trained DyMNs run at
            model = model_from_config(config, load_pretrained=False)
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1][:200]
                raise InputError(f"{args.checkpoint}: does not fit the model given by --model_name "
                                 f"/ --model_width / --head_type / --strides ({detail})") from None
            frontend = AugmentMelSTFT(**frontend_config_from_args(args))
        title = args.checkpoint
    else:  # a released model or an ensemble, with its frontend, as inference.py builds them
        try:
            tagger = build_tagger(args.model_name, args.ensemble, dist.device, args.strides,
                                  args.head_type, **frontend_overrides(args))
        except ValueError as e:  # unknown name, members with different frontends, ...
            raise InputError(str(e)) from None
        model, frontend, title = tagger.model, tagger.frontend, tagger.name
    frontend = frontend.to(dist.device).eval()
    model = model.to(dist.device).eval()
    # the original evaluates under fp16 autocast on CUDA
    precision = Precision(args.precision or ("fp16" if dist.device.type == "cuda" else "fp32"), dist.device)

    eval_set = AudioSetDataset([dataset_dir / EVAL_FILE], resample_rate=frontend.sr,
                               clip_length=args.clip_length, bad_rows="mask", in_mem=args.in_mem)
    loader = eval_loader(eval_set, args.batch_size, args.num_workers, dist)
    logits, targets = evaluate(model, frontend, loader, precision, dist, keep_fn=is_valid)
    bad_rows = set(gather_cat(torch.from_numpy(eval_set.bad_indices()), dist).tolist())
    if not dist.is_main:
        return
    metrics = multilabel_metrics(targets.numpy(), logits.numpy())
    if args.save_predictions:
        names = [n for i, n in enumerate(eval_set.names()) if i not in bad_rows]
        with atomic_write(args.save_predictions, "wb") as f:
            np.savez(f, names=np.array(names), logits=logits.numpy(), targets=targets.numpy())
    print(f"Results on AudioSet test split for loaded model: {title}")
    print(format_tagging_results(metrics))
    if bad_rows:
        print(f"  ({len(bad_rows)} undecodable clips left out)")
    if metrics["ap_classes"] < targets.shape[1]:
        print(f"  ({metrics['ap_classes']} of {targets.shape[1]} classes have positive clips and "
              f"count in mAP, {metrics['roc_classes']} in ROC)")


def train(args: argparse.Namespace, dist: DistInfo) -> None:
    files = [BALANCED_FILE] + ([] if args.balanced_only else [UNBALANCED_FILE])
    dataset_dir = resolve_dataset_dir(args.dataset_dir, DATASET_ENV, files + [EVAL_FILE])
    out_dir = resolve_out_dir(args)
    seed_everything(args.seed)
    frontend_settings = frontend_config_from_args(args)

    # data: balanced (+ unbalanced) set, class-balanced sampling without replacement
    train_set = AudioSetDataset([dataset_dir / f for f in files], resample_rate=frontend_settings["sr"],
                                clip_length=args.clip_length, gain_augment=args.gain_augment,
                                in_mem=args.in_mem)
    weights = sample_weights(train_set.packed_targets())
    epoch_len = min(args.epoch_len, int((weights > 0).sum()))
    if epoch_len < args.epoch_len and dist.is_main:
        print(f"--epoch_len {args.epoch_len} exceeds the {epoch_len} labelled training clips; "
              f"epochs have {epoch_len} clips")
    sampler = DistributedWeightedSampler(weights, epoch_len, dist.rank, dist.world_size, args.seed)
    augmented = RollDataset(train_set) if args.roll else train_set
    augmented = WavMixDataset(augmented) if args.wavmix else augmented
    train_dl = train_loader(augmented, args.batch_size, args.num_workers, dist, args.seed, sampler)
    eval_set = AudioSetDataset([dataset_dir / EVAL_FILE], resample_rate=frontend_settings["sr"],
                               clip_length=args.clip_length, bad_rows="mask", in_mem=args.in_mem)
    eval_dl = eval_loader(eval_set, args.batch_size, args.num_workers, dist)

    # teacher: the PaSST ensemble's logits, aligned to clips by YouTube ID
    teacher = None
    if args.kd_lambda > 0:
        logits_path, index_path = teacher_paths(args.teacher_preds, args.fname_to_index)
        teacher = TeacherPredictions(logits_path, index_path, temperature=args.temperature)
        missing = teacher.missing(train_set.names())
        if missing and args.missing_teacher == "error":
            raise InputError(f"{len(missing)} of {len(train_set)} training clips (e.g. {missing[0]!r}) "
                             f"are not in {index_path}; "
                             "pass --missing_teacher mask to train them on their labels only")
        if missing and dist.is_main:
            print(f"{len(missing)} training clips have no teacher row; their distillation loss is 0")

    # model, optimizer, schedule, precision
    try:
        model_config = model_config_from_args(args, num_classes=527)
        model = wrap_ddp(model_from_config(model_config).to(dist.device), dist)
    except ValueError as e:  # unknown name, arguments the pretrained checkpoint cannot take
        raise InputError(str(e)) from None
    frontend = AugmentMelSTFT(**frontend_settings).to(dist.device)
    optimizer = make_optimizer(model, args.max_lr, args.weight_decay, args.adamw)
    scheduler = make_scheduler(optimizer, args)
    precision = Precision(args.precision, dist.device)
    checkpoint_path = out_dir / "last.pt"
    start_epoch = 0
    if args.resume:
        resume_path = checkpoint_path if args.resume == "auto" else Path(args.resume)
        start_epoch = restore_training_state(load_checkpoint(resume_path), model, optimizer, scheduler,
                                             precision, args.seed)
        if dist.is_main:
            print(f"resumed from {resume_path} after epoch {start_epoch - 1}")
    run = RunLogger(args.logger, WANDB_PROJECT, args.experiment_name, vars(args), out_dir, dist,
                    tags=WANDB_TAGS, notes="AudioSet training by knowledge distillation")

    def loss_fn(model: torch.nn.Module, x: torch.Tensor, batch: list) -> dict[str, torch.Tensor]:
        _, names, y, _ = batch
        perm = lam = None
        if args.mixup_alpha > 0:
            perm, lam = mixup(len(x), args.mixup_alpha)
            perm, lam = perm.to(x.device), lam.to(x.device)
            x, y = mix(x, perm, lam), mix(y, perm, lam)
        logits = model(x)[0]
        label_loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        if teacher is None:
            return {"loss": label_loss, "label_loss": label_loss.detach()}
        probs, known = (t.to(x.device) for t in teacher.lookup(names))
        kd_loss = distillation_loss(logits, probs, known.float(), perm, lam)
        loss = args.kd_lambda * label_loss + (1.0 - args.kd_lambda) * kd_loss
        return {"loss": loss, "label_loss": label_loss.detach(), "distillation_loss": kd_loss.detach()}

    for epoch in range(start_epoch, args.n_epochs):
        seed_epoch(args.seed, epoch, dist.rank)
        if model_config["family"] == "dymn":
            unwrap(model).update_params(epoch)
        stats = train_one_epoch(model, frontend, train_dl, optimizer, loss_fn, precision, dist, epoch)
        bad_rows = all_reduce_sum(train_set.take_bad_count(), dist)
        scheduler.step()
        logits, targets = evaluate(model, frontend, eval_dl, precision, dist, keep_fn=is_valid)
        bad_rows += all_reduce_sum(eval_set.take_bad_count(), dist)
        if not dist.is_main:
            continue
        metrics = multilabel_metrics(targets.numpy(), logits.numpy())
        val_loss = float(F.binary_cross_entropy_with_logits(logits, targets.float()))
        log = {"train_loss": stats["loss"], "label_loss": stats["label_loss"],
               "learning_rate": optimizer.param_groups[0]["lr"], "mAP": metrics["mAP"],
               "ROC": metrics["ROC"], "d_prime": metrics["d_prime"], "val_loss": val_loss,
               "bad_rows": bad_rows}
        if "distillation_loss" in stats:
            log["distillation_loss"] = stats["distillation_loss"]
        run.log(log, step=epoch)
        print(f"epoch {epoch}: train_loss {stats['loss']:.4f}, val_loss {val_loss:.4f}, "
              f"undecodable clips {bad_rows}")
        print(format_tagging_results(metrics))
        save_checkpoint(checkpoint_path, training_state(
            model, optimizer, scheduler, precision, epoch, args.seed, vars(args), model_config,
            frontend_settings, class_names(), metrics={"mAP": metrics["mAP"], "ROC": metrics["ROC"]}))
        save_epoch_weights(out_dir, model, model_config["width_mult"], "as", epoch, "mAP", metrics["mAP"])
    run.finish()


if __name__ == "__main__":
    sys.exit(run_cli(main))
