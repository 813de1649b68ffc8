"""`soda train`: from a command line to training ranks.

The command line is parsed once (megatron_soda/options.py: `--config`, `--section.key` overrides),
the run config is resolved and validated here, before any rank or heavy import exists, and the
ranks receive the resolved config as a file. Under SLURM or an outer torchrun (RANK or
SLURM_PROCID set) this process already is one rank and trains in place; otherwise N > 1 local
ranks are started through torchrun (parallel/processes.py), each running
`python -m megatron_soda.cli train --config RESOLVED.yaml`: the same command, given a file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from megatron_soda.config import ConfigError, Device, SodaConfig, UserError, load_config, opt, save_config, validate
from megatron_soda.parallel import processes
from megatron_soda.training.run_dir import check_run_dir


@dataclass
class TrainCommand:
    config: str | None = opt(None, "YAML preset, e.g. configs/soda-600m.yaml (--section.key flags override it)")
    device: Device | None = opt(None, "cpu: megatron-core on gloo (fp32); the same as --train.device")
    nproc: int = opt(1, "local ranks (started through torchrun); under srun / torchrun each process is one rank")
    max_restarts: int = opt(
        0, "restart the job in place (resuming from latest) when a rank crashes or hangs, up to this many times"
    )


def resolve(cmd: TrainCommand, overrides: dict) -> SodaConfig:
    """The run config a command line asks for (preset, overrides, --device), not yet validated."""
    cfg = load_config(cmd.config, overrides)
    if cmd.device:
        cfg.train.device = cmd.device
    return cfg


def world_size(nproc: int) -> int:
    """The ranks of this job: the launcher's (torchrun or srun) when there is one, else `nproc`."""
    if processes.launched():
        return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    return nproc


def train_job(cmd: TrainCommand, overrides: dict) -> int:
    """`soda train`: train a model, or resume its run directory."""
    if cmd.nproc < 1 or cmd.max_restarts < 0:
        raise ConfigError(f"--nproc must be >= 1 and --max-restarts >= 0, got {cmd.nproc} and {cmd.max_restarts}")
    cfg = resolve(cmd, overrides)
    validate(cfg, world_size(cmd.nproc))
    check_data(cfg)
    check_run_dir(Path(cfg.run_dir), cfg.checkpoint.resume, cfg.checkpoint.branch_from)
    return start(cfg, cmd.nproc, max_restarts=cmd.max_restarts)


def check_data(cfg: SodaConfig) -> None:
    """Every shard set named is a `soda prepare` output (its index reads) in the model's token layout:
    refused here, in one line and before any rank starts, rather than by every rank after its imports."""
    from megatron_soda.tokenization.shard_format import read_index

    for key, paths in (("data.paths", cfg.data.paths), ("data.val_paths", cfg.data.val_paths)):
        for p in paths:
            try:
                index = read_index(p, cfg.data.cache_dir)
            except UserError as e:
                raise ConfigError(f"{key}: {e}") from None
            layout = index.layout
            if index.seq_len != cfg.train.seq_length:
                raise ConfigError(
                    f"train.seq_length {cfg.train.seq_length} but the shards of {p} hold {index.seq_len}-token "
                    f"samples: train at {index.seq_len}, or prepare them with --seq-len {cfg.train.seq_length}"
                )
            if cfg.model.vocab_size and cfg.model.vocab_size != layout.vocab_size:
                raise ConfigError(
                    f"model.vocab_size {cfg.model.vocab_size} but the shards of {p} use a {layout.vocab_size}-id "
                    f"layout (text {layout.text_vocab_size}): tokenizer and model disagree"
                )


# The exit code of a rank that crashed (a bug, a lost peer) or hung (the watchdog's): what a restart
# can cure. A user error (2) or a stop on a signal (0, the run saved) is not retried.
RESTARTABLE = 1


def start(cfg: SodaConfig, nproc: int, log_file: Path | None = None, max_restarts: int = 0) -> int:
    """Train `cfg` (validated) with `nproc` local ranks; returns the exit code. With `log_file` the
    ranks run as a child process writing there (what a tool running many trainings wants); without,
    one rank trains in this process and N ranks share this terminal. With `max_restarts`, a job
    whose rank crashed or hung is started again (it resumes from `latest`), that many times at most."""
    if log_file is None and max_restarts == 0 and (nproc == 1 or processes.launched()):
        from megatron_soda.parallel.setup import resolve_device

        if resolve_device(cfg.train.device) == "cpu":
            from megatron_soda.parallel.cpu_backend import import_megatron

            import_megatron()
        from megatron_soda.training.loop import run_rank

        return run_rank(cfg)
    fd, resolved = tempfile.mkstemp(prefix="soda-train-", suffix=".yaml")
    os.close(fd)
    try:
        save_config(cfg, resolved)
        args = ["train", "--config", resolved]
        cmd = (
            processes.torchrun(nproc, "megatron_soda.cli", args)
            if nproc > 1
            else processes.python_module("megatron_soda.cli", args)
        )
        out = None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_file, "w")
        try:
            for attempt in range(max_restarts + 1):
                env = dict(processes.rank_env(nproc), SODA_ATTEMPT=str(attempt))
                code = processes.run_forwarding(cmd, env, **({"stdout": out, "stderr": out} if out else {}))
                if code != RESTARTABLE or attempt == max_restarts:
                    return code
                print(
                    f"soda train: restarting the job ({attempt + 1} of {max_restarts}), resuming from latest",
                    file=out or sys.stderr,
                    flush=True,
                )
            return code
        finally:
            if out is not None:
                out.close()
    finally:
        Path(resolved).unlink(missing_ok=True)
