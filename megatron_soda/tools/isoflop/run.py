"""Running an IsoFLOP grid (one `soda train` per planned run, resumable) and writing the fit."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import UserError, load_config, validate
from megatron_soda.launch.slurm import SlurmJob, render_train, submit
from megatron_soda.tools.isoflop.fit import fit, predict, read_csv
from megatron_soda.tools.isoflop.plot import plot
from megatron_soda.training import spawn
from megatron_soda.training.metrics import read_metrics


def write_fit(rows: list[dict], out: Path, bootstrap: int = 200) -> dict:
    result = fit(rows, bootstrap)
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = [str(p) for p in plot(rows, result, out)]
    (out / "fit.json").write_text(json.dumps(result, indent=1))
    return result


RUNS_COLUMNS = ["compute", "params", "non_embedding_params", "tokens", "loss", "name", "width", "flops"]


def merge(base: dict, extra: dict) -> dict:
    """Nested overrides: `extra`'s keys win, section by section."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_overrides(plan_dir: Path, row: dict) -> dict:
    """The run-config overrides of one planned run on top of the base config (what `soda isoflop
    run` and the SLURM array both apply): its YAML from the plan, validated at its last step."""
    import yaml

    planned = yaml.safe_load((plan_dir / f"{row['name']}.yaml").read_text()) or {}
    return merge(planned, {"train": {"eval_interval": int(row["steps"])}})


def read_plan(plan_dir: Path) -> list[dict]:
    path = plan_dir / "plan.csv"
    if not path.is_file():
        raise UserError(f"{path}: no plan.csv (write one with `soda isoflop plan --out {plan_dir}`)")
    return list(csv.DictReader(open(path)))


def run_grid(plan_dir: Path, base_config: str, out: Path, nproc: int, extra: dict, task: int = -1) -> Path:
    """Train every planned run (or only plan row `task`, one SLURM array task's share) that has not
    finished (resumable), then write runs.csv from every finished run. Each run's output goes to its
    run directory's train.log, which a failure names."""
    from tqdm import tqdm

    plan_rows = read_plan(plan_dir)
    if task >= len(plan_rows):
        raise UserError(f"--task {task}: the plan has {len(plan_rows)} runs (0..{len(plan_rows) - 1})")
    todo = plan_rows if task < 0 else [plan_rows[task]]
    for r in tqdm(todo, desc="isoflop runs", unit="run", disable=task >= 0):
        run_dir, steps = out / "runs" / r["name"], int(r["steps"])
        if _final_val_loss(run_dir, steps) is not None:
            continue
        log_file = run_dir / "train.log"
        cfg = load_config(base_config, merge(run_overrides(plan_dir, r), extra))
        cfg.run_dir = str(run_dir)
        validate(cfg, spawn.world_size(nproc))
        code = spawn.start(cfg, nproc, log_file=log_file)
        if code != 0:
            raise UserError(f"run {r['name']} failed (exit {code}); its output: {log_file}")
        if _final_val_loss(run_dir, steps) is None:
            raise UserError(f"run {r['name']} logged no validation loss (set data.val_paths)")
    return gather(plan_dir, out)


def gather(plan_dir: Path, out: Path) -> Path:
    """runs.csv from the runs that have finished (an array's tasks each call this; the file is
    replaced whole, so the last task to finish leaves the complete table)."""
    results = []
    for r in read_plan(plan_dir):
        loss = _final_val_loss(out / "runs" / r["name"], int(r["steps"]))
        if loss is None:
            continue
        results.append(
            {
                "compute": float(r["compute"]),
                "params": int(r["params"]),
                "non_embedding_params": int(r.get("non_embedding_params") or 0),
                "tokens": int(r["tokens"]),
                "loss": loss,
                "name": r["name"],
                "width": int(r["width"]),
                "flops": r.get("flops", "paper"),
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.csv"
    tmp = path.with_name(f".runs.csv.{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUNS_COLUMNS)
        w.writeheader()
        w.writerows(results)
    os.replace(tmp, path)
    print(f"{len(results)} of {len(read_plan(plan_dir))} planned runs finished -> {path}")
    return path


def _final_val_loss(run_dir: Path, steps: int) -> float | None:
    if not (run_dir / "metrics.jsonl").is_file():
        return None
    rows = read_metrics(run_dir)
    last = [r for r in rows if r.get("step") == steps and "val_loss" in r]
    return float(last[-1]["val_loss"]) if last else None


@dataclass
class RunConfig:
    plan: str = field(metadata={"help": "the directory `soda isoflop plan` wrote"})
    base_config: str = field(metadata={"help": "data, device and the rest of each run's config"})
    out: str
    nproc: int = 1
    task: int = field(default=-1, metadata={"help": "train only this plan row (a SLURM array task); -1: all"})
    gather: bool = field(default=False, metadata={"help": "only write runs.csv from the finished runs"})


def run_job(cfg: RunConfig, extra: dict) -> Path:
    """`soda isoflop run`: train the planned grid (resumable) and write runs.csv; --section.key
    flags go to every run."""
    if cfg.gather:
        path = gather(Path(cfg.plan), Path(cfg.out))
    else:
        path = run_grid(Path(cfg.plan), cfg.base_config, Path(cfg.out), cfg.nproc, extra, cfg.task)
    print(f"fit with: soda isoflop fit --csv {path} --out {cfg.out}")
    return path


@dataclass
class IsoflopArray(SlurmJob):
    """`soda launch isoflop`: --config is the base config of every run, --run-dir the study's directory."""

    plan: str = field(default="", metadata={"help": "the directory `soda isoflop plan` wrote"})


def launch_array_job(job: IsoflopArray, extra: dict) -> None:
    """`soda launch isoflop`: sbatch the planned grid as a job array, one preemption-safe run per task
    (a requeued task resumes its run); each finished task rewrites runs.csv from every finished run."""
    if not job.plan:
        raise UserError("--plan: the directory `soda isoflop plan` wrote")
    plan_dir, out = Path(job.plan), Path(job.run_dir)
    job.overrides = extra
    array = [(str(out / "runs" / r["name"]), run_overrides(plan_dir, r)) for r in read_plan(plan_dir)]
    after = ["isoflop", "run", "--plan", job.plan, "--base-config", job.config, "--out", job.run_dir, "--gather"]
    script = render_train(job, array, after)
    path = out / "slurm" / "isoflop.sbatch"
    if job.dry_run:
        print(script)
    else:
        print(f"submitted {path} ({len(array)} array tasks) as job {submit(script, path)}")


@dataclass
class FitConfig:
    csv: str = field(metadata={"help": "columns compute, params (total N), tokens, loss"})
    out: str
    bootstrap: int = 500
    predict: list[float] = field(
        default_factory=list, metadata={"help": "comma list of budgets to predict N*, D*, loss for"}
    )


def fit_job(cfg: FitConfig) -> dict:
    """`soda isoflop fit`: N*, D* power laws (+ the parametric L(N, D)), plots and fit.json."""
    result = write_fit(read_csv(cfg.csv), Path(cfg.out), cfg.bootstrap)
    lo, hi = result["n_exponent_ci95"]
    dlo, dhi = result["d_exponent_ci95"]
    print(f"{result['flops_convention']}")
    print(
        f"N* ~ C^{result['n_exponent']:.3f} (95% CI {lo:.3f}..{hi:.3f}), "
        f"D* ~ C^{result['d_exponent']:.3f} (95% CI {dlo:.3f}..{dhi:.3f}), "
        f"D/N exponent ratio {result['exponent_ratio_d_over_n']:.2f}"
    )
    print(f"{'C':>10} {'N*':>12} {'D*':>12} {'L*':>8}")
    for b in result["budgets"]:
        flag = "  (edge: left out)" if b["edge"] else ""
        print(f"{b['compute']:10.2e} {b['n_opt']:12.4g} {b['d_opt']:12.4g} {b['loss_opt']:8.4f}{flag}")
    par = result["parametric"]
    if "alpha" in par:
        print(
            f"parametric L = {par['E']:.3f} + {par['A']:.3g}/N^{par['alpha']:.3f} "
            f"+ {par['B']:.3g}/D^{par['beta']:.3f} "
            f"-> N* ~ C^{par['n_exponent']:.3f}, D* ~ C^{par['d_exponent']:.3f}"
        )
    for c in cfg.predict:
        p = predict(result, c)
        print(
            f"predict C {c:.2e}: N* {p['n_opt']:.4g}, D* {p['d_opt']:.4g} "
            f"({p['tokens_per_param']:.1f} tokens/param), loss {p['loss']:.4f}"
        )
    print(f"fit -> {Path(cfg.out) / 'fit.json'}; plots: {', '.join(result['plots'])}")
    return result
