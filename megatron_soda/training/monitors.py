"""What watches a run while it trains: corrupt data beyond its allowance and non-finite steps
(stopped with a `TrainingStopped` naming the last good checkpoint, so the user knows where to
resume from), a rank that stops making progress (its stacks dumped, the job restarted), and the
slowest rank (reported)."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_soda.config import DataConfig, UserError

log = logging.getLogger("soda")


class TrainingStopped(UserError, RuntimeError):
    """The run cannot go on; the message says why and names the last good checkpoint."""


class DataIntegrity:
    """Corrupt samples (masked with `data.skip_corrupt`) counted over every rank and every run of
    this run directory (the count travels in checkpoints), against `data.max_corrupt_fraction`."""

    def __init__(self, cfg: DataConfig, dataset, loader, device: str) -> None:
        self.cfg, self.dataset, self.loader, self.device = cfg, dataset, loader, device
        self.before = 0  # counted by earlier processes of this run (from the checkpoint)

    def check_shards(self, rank0: bool) -> None:
        """Shards left out (data.skip_corrupt) are named in the log; too many of them stop the run."""
        skipped = [p for s in self.dataset.sets for p in s.skipped_shards]
        if not skipped:
            return
        lost = sum(s.skipped_samples for s in self.dataset.sets)
        total = lost + sum(len(s) for s in self.dataset.sets)
        if rank0:
            log.warning("data.skip_corrupt: %d shard(s), %d of %d samples, left out:", len(skipped), lost, total)
            for problem in skipped:
                log.warning("  %s", problem)
        if lost / total > self.cfg.max_corrupt_fraction:
            raise TrainingStopped(
                f"data: {lost} of {total} samples are in corrupt shards ({lost / total:.1%} > "
                f"data.max_corrupt_fraction {self.cfg.max_corrupt_fraction:.1%}); the warnings above name them"
            )

    def corrupt_samples(self) -> int:
        """Corrupt samples read so far by every rank (a collective)."""
        v = torch.tensor([float(self.loader.corrupt_samples)], device=self.device)
        dist.all_reduce(v)
        return self.before + int(v.item())

    def check(self, row: dict, last_saved) -> None:
        """At a logged step: the count into the metrics row, and the stop past the allowance."""
        if not self.cfg.skip_corrupt:
            return
        corrupt, consumed = self.corrupt_samples(), self.loader.consumed_samples
        row["corrupt_samples"] = corrupt
        if consumed and corrupt / consumed > self.cfg.max_corrupt_fraction:
            raise TrainingStopped(
                f"data: {corrupt} of the {consumed} samples read so far were corrupt ({corrupt / consumed:.1%} > "
                f"data.max_corrupt_fraction {self.cfg.max_corrupt_fraction:.1%}); "
                f"last good checkpoint: {last_saved or 'none'}"
            )

    def state_dict(self) -> dict:
        return {"corrupt_samples": self.corrupt_samples()}

    def load_state_dict(self, state: dict) -> None:
        self.before = int(state.get("corrupt_samples", 0))


class NonFiniteGuard:
    """A step whose loss or gradient is not finite leaves the weights as they were (the Trainer skips
    its update); `max_skipped_steps` of them in a row stop the run."""

    def __init__(self, max_in_a_row: int, rank0: bool) -> None:
        self.max_in_a_row, self.rank0 = max_in_a_row, rank0
        self.in_a_row = 0

    def check(self, row: dict, step: int, last_saved) -> None:
        if not row.pop("update_finite"):  # the weights are poisoned: nothing of this run may be saved now
            raise TrainingStopped(
                f"step {step}: the update made weights non-finite although loss and gradient were finite "
                f"(check optim.lr, optim.eps, optim.weight_decay); last good checkpoint: {last_saved or 'none'}"
            )
        if not row.pop("skipped"):
            self.in_a_row = 0
            return
        row["grad_norm"] = float("nan")
        self.in_a_row += 1
        if self.rank0:
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingStopped(
                f"{self.in_a_row} consecutive non-finite steps, the last at step {step}; "
                f"last good checkpoint: {last_saved or 'none'}"
            )


class HangWatchdog:
    """A rank that finishes no step within `train.hang_timeout_s` (stuck in a collective with a dead
    or frozen peer, a hung filesystem) writes the Python stack of every thread to
    RUN_DIR/hang/rank<R>-attempt<K>.txt and exits with code 1, which makes `soda train
    --max-restarts` (and the SLURM script) restart the job, resuming from `latest`. faulthandler's
    watchdog is a C thread, so it fires even while the main thread is blocked inside C code."""

    def __init__(self, run_dir: Path, timeout_s: float, rank: int) -> None:
        import os

        self.timeout_s = timeout_s
        attempt = int(os.environ.get("SODA_ATTEMPT", os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
        self.path = Path(run_dir) / "hang" / f"rank{rank:05d}-attempt{attempt}.txt"
        self.file = None
        for earlier in self.path.parent.glob(f"rank{rank:05d}-attempt*.txt"):  # a rank that was frozen or killed
            if earlier.stat().st_size == 0:  # wrote nothing: no file says it did
                earlier.unlink(missing_ok=True)

    def __enter__(self) -> HangWatchdog:
        self.arm()
        return self

    def __exit__(self, *exc) -> None:
        self.disarm()

    def arm(self) -> None:
        """(Re)start the countdown: before the first step and after each one."""
        import faulthandler

        if self.timeout_s <= 0:
            return
        if self.file is None:  # faulthandler writes "Timeout (h:mm:ss)!" and every thread's stack here
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "w")
        faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=self.file)

    def disarm(self) -> None:
        """The run ended (either way) before the countdown: nothing hung, no file left behind."""
        import faulthandler

        if self.file is None:
            return
        faulthandler.cancel_dump_traceback_later()
        self.file.close()
        self.file = None
        self.path.unlink(missing_ok=True)


class StragglerReport:
    """Every `train.straggler_interval` steps: each rank's mean compute time per step (the step
    minus the time it waited in the gradient reduction, where fast ranks wait for slow ones), the
    slowest rank and its ratio to the median, in the log and the metrics row. Ranks coupled inside
    a layer (TP) or a pipeline wait for each other there too, so a slow rank shows as its slowest group."""

    def __init__(self, interval: int, device: str, rank0: bool) -> None:
        self.interval, self.device, self.rank0 = interval, device, rank0
        self.busy = 0.0
        self.steps = 0

    SAMPLED = 10  # the last steps of each interval are timed (a timed reduction costs two device syncs)

    def due(self, step: int) -> bool:
        """Whether `step` is among the timed ones (the Trainer then times its gradient reduction)."""
        return bool(self.interval) and (
            step % self.interval == 0 or step % self.interval > self.interval - self.SAMPLED
        )

    def add(self, row: dict) -> None:
        if "grad_sync_s" in row:
            self.busy += row["fwd_bwd_s"] - row["grad_sync_s"] + row["optimizer_s"]
            self.steps += 1

    def maybe_report(self, step: int, row: dict) -> None:
        """At the interval (every rank calls it: a collective)."""
        if not self.interval or step % self.interval or not self.steps:
            return
        mine = torch.tensor([self.busy / self.steps], dtype=torch.float64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(every, mine)
        times = [float(t.item()) for t in every]
        median = statistics.median(times)
        slowest = max(range(len(times)), key=times.__getitem__)
        ratio = times[slowest] / median if median > 0 else 1.0
        row.update(straggler_rank=slowest, straggler_ratio=ratio, compute_s_slowest=times[slowest])
        if self.rank0:
            (log.warning if ratio > 1.2 else log.info)(
                "steps %d-%d: slowest rank %d computes %.3f s/step, %.2fx the median rank (%.3f s)",
                step - self.steps + 1,
                step,
                slowest,
                times[slowest],
                ratio,
                median,
            )
        self.busy, self.steps = 0.0, 0
