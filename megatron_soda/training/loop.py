"""`soda train`: the training loop, one process per device.

Everything a rank needs is built first (data, Trainer, checkpointer, logs), then the loop only asks
the Trainer for steps and decides when to evaluate, log, checkpoint and stop.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_soda.config import (
    USER_ERRORS,
    ConfigError,
    DataConfig,
    SodaConfig,
    UserError,
    load_config,
    paper_peak_lr,
    quiet_library_warnings,
    save_config,
    validate,
)
from megatron_soda.data.loader import SodaDataLoader
from megatron_soda.data.mixture import MixtureDataset
from megatron_soda.model.fast_paths import resolve_fast_paths, save_fast_paths
from megatron_soda.model.flops import flops_per_token, mfu, param_counts, peak_tflops
from megatron_soda.parallel.setup import (
    init_distributed,
    peak_memory_gb,
    rank_layout,
    resolve_device,
    setup_parallel,
    teardown,
    tp_groups_across_nodes,
    world_size_from_env,
)
from megatron_soda.training.metrics import MetricsLog
from megatron_soda.training.trainer import Trainer

log = logging.getLogger("soda")


class TrainingStopped(UserError, RuntimeError):
    """The run cannot go on (too many non-finite steps in a row); the message names the last good checkpoint."""


class Preemption:
    """SIGTERM / SIGUSR1 (SLURM's warning before preemption) -> save at the end of the step, exit."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def agreed(self, device) -> bool:
        v = torch.tensor([1.0 if self.flag else 0.0], device=device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return v.item() > 0


def train(cfg: SodaConfig) -> dict:
    """Run (or resume) training; returns a summary. Call inside an initialized process group."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from megatron_soda.training import checkpoint as ckpt  # megatron-core: after main() set its warnings

    device = resolve_device(cfg.train.device)
    fp = resolve_fast_paths(cfg, device == "cuda")
    dp = setup_parallel(cfg, graph_safe_rng=fp.cuda_graph != "none")
    rank0 = dist.get_rank() == 0
    run_dir = Path(cfg.run_dir)
    t = cfg.train

    dataset = MixtureDataset(cfg.data, seq_len=t.seq_length)
    check_skipped_shards(dataset, cfg.data.max_corrupt_fraction, rank0)
    layout = dataset.layout
    if cfg.model.vocab_size == 0:  # "take it from the shards": resolved here, saved in config.yaml
        cfg.model.vocab_size = layout.vocab_size
    if cfg.model.vocab_size != layout.vocab_size:
        raise ConfigError(
            f"model.vocab_size {cfg.model.vocab_size} but the shards use a {layout.vocab_size}-id layout "
            f"(text {layout.text_vocab_size}): tokenizer and model disagree"
        )
    check_run_dir(run_dir)  # on every rank: a refusal must not leave the others waiting at the barrier
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    trainer = Trainer(cfg, device, fp, layout, dp)
    loader = SodaDataLoader(dataset, t.micro_batch_size, t.global_batch_size, ps.get_data_parallel_rank(), dp)
    checkpointer = ckpt.Checkpointer(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
    resume_from = ckpt.latest(run_dir) if cfg.checkpoint.resume else None
    if resume_from is None and cfg.checkpoint.init_from:
        ckpt.load_weights(cfg.checkpoint.init_from, trainer.modules)
    corrupt_before = 0  # corrupt samples read before this process (carried by the checkpoint)
    if resume_from is not None:
        check_same_model(cfg, ckpt.common_state(resume_from), resume_from)
        common = ckpt.load(resume_from, trainer.modules, trainer.optimizer)
        corrupt_before = int(common["data"].get("corrupt_samples", 0))
        trainer.load_state_dict(common)
        loader.load_state_dict(common["data"])
        if rank0:
            log.info(
                "resumed from %s at step %d (%d samples consumed)", resume_from, trainer.step, loader.consumed_samples
            )

    ranks = rank_layout()
    if rank0:  # only now: a refused resume leaves the run's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")
        save_fast_paths(fp, run_dir / "fast_paths.yaml")
        (run_dir / "layout.json").write_text(json.dumps(ranks, indent=1) + "\n")
        nodes = sorted({r["node"] for r in ranks})
        log.info("%d ranks on %d node(s): %s", len(ranks), len(nodes), ", ".join(nodes))
        for group in tp_groups_across_nodes(ranks):
            log.warning("tensor-parallel group %s spans nodes: its all-reduces cross the network", group)

    def corrupt_samples() -> int:
        """Corrupt samples read so far by every rank (a collective)."""
        v = torch.tensor([float(loader.corrupt_samples)], device=device)
        dist.all_reduce(v)
        return corrupt_before + int(v.item())

    def save() -> Path:
        data_state = {**loader.state_dict(), "corrupt_samples": corrupt_samples()}
        common = {**trainer.state_dict(), "data": data_state, "config": cfg.to_dict()}
        path = checkpointer.save(trainer.step, trainer.modules, trainer.optimizer, common)
        if rank0:
            save_config(cfg, run_dir / "checkpoints" / "config.yaml")
        return path

    counts = param_counts(cfg.model)
    if rank0:
        log.info(
            "model %s: %.1fM non-embedding, %.1fM label (non-emb + 1 embedding), %.1fM total; TP %d PP %d DP %d",
            cfg.model.name,
            counts["non_embedding"] / 1e6,
            counts["label"] / 1e6,
            counts["total"] / 1e6,
            cfg.parallel.tp,
            cfg.parallel.pp,
            dp,
        )
        log.info(
            "peak LR %g (the paper's rule 0.003 x sqrt(batch %d / 256) x sqrt(1024 / width %d) gives %g)",
            cfg.optim.lr,
            t.global_batch_size,
            cfg.optim.lr_rule_width or cfg.model.hidden_size,
            paper_peak_lr(cfg),
        )
        (log.warning if dataset.by_size and len(dataset.sets) > 1 else log.info)("data: %s", dataset.describe())
    flops_tok = flops_per_token(cfg.model, t.seq_length)
    peak = peak_tflops(t.peak_tflops)
    metrics = MetricsLog(run_dir, cfg, rank0, start_step=trainer.step)
    preempt = Preemption()
    val_data = None
    if t.eval_interval and cfg.data.val_paths:
        val_cfg = DataConfig(
            paths=cfg.data.val_paths, seed=cfg.data.seed, num_workers=0, skip_corrupt=cfg.data.skip_corrupt
        )
        val_data = MixtureDataset(val_cfg, layout=layout, seq_len=t.seq_length)

    def validate() -> float:
        """Mean loss over the validation set's first `eval_batches` global batches (always the same)."""
        val = SodaDataLoader(val_data, t.micro_batch_size, t.global_batch_size, ps.get_data_parallel_rank(), dp, 0)
        return trainer.evaluate(iter(val), t.eval_batches)

    val_loss = {}  # before the first step and at the last validation: what a run changed
    if val_data is not None and trainer.step == 0:
        val_loss["start"] = validate()
        if rank0:
            log.info("validation loss before training: %.4f", val_loss["start"])
    batches = iter(loader)
    consecutive_skips = 0
    last_saved = resume_from
    start_step = trainer.step
    bar = tqdm(total=t.steps, initial=start_step, disable=not rank0, desc="train", file=sys.stderr, dynamic_ncols=True)
    while trainer.step < t.steps:
        micro = [next(batches) for _ in range(trainer.num_micro)]
        row = trainer.train_step(micro, inject_nan=trainer.step + 1 in t.debug_nan_steps)
        step = trainer.step
        if row.pop("skipped"):
            row["grad_norm"] = float("nan")
            consecutive_skips += 1
            if rank0:
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, consecutive_skips)
            if consecutive_skips >= t.max_skipped_steps:
                raise TrainingStopped(
                    f"{consecutive_skips} consecutive non-finite steps, the last at step {step}; "
                    f"last good checkpoint: {last_saved or 'none'}"
                )
        else:
            consecutive_skips = 0
        tokens_per_s = t.global_batch_size * t.seq_length / row["step_s"]
        tflops = flops_tok * tokens_per_s / dist.get_world_size() / 1e12
        row.update(
            tokens_per_s=tokens_per_s,
            tflops_per_device=tflops,
            mfu=mfu(flops_tok, tokens_per_s / dist.get_world_size(), peak),
            memory_gb=peak_memory_gb(device),
            step_time_s=row.pop("step_s"),
            skipped_steps=trainer.skipped_steps,
            consumed_samples=loader.consumed_samples,
        )
        for k in ("fwd_bwd_s", "optimizer_s"):
            row.pop(k)
        if val_data is not None and step % t.eval_interval == 0:
            row["val_loss"] = val_loss["last"] = validate()
        if step % t.log_interval == 0 or step == t.steps:
            if cfg.data.skip_corrupt:
                row["corrupt_samples"] = corrupt_samples()
                check_corrupt_fraction(row["corrupt_samples"], loader.consumed_samples, cfg.data, last_saved)
            metrics.write(step, row)
            if rank0:
                bar.set_postfix_str(f"loss {row['loss']:.4f} lr {row['lr']:.2e} {tokens_per_s:,.0f} tok/s")
        bar.update(1)
        checkpointer.poll()
        stop = preempt.agreed(device) or bool(t.exit_interval and step % t.exit_interval == 0)
        if stop or step == t.steps or (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0):
            last_saved = save()
        if stop:
            if rank0:
                bar.write(f"stopping early (signal or train.exit_interval): saved {last_saved} at step {step}")
            break
    bar.close()
    checkpointer.poll(blocking=True)
    metrics.close()
    return {
        "step": trainer.step,
        "start_step": start_step,
        "checkpoint": str(last_saved),
        "skipped_steps": trainer.skipped_steps,
        "preempted": trainer.step < t.steps,
        "corrupt_samples": corrupt_samples(),
        "skipped_shards": sum(len(s.skipped_shards) for s in dataset.sets),
        **{f"val_loss_{k}": v for k, v in val_loss.items()},
    }


def check_run_dir(run_dir: Path) -> None:
    import os

    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir}: a file, expected a directory")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--run-dir {run_dir}: {existing} is not writable")


SHAPE_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "head_dim", "ffn_hidden_size")


def check_same_model(cfg: SodaConfig, common: dict, path) -> None:
    """Resuming needs the model the checkpoint holds: a different shape is one line, not megatron's
    shape-mismatch traceback."""
    saved = common.get("config", {}).get("model", {})
    diff = [
        f"model.{k} {getattr(cfg.model, k)} (checkpoint: {saved[k]})"
        for k in (*SHAPE_KEYS, "vocab_size", "tie_embeddings")
        if k in saved and saved[k] != getattr(cfg.model, k)
    ]
    if diff:
        raise ConfigError(
            f"{path} holds another model than this run asks for: {', '.join(diff)}; resume with the "
            "checkpoint's settings, or start a new run (another --run-dir, or --checkpoint.init_from for weights)"
        )


def check_skipped_shards(dataset: MixtureDataset, max_fraction: float, rank0: bool) -> None:
    """Shards left out (data.skip_corrupt) are named in the log; too many of them stop the run."""
    skipped = [p for s in dataset.sets for p in s.skipped_shards]
    if not skipped:
        return
    lost = sum(s.skipped_samples for s in dataset.sets)
    total = lost + sum(len(s) for s in dataset.sets)
    if rank0:
        log.warning("data.skip_corrupt: %d shard(s), %d of %d samples, left out:", len(skipped), lost, total)
        for problem in skipped:
            log.warning("  %s", problem)
    if lost / total > max_fraction:
        raise TrainingStopped(
            f"data: {lost} of {total} samples are in corrupt shards ({lost / total:.1%} > "
            f"data.max_corrupt_fraction {max_fraction:.1%}); the warnings above name them"
        )


def check_corrupt_fraction(corrupt: int, consumed: int, data: DataConfig, last_saved) -> None:
    if consumed and corrupt / consumed > data.max_corrupt_fraction:
        raise TrainingStopped(
            f"data: {corrupt} of the {consumed} samples read so far were corrupt ({corrupt / consumed:.1%} > "
            f"data.max_corrupt_fraction {data.max_corrupt_fraction:.1%}); last good checkpoint: {last_saved or 'none'}"
        )


def main(argv: list[str] | None = None) -> int:
    """One rank of `soda train` (torchrun / srun start one per device)."""
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="soda train", description="train a SODA model (see configs/)")
    parser.add_argument("--config", help="YAML preset, e.g. configs/soda-600m.yaml")
    parser.add_argument("--run-dir", help="checkpoints, config, TensorBoard logs and metrics.jsonl go here")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], help="cpu: megatron-core on gloo (fp32)")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its per-parameter listings drown the run log
    quiet_library_warnings()
    try:
        cfg = load_config(args.config, rest)
        if args.run_dir:
            cfg.run_dir = args.run_dir
        if args.device:
            cfg.train.device = args.device
        device = resolve_device(cfg.train.device)
        validate(cfg, world_size_from_env())
    except ConfigError as e:
        print(f"soda train: error: {e}", file=sys.stderr)
        return 2
    init_distributed(device)
    rank = dist.get_rank()
    try:
        summary = train(cfg)
    except USER_ERRORS as e:
        if os.environ.get("SODA_DEBUG"):
            traceback.print_exc()
        if rank == 0:
            print(f"soda train: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: every rank's own traceback, then rank 0's one-line summary
        print(f"[rank {rank}] {traceback.format_exc()}", file=sys.stderr, flush=True)
        if rank == 0:
            print(f"soda train: error on rank {rank}: {type(e).__name__}: {e} (tracebacks above)", file=sys.stderr)
        return 1
    finally:
        teardown()
    if rank == 0:
        print(json.dumps({"summary": summary}))
    return 0
