"""Starting local processes: the one place that knows the torchrun command line, which signals a
launcher forwards to the ranks, and how a rendezvous port is picked.

`soda train --nproc N`, `soda finetune`, `soda isoflop run`, `soda bench train` and the kernel
self-check start their ranks through here, the SLURM script renders its signal list from here and
`launch/torchrun.sh` is `soda train --nproc`. Stdlib only: `soda launch` and `--help` import it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

# What a rank saves and stops on: SLURM's warning before preemption (USR1) and a scheduler's or a
# user's SIGTERM; SIGINT (Ctrl-C) too, so an interactive run also saves before it stops.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# What torchrun forwards to its ranks. torch >= 2.8 takes them from --signals-to-handle (default from
# PET_SIGNALS_TO_HANDLE) and overwrites TORCHELASTIC_SIGNALS_TO_HANDLE, which older versions read:
# both are set, for every supported torch.
TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1")
SIGNAL_ENV = {
    "PET_SIGNALS_TO_HANDLE": ",".join(TORCHRUN_SIGNALS),
    "TORCHELASTIC_SIGNALS_TO_HANDLE": ",".join(TORCHRUN_SIGNALS),
}
# What a wrapper process (`soda train` around torchrun) passes on; SIGINT reaches the whole
# foreground process group from the terminal already.
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


def launched() -> bool:
    """This process is already one rank of a launched job (torchrun or srun)."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send this process `sig` when its parent (pid `parent`) dies (Linux; a no-op
    elsewhere), so a helper process (a loader or prepare worker) never outlives the process it
    works for."""
    if sys.platform != "linux":
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid runs on this host (one of another user's counts as running):
    whose partial output may be removed (files named by the pid that wrote them)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A TCP port nobody listens on now (for a single-host rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def python_module(module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", module, *args]


def torchrun(nproc: int, module: str, args: list[str], max_restarts: int = 0) -> list[str]:
    """torchrun (ours: it ends on one line, training/torchrun.py) with `nproc` local ranks of `module`."""
    return [
        sys.executable,
        "-m",
        "megatron_soda.training.torchrun",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        module,
        *args,
    ]


def rank_env(nproc: int, base: dict | None = None) -> dict:
    """The environment of locally started ranks: one thread each when several share a host's cores
    (unless the user set OMP_NUM_THREADS), torchrun's signal forwarding."""
    env = dict(os.environ if base is None else base)
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    for k, v in SIGNAL_ENV.items():
        env.setdefault(k, v)
    return env


# What a launcher tells its ranks: a helper a rank starts (an export child) is not one of them.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def standalone_env() -> dict:
    """This process's environment without the launcher's rank variables (torchrun's, SLURM's): for
    a child that must start a process group of its own."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_VARS and not k.startswith(("TORCHELASTIC_", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"))
    }


def run_forwarding(cmd: list[str], env: dict, **kw) -> int:
    """Run the child to its end, passing it the signals a scheduler or a user sends this process:
    this wrapper is what they see, and the ranks must get the chance to save, not be orphaned."""
    proc = subprocess.Popen(cmd, env=env, **kw)

    def forward(signum, frame) -> None:
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # Ctrl-C reached the child too: let it save and stop
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def spec_main(run, what: str, argv: list[str] | None = None) -> int:
    """The `main` of a rank process that its launcher hands one JSON spec file (`soda bench train`'s
    variants, `soda plan`'s count run): logging and library warnings as in training, the spec read,
    and every way out through the one error printer (a UserError one line per rank)."""
    import json
    import logging
    from pathlib import Path

    from megatron_soda.config import quiet_library_warnings, report_error

    logging.basicConfig(level=logging.WARNING)
    quiet_library_warnings()
    (spec_file,) = sys.argv[1:] if argv is None else argv
    try:
        return run(json.loads(Path(spec_file).read_text()))
    except BaseException as e:  # noqa: BLE001 - the one printer decides what to show
        return report_error(e, what, int(os.environ["RANK"]) if "RANK" in os.environ else None)
