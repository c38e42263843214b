"""Per-epoch metrics: metrics.jsonl and (optionally) Weights & Biases, from the main process only."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from common.errors import InputError
from helpers.training.distributed import DistInfo
from models.checkpoint import plain


class RunLogger:
    """Per-epoch metrics: a JSON line each in <out_dir>/metrics.jsonl, and Weights & Biases with
    `kind="wandb"`, offline unless the user set WANDB_MODE (no account is ever asked for). Only
    the main process logs; on other ranks every call is a no-op."""

    def __init__(self, kind: str, project: str, run_name: str, config: Mapping[str, Any],
                 out_dir: str | os.PathLike, dist: DistInfo, tags: Sequence[str] = (),
                 notes: str = "") -> None:
        if kind not in ("wandb", "none"):
            raise InputError(f"--logger must be wandb or none, got {kind!r}")
        self.active = dist.is_main
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")
            import wandb  # only needed with --logger wandb

            self.wandb_run = wandb.init(project=project, name=run_name, config=plain(dict(config)),
                                        tags=list(tags), notes=notes, dir=str(out_dir))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": step, **plain(dict(metrics))}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
