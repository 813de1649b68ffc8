"""Run `soda train` as users do (torchrun for several ranks, CPU backend) and read what it wrote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
# every model preset, found by glob: a new configs/soda-*.yaml is in every preset test at once
PRESETS = sorted(p.stem for p in (ROOT / "configs").glob("soda-*.yaml"))


# the fast paths that run on the CPU backend too (fused AdamW, weight gradients into main_grad)
FUSED = ("--optim.adam_impl", "fused", "--model.wgrad_impl", "main_grad")


def train_cmd(run_dir: Path, shards: Path, nproc: int = 1, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "megatron_soda.cli",
        "train",
        "--nproc",
        str(nproc),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--run-dir",
        str(run_dir),
        "--device",
        "cpu",
        "--data.paths",
        f"[{shards}]",
        "--data.num_workers",
        "0",
        *overrides,
    ]


# `soda train` flags for the small shard set (conftest.small_shards): seq 128, global batch 8
SMALL = ("--train.seq_length", "128")


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", SODA_GLOO_TIMEOUT_S="120", PYTHONUNBUFFERED="1")


def soda(*args: str, check: bool = True, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`soda ARGS` as a user runs it (offline, one thread per process); raises with its stderr on failure
    unless check is False."""
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", *args],
        capture_output=True,
        text=True,
        env=dict(env(), HF_HUB_OFFLINE="1"),
        cwd=ROOT,
        timeout=timeout,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"soda {args[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def run_train(run_dir: Path, shards: Path, nproc: int = 1, *overrides: str, check: bool = True):
    r = subprocess.run(
        train_cmd(run_dir, shards, nproc, *overrides),
        capture_output=True,
        text=True,
        env=env(),
        timeout=TIMEOUT_S,
        cwd=ROOT,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"soda train failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r


def runs_on_first_use(tmp_path_factory, layouts: dict, shards: Path, *overrides: str):
    """A module fixture's body: `get(name)` is layout `name`'s run directory (`layouts[name]` =
    (nproc, extra overrides)), trained on first use and then shared by every test that asks."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            nproc, extra = layouts[name]
            run = tmp_path_factory.mktemp(name) / "run"
            run_train(run, shards, nproc, *overrides, *extra)
            made[name] = run
        return made[name]

    return get


def run_until_signal(run_dir: Path, shards: Path, after_steps: int, *overrides: str):
    """Start a single-process run, SIGTERM it once `after_steps` steps are logged, wait for it."""
    proc = subprocess.Popen(
        train_cmd(run_dir, shards, 1, *overrides),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
    )
    deadline = time.time() + TIMEOUT_S
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= after_steps:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, out, err


def metrics(run_dir: Path) -> list[dict]:
    from megatron_soda.training.metrics import read_metrics

    return read_metrics(run_dir)


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir)]
