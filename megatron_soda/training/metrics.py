"""What a run writes about itself: metrics.jsonl (one JSON row per logged step), TensorBoard, and
W&B when asked and installed; `read_metrics` is the one reader of metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from megatron_soda.config import SodaConfig

log = logging.getLogger("soda")


def _step(line: str) -> int | None:
    """A metrics line's step; None for a line a crash cut short."""
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


class MetricsLog:
    def __init__(self, run_dir: Path, cfg: SodaConfig, enabled: bool, start_step: int = 0) -> None:
        """`start_step`: the step training resumes after; rows logged past it by the interrupted run
        (steps done after its last checkpoint, redone now) are dropped, so each step appears once."""
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        if path.is_file():
            lines = path.read_text().splitlines()
            kept = [ln for ln in lines if _step(ln) is not None and _step(ln) <= start_step]
            if len(kept) != len(lines):
                tmp = path.with_name(".metrics.jsonl.tmp")
                tmp.write_text("".join(ln + "\n" for ln in kept))
                os.replace(tmp, path)
        self.file = open(path, "a")
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.train.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.train.wandb_project, config=cfg.to_dict(), dir=str(run_dir))
            except ImportError:
                log.warning("train.wandb_project set but wandb is not installed: logging to TensorBoard only")

    def write(self, step: int, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()
        for k, v in row.items():
            if isinstance(v, (int, float)) and v is not None and self.tb:
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb:
                self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a `soda train` run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
