"""Per-epoch metrics: metrics.jsonl and (optionally) Weights & Biases, from the main process only."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from common.errors import InputError
from common.files import DISK_FULL, atomic_write, disk_full
from helpers.training.distributed import DistInfo
from models.checkpoint import plain


def json_line(values: Mapping[str, Any]) -> str:
    """One line of strict JSON: non-finite numbers (a diverged loss) become null, never a bare
    NaN that JSON readers reject."""
    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return [finite(v) for v in value] if isinstance(value, list) else value
    return json.dumps({k: finite(v) for k, v in plain(dict(values)).items()}, allow_nan=False) + "\n"


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
        """Append the line of epoch `step` (flushed; a full disk names the file)."""
        if not self.active:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json_line({"epoch": step, **metrics}))
        except OSError as e:
            raise (disk_full(e, self.path) if e.errno in DISK_FULL else e) from None
        if self.wandb_run is not None:
            self.wandb_run.log(dict(metrics), step=step)

    def align(self, step: int, metrics: Optional[Mapping[str, float]]) -> None:
        """Make metrics.jsonl end with the line of epoch `step` (`metrics`, from the checkpoint a
        run resumes from): lines of later epochs, which a kill after them but before their
        checkpoint left, and a torn last line are dropped; a missing line of `step` is added."""
        if not self.active or not self.path.is_file():
            return
        kept, limit = [], step if metrics is not None else step + 1
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("epoch", step) < limit:
                kept.append(json_line(entry))
        if metrics is not None:
            kept.append(json_line({"epoch": step, **metrics}))
        with atomic_write(self.path) as f:
            f.write("".join(kept))

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
