"""The training loop of one rank: a run assembled from its parts, then one step per global batch.

`start_run` builds what a run is made of, in the order each part needs the others: the data (data/),
the run directory's lock, the Trainer (one rank's model, optimizer and step), the checkpoint manager
(what is saved, when, and what a resume restores), the validator, the in-run downstream scores,
the step metrics and their log, and the monitors (non-finite steps, corrupt data, hangs,
stragglers). Each part lives in its own module; `train` only orders their calls per step.
`run_rank` is one rank's process around it.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_soda.config import ConfigError, SodaConfig, report_error
from megatron_soda.data.loader import SodaDataLoader
from megatron_soda.data.mixture import MixtureDataset
from megatron_soda.parallel.comm_stats import CommStats
from megatron_soda.parallel.processes import STOP_SIGNALS
from megatron_soda.parallel.setup import init_distributed, resolve_device, teardown
from megatron_soda.training.checkpoint import CheckpointManager
from megatron_soda.training.downstream import DownstreamEval
from megatron_soda.training.metrics import MetricsLog, MixtureMetrics, StepMetrics
from megatron_soda.training.monitors import DataIntegrity, HangWatchdog, NonFiniteGuard, StragglerReport
from megatron_soda.training.run_dir import lock_run_dir, record_run
from megatron_soda.training.trainer import Trainer, build_trainer
from megatron_soda.training.validator import Validator

log = logging.getLogger("soda")


def train(cfg: SodaConfig) -> dict:
    """Run (or resume) training of a validated config; returns a summary. Call inside an
    initialized process group, on every rank."""
    run = start_run(cfg)
    t, trainer = cfg.train, run.trainer
    val = {"start": run.validator.run()["val_loss"]} if run.validator.enabled and trainer.step == 0 else {}
    if val and trainer.rank0:
        log.info("validation loss before training: %.4f", val["start"])
    start_step = trainer.step
    # all three end on every way out: the loader's workers, the watchdog's countdown, the bar's line
    with closing(iter(run.loader)) as batches, run.watchdog, progress_bar(t.steps, start_step, trainer.rank0) as bar:
        while trainer.step < t.steps:
            trainer.time_grad_sync = run.stragglers.due(trainer.step + 1)
            row = trainer.train_step(next(batches), inject_nan=trainer.step + 1 in t.debug_nan_steps)
            step = trainer.step
            run.mixture.process(row, run.loader.consumed_samples, step)
            run.guard.check(row, step, run.checkpoints.last_saved)
            run.stragglers.add(row)
            run.step_metrics.process(row, trainer.skipped_steps, run.loader.consumed_samples)
            run.stragglers.maybe_report(step, row)
            scored = run.validator.due(step) or run.downstream.due(step)
            if run.validator.due(step):
                row.update(run.validator.run())
                val["last"] = row["val_loss"]
            if run.downstream.due(step):
                row.update(run.downstream.run())
            if scored or step % t.log_interval == 0 or step == t.steps:  # a score is never left out of the log
                run.integrity.check(row, run.checkpoints.last_saved)
                run.metrics.write(step, row)
                bar.set_postfix_str(f"loss {row['loss']:.4f} lr {row['lr']:.2e} {row['tokens_per_s']:,.0f} tok/s")
            bar.update(1)
            stopping = run.stop.agreed(trainer.device) or bool(t.exit_interval and step % t.exit_interval == 0)
            run.checkpoints.maybe_save(step, force=stopping or step == t.steps)
            run.comm.step_done(step)
            run.watchdog.arm()  # a step, its validation and its save done: the countdown restarts
            if stopping:
                bar.write(f"stopping early (signal or train.exit_interval): saved {run.checkpoints.last_saved}")
                break
    run.checkpoints.finish()
    run.comm.stop()
    run.metrics.close()
    return {
        "step": trainer.step,
        "start_step": start_step,
        "checkpoint": str(run.checkpoints.last_saved),
        "skipped_steps": trainer.skipped_steps,
        "preempted": trainer.step < t.steps,
        "corrupt_samples": run.integrity.corrupt_samples(),
        "skipped_shards": sum(len(s.skipped_shards) for s in run.dataset.sets),
        **{f"val_loss_{k}": v for k, v in val.items()},
        **run.downstream.last,
    }


@dataclass
class Run:
    """The parts of one rank's run (see the module docstring)."""

    dataset: MixtureDataset
    lock: object
    trainer: Trainer
    loader: SodaDataLoader
    integrity: DataIntegrity
    checkpoints: CheckpointManager
    validator: Validator
    downstream: DownstreamEval
    step_metrics: StepMetrics
    mixture: MixtureMetrics
    metrics: MetricsLog
    guard: NonFiniteGuard
    stragglers: StragglerReport
    watchdog: HangWatchdog
    stop: StopRequest
    comm: CommStats


def start_run(cfg: SodaConfig) -> Run:
    t, run_dir = cfg.train, Path(cfg.run_dir)
    dataset = open_dataset(cfg)  # (`soda train` checked the run directory on every rank already)
    rank0 = dist.get_rank() == 0
    lock = lock_run_dir(run_dir, rank0)
    trainer = build_trainer(cfg, dataset.layout)
    comm = CommStats(run_dir, dist.get_rank(), t.comm_stats)  # counts from here: the steps' traffic
    comm.start()
    loader = SodaDataLoader(dataset, t.micro_batch_size, t.global_batch_size, trainer.dp_rank, trainer.dp)
    integrity = DataIntegrity(cfg.data, dataset, loader, trainer.device)
    integrity.check_shards(rank0)
    checkpoints = CheckpointManager(cfg, trainer, loader, integrity)
    checkpoints.load_latest()
    record_run(cfg, trainer, dataset)
    return Run(
        dataset=dataset,
        lock=lock,
        trainer=trainer,
        loader=loader,
        integrity=integrity,
        checkpoints=checkpoints,
        validator=Validator(cfg, dataset.layout, trainer),
        downstream=DownstreamEval(cfg, trainer, dataset.layout),
        step_metrics=StepMetrics(cfg, dist.get_world_size(), trainer.device),
        mixture=MixtureMetrics(dataset, t.global_batch_size, rank0),
        metrics=MetricsLog(run_dir, cfg, rank0, start_step=trainer.step),
        guard=NonFiniteGuard(t.max_skipped_steps, rank0),
        stragglers=StragglerReport(t.straggler_interval, trainer.device, rank0),
        watchdog=HangWatchdog(run_dir, t.hang_timeout_s, dist.get_rank()),
        stop=StopRequest(),
        comm=comm,
    )


def open_dataset(cfg: SodaConfig) -> MixtureDataset:
    """The training mixture, its token layout checked against the model's (a `model.vocab_size` of
    0 takes the shards', resolved here and saved in config.yaml)."""
    dataset = MixtureDataset(cfg.data, seq_len=cfg.train.seq_length, global_batch_size=cfg.train.global_batch_size)
    layout = dataset.layout
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = layout.vocab_size
    if cfg.model.vocab_size != layout.vocab_size:
        raise ConfigError(
            f"model.vocab_size {cfg.model.vocab_size} but the shards use a {layout.vocab_size}-id layout "
            f"(text {layout.text_vocab_size}): tokenizer and model disagree"
        )
    return dataset


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's warning before preemption) / SIGINT -> save at the end of the
    step and exit; every rank agrees on the step (a collective), so all save the same one. A second
    Ctrl-C stops at once, without the save."""

    def __init__(self) -> None:
        self.flag = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def agreed(self, device) -> bool:
        v = torch.tensor([1.0 if self.flag else 0.0], device=device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return v.item() > 0


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", file=sys.stderr, dynamic_ncols=True)


def run_rank(cfg: SodaConfig) -> int:
    """One rank of `soda train` (this process; torchrun / srun start one per device): process
    group, training, the summary line on rank 0; errors through the one printer, prefixed with the
    rank when there are several."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its per-parameter listings drown the run log
    # its checkpoint writers log each failed write, which the save's own error reports (one line, or
    # the traceback of what is not a full disk)
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(logging.CRITICAL)
    init_distributed(resolve_device(cfg.train.device))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        summary = train(cfg)
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt and torch's CheckpointException included
        return report_error(e, "soda train", rank if world > 1 else None)
    finally:
        teardown()
    if rank == 0:
        print(json.dumps({"summary": summary}), flush=True)
    return 0
