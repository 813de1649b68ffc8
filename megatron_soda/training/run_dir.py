"""A run directory: whether a run may start or resume there (checked by `soda train` before any rank
exists, and by every rank), its lock, and what a run writes about itself there before its first
step: config.yaml (the resolved config, so a run can be reproduced or resumed), fast_paths.yaml
(what `auto` meant on this device), layout.json (each rank's node and TP/PP/DP coordinates), and
the log lines that describe the run (model size, layout, LR rule, data mixture).

Layout of a run directory's `checkpoints/` (training/checkpoint.py writes it):
  iter_0000100/     a complete checkpoint (model, optimizer, scheduler, data position, RNG, config)
  .iter_0000200.tmp a save in progress (or one a crash interrupted: ignored, removed later)
  latest            the name of the newest complete checkpoint
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from megatron_soda.config import ConfigError, SodaConfig, UserError, paper_peak_lr, save_config

log = logging.getLogger("soda")


class CheckpointError(UserError, RuntimeError):
    """A path that is not a complete checkpoint of ours, or a run directory whose checkpoints a run
    would overwrite."""


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("iter_*") if (p / "metadata.json").is_file())


def latest(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; None for a run directory without checkpoints. A directory
    whose checkpoints `latest` does not lead to (no pointer, a broken one, newer ones past it) is
    refused: starting over there would overwrite them."""
    root = ckpt_root(run_dir)
    pointer = root / "latest"
    complete = complete_checkpoints(root)
    if pointer.is_dir() or (pointer.exists() and not pointer.is_file()):
        raise CheckpointError(f"{pointer} is not a file (expected one naming the newest checkpoint, e.g. iter_0000100)")
    if not pointer.exists():
        if complete:
            raise CheckpointError(
                f"{root} holds checkpoints ({', '.join(p.name for p in complete)}) but no `latest`: refusing to start "
                f"over there (that would overwrite them); to resume, name one in {pointer} "
                f"(e.g. echo {complete[-1].name} > {pointer}), or train in another --run-dir"
            )
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name or "/" in name or not (path / "metadata.json").is_file():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint in {root}")
    newer = [p.name for p in complete if p.name > path.name]
    if newer:
        raise CheckpointError(
            f"{pointer} names {path.name} but {', '.join(newer)} is newer: resuming there would overwrite it; "
            f"point {pointer} at the checkpoint to resume, or move the newer ones away"
        )
    return path


def checkpoint_dir(path: str | Path) -> Path:
    """A run directory, its checkpoints/ directory or one iter_* directory -> that checkpoint's
    directory (a run directory's through `latest`, with a resume's checks). Files only: what
    `soda train` checks of `checkpoint.branch_from` before any rank starts."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").exists() and path.name == "checkpoints":
        found = latest(path.parent)
        path = found if found is not None else path
    elif (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a megatron-core distributed checkpoint (no metadata.json)")
    return path


def check_run_dir(run_dir: Path, resume: bool, branch_from: str = "") -> Path | None:
    """A run may start or resume in `run_dir`: a writable directory whose checkpoints, if any, a
    resume leads to (returns the checkpoint `latest` names). Called by `soda train` before any rank
    starts and on every rank (a refusal must not leave the others waiting at a barrier)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: a file, expected a directory")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--run-dir {run_dir}: {existing} is not writable")
    if resume:
        found = latest(run_dir)
        if found is not None or not branch_from:
            return found
    if branch_from:
        src = checkpoint_dir(branch_from)
        if run_dir.resolve() in (src.resolve(), *src.resolve().parents):
            raise CheckpointError(f"checkpoint.branch_from {src} is inside --run-dir {run_dir}: a branch needs its own")
    done = complete_checkpoints(ckpt_root(run_dir))
    if done:
        what = "a branch" if branch_from else "a new run"
        why = "" if branch_from else "checkpoint.resume is false but "
        raise CheckpointError(
            f"{why}{run_dir} holds checkpoints ({done[-1].name} ...): {what} there would overwrite them; "
            "train in another --run-dir"
        )
    return None


def record_run(cfg: SodaConfig, trainer, dataset) -> None:
    """Write the run's description (rank 0) and log it. Only after the resume check: a refused
    resume leaves the run's config.yaml as it was. `rank_layout` is a collective."""
    from megatron_soda.model.fast_paths import save_fast_paths
    from megatron_soda.model.flops import param_counts
    from megatron_soda.parallel.setup import rank_layout, tp_groups_across_nodes

    ranks = rank_layout()
    if not trainer.rank0:
        return
    run_dir = Path(cfg.run_dir)
    save_config(cfg, run_dir / "config.yaml")
    save_fast_paths(trainer.fast_paths, run_dir / "fast_paths.yaml")
    (run_dir / "layout.json").write_text(json.dumps(ranks, indent=1) + "\n")
    nodes = sorted({r["node"] for r in ranks})
    log.info("%d ranks on %d node(s): %s", len(ranks), len(nodes), ", ".join(nodes))
    for group in tp_groups_across_nodes(ranks):
        log.warning("tensor-parallel group %s spans nodes: its all-reduces cross the network", group)
    counts = param_counts(cfg.model)
    log.info(
        "model %s: %.1fM non-embedding, %.1fM label (non-emb + 1 embedding), %.1fM total; TP %d PP %d CP %d DP %d",
        cfg.model.name,
        counts["non_embedding"] / 1e6,
        counts["label"] / 1e6,
        counts["total"] / 1e6,
        cfg.parallel.tp,
        cfg.parallel.pp,
        cfg.parallel.cp,
        trainer.dp,
    )
    from megatron_soda.model.flops import flops_per_token

    seq = cfg.train.seq_length
    log.info(
        "training FLOPs per token at %d tokens: %.3g with attention over the full score matrix (the paper's MFU), "
        "%.3g over the causal half the kernels compute (mfu_causal)",
        seq,
        flops_per_token(cfg.model, seq),
        flops_per_token(cfg.model, seq, causal=True),
    )
    log.info(
        "peak LR %g (the paper's rule 0.003 x sqrt(batch %d / 256) x sqrt(1024 / width %d) gives %g)",
        cfg.optim.lr,
        cfg.train.global_batch_size,
        cfg.optim.lr_rule_width or cfg.model.hidden_size,
        paper_peak_lr(cfg),
    )
    (log.warning if dataset.by_size and len(dataset.sets) > 1 else log.info)("data: %s", dataset.describe())


def lock_run_dir(run_dir: Path, rank0: bool):
    """One training job per run directory (parallel/locks.py): rank 0 takes the lock before anything
    is written there and holds it for its lifetime; every rank learns the outcome (a collective),
    so all stop with the same one-line refusal. Returns the lock (keep it referenced) on rank 0."""
    import torch.distributed as dist

    from megatron_soda.parallel.locks import LockHeld, hold

    held, refusal = None, ""
    if rank0:
        try:
            held = hold(run_dir / ".lock", "a soda train run")
        except LockHeld as e:
            refusal = str(e)
    outcome = [refusal]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise LockHeld(outcome[0])
    return held
