"""Starting `soda train`: the one place that turns "N local ranks" into processes.

`soda train --nproc N`, `soda finetune` and `soda isoflop run` all come here. Under SLURM or an outer
torchrun (RANK or SLURM_PROCID set) this process already is one rank and trains in place;
otherwise N > 1 local ranks are started through torchrun, each running `python -m
megatron_soda.training`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def split_nproc(argv: list[str]) -> tuple[int, list[str]]:
    """`--nproc N` (or `--nproc=N`) out of a `soda train` command line; ValueError names a bad value."""
    nproc, rest, i = 1, [], 0
    while i < len(argv):
        if argv[i] == "--nproc" or argv[i].startswith("--nproc="):
            value = argv[i].split("=", 1)[1] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError("--nproc takes a number of local processes")
            nproc, i = int(value), i + (1 if "=" in argv[i] else 2)
        else:
            rest.append(argv[i])
            i += 1
    return nproc, rest


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_soda.training",
        *args,
    ]


def launched() -> bool:
    """This process is already one rank of a launched job (torchrun or srun)."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def train(nproc: int, args: list[str], log_file: Path | None = None) -> int:
    """Run `soda train ARGS` with `nproc` local ranks; returns its exit code. With `log_file` the
    ranks run as a child process writing there (what a tool running many trainings wants); without,
    one rank trains in this process and N ranks share this terminal."""
    if log_file is None and (nproc == 1 or launched()):
        from megatron_soda.training.loop import main

        return main(args)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on one host share its cores
    cmd = torchrun_command(nproc, args) if nproc > 1 else [sys.executable, "-m", "megatron_soda.training", *args]
    if log_file is None:
        return subprocess.call(cmd, env=env)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        return subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
