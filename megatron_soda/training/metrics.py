"""What a run reports about itself: `StepMetrics` turns the Trainer's row of a step into throughput,
TFLOP/s, MFU and memory; `MetricsLog` writes rows to metrics.jsonl (one JSON row per logged step),
TensorBoard, and W&B when asked and installed; `read_metrics` is the one reader of metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from megatron_soda.config import SodaConfig, UserError

log = logging.getLogger("soda")


class StepMetrics:
    """Per-step arithmetic: tokens/s of the whole job, TFLOP/s and MFU per device (the training
    code's FLOPs per token, model/flops.py; MFU in the paper's convention, attention over the full
    score matrix, and as `mfu_causal`, over the half causal kernels compute), peak memory, the data
    position."""

    def __init__(self, cfg: SodaConfig, world_size: int, device: str) -> None:
        from megatron_soda.model.flops import flops_per_token, peak_tflops

        t = cfg.train
        self.tokens_per_step = t.global_batch_size * t.seq_length
        self.flops_per_token = flops_per_token(cfg.model, t.seq_length)
        self.causal_flops_per_token = flops_per_token(cfg.model, t.seq_length, causal=True)
        self.peak = peak_tflops(t.peak_tflops)
        self.world, self.device = world_size, device

    def process(self, row: dict, skipped_steps: int, consumed_samples: int) -> dict:
        from megatron_soda.model.flops import mfu
        from megatron_soda.parallel.setup import peak_memory_gb

        step_s = row.pop("step_s")
        tokens_per_s = self.tokens_per_step / step_s
        per_device = tokens_per_s / self.world
        for k in ("fwd_bwd_s", "optimizer_s"):
            row.pop(k)
        row.update(
            tokens_per_s=tokens_per_s,
            tflops_per_device=self.flops_per_token * per_device / 1e12,
            mfu=mfu(self.flops_per_token, per_device, self.peak),  # attention over the full score matrix
            mfu_causal=mfu(self.causal_flops_per_token, per_device, self.peak),  # what the causal kernels compute
            memory_gb=peak_memory_gb(self.device),
            step_time_s=step_s,
            skipped_steps=skipped_steps,
            consumed_samples=consumed_samples,
        )
        return row


def _step(line: str) -> int | None:
    """A metrics line's step; None for a line a crash cut short."""
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


class MixtureMetrics:
    """Which mixture stage each step is in and what share of its global batch each source had (the
    realised proportions, against the stage's weights), in the row; the log says when a stage begins.
    Both come from the data position (the loader's consumed samples), not the trainer's step: a branch
    starts its data at 0, so its stages count its own steps. The shares are the mixture's labels of
    the step's global samples, computed on the host alike on every rank: no collective, no GPU sync."""

    def __init__(self, dataset, global_batch_size: int, rank0: bool) -> None:
        self.dataset, self.gbs, self.rank0 = dataset, global_batch_size, rank0
        self.stage = None

    def process(self, row: dict, consumed_samples: int, step: int) -> None:
        import numpy as np

        first = consumed_samples - self.gbs  # the step's first global sample
        stage = self.dataset.stage_of(first)
        staged = len(self.dataset.stages) > 1
        if staged:
            row["data_stage"] = stage
        counts = np.bincount(self.dataset.sources(first, self.gbs), minlength=len(self.dataset.sets))
        for name, c in zip(self.dataset.names, counts.tolist(), strict=True):
            row[f"data_{name}"] = c / self.gbs
        if stage != self.stage and self.rank0 and staged:
            log.info("step %d: mixture stage %d: %s", step, stage, self.dataset.describe(stage))
        self.stage = stage


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
        raise UserError(f"{path}: no metrics (is {run_dir} a `soda train` run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
