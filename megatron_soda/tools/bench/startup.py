"""`soda bench startup`: how long `soda` takes to answer, from process start to exit.

A user's first commands (`soda --help`, a `--help` of a subcommand, a refusal of a mistyped path)
should answer at once; the test suite also starts `soda` dozens of times. Each command runs as a
fresh process (`python -m megatron_soda.cli ...` of the checkout and Python given, so an older
checkout can be measured the same way), several times; the median wall time is reported next to
`python -c "import torch"`, which the goal is stated against (under 1 s, under half of that).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from megatron_soda.config import opt

COMMANDS = {
    "soda --help": ["--help"],
    "soda train --help": ["train", "--help"],
    "soda import-hf /nonexistent x (a refusal)": ["import-hf", "/nonexistent", "x"],
    "soda train --data.paths [/nonexistent] (a refusal)": [
        "train",
        "--config",
        "configs/tiny.yaml",
        "--data.paths",
        "[/nonexistent]",
    ],
}


@dataclass
class StartupBenchConfig:
    repeats: int = opt(5, "runs of each command (the median is reported)")
    python: str = opt("", "the Python of the checkout to measure (default: this one)")
    checkout: str = opt("", "the checkout to measure, its root (default: this one)")
    json: str = opt("", "append the rows here as JSON lines")


def _seconds(cmd: list[str], cwd: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def _commit(root: str) -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty else "")


def bench_job(cfg: StartupBenchConfig) -> list[dict]:
    """`soda bench startup`: median wall seconds of `soda --help`, a subcommand's help and two refusals."""
    python = cfg.python or sys.executable
    root = cfg.checkout or str(Path(__file__).resolve().parents[3])
    base = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
        "python": python,
        "checkout": _commit(root),
        "repeats": cfg.repeats,
    }
    rows = []
    for name, args in {"python -c 'import torch'": None, **COMMANDS}.items():
        cmd = [python, "-c", "import torch"] if args is None else [python, "-m", "megatron_soda.cli", *args]
        times = _seconds(cmd, root, cfg.repeats)
        rows.append({"command": name, "median_s": statistics.median(times), "min_s": min(times), **base})
        print(f"{name:<55} {statistics.median(times):6.2f} s (min {min(times):.2f})", flush=True)
    if cfg.json:
        with open(cfg.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows
