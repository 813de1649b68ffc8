"""Starting `soda train`: the one place that turns "N local ranks" into processes.

`soda train --nproc N`, `soda finetune` and `soda isoflop run` all come here. Under SLURM or an outer
torchrun (RANK or SLURM_PROCID set) this process already is one rank and trains in place;
otherwise N > 1 local ranks are started through torchrun (`training/torchrun.py`: stock torchrun
ending on one line when a rank fails), each running `python -m megatron_soda.training`.
"""

from __future__ import annotations

import os
import signal
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
        "megatron_soda.training.torchrun",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_soda.training",
        *args,
    ]


# torchrun forwards these to the ranks (which save and stop on SIGTERM / SIGUSR1). torch >= 2.8's
# torchrun takes them from --signals-to-handle (default from PET_SIGNALS_TO_HANDLE) and overwrites
# TORCHELASTIC_SIGNALS_TO_HANDLE, which older versions read: both are set, for every supported torch.
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
SIGNAL_ENV = {"PET_SIGNALS_TO_HANDLE": SIGNALS_TO_HANDLE, "TORCHELASTIC_SIGNALS_TO_HANDLE": SIGNALS_TO_HANDLE}
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)  # SIGINT: a terminal sends it to all already


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
    env.update({k: env.get(k, v) for k, v in SIGNAL_ENV.items()})
    cmd = torchrun_command(nproc, args) if nproc > 1 else [sys.executable, "-m", "megatron_soda.training", *args]
    if log_file is None:
        return run_forwarding(cmd, env)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        return run_forwarding(cmd, env, stdout=f, stderr=subprocess.STDOUT)


def run_forwarding(cmd: list[str], env: dict, **kw) -> int:
    """Run the child to its end, passing it the signals a scheduler or a user sends this process:
    this wrapper is what they see, and the ranks must get the chance to save, not be orphaned."""
    proc = subprocess.Popen(cmd, env=env, **kw)

    def forward(signum, frame) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
