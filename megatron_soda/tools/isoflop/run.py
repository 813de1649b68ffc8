"""Running an IsoFLOP grid (one `soda train` per planned run, resumable) and writing the fit."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import UserError
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


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out += [f"--{prefix}{k}", json.dumps(v)]
    return out


def run_grid(plan_dir: Path, base_config: str, out: Path, nproc: int, extra: list[str]) -> Path:
    """Train every planned run that has not finished (resumable), then write runs.csv. Each run's
    output goes to its run directory's train.log, which a failure names."""
    import yaml
    from tqdm import tqdm

    plan_rows = list(csv.DictReader(open(plan_dir / "plan.csv")))
    results = []
    for r in tqdm(plan_rows, desc="isoflop runs", unit="run"):
        run_dir = out / "runs" / r["name"]
        steps = int(r["steps"])
        done = _final_val_loss(run_dir, steps)
        if done is None:
            overrides = _flatten(yaml.safe_load((plan_dir / f"{r['name']}.yaml").read_text()))
            args = ["--config", base_config, "--run-dir", str(run_dir), *overrides]
            args += ["--train.eval_interval", str(steps), *extra]
            log_file = run_dir / "train.log"
            code = spawn.train(nproc, args, log_file=log_file)
            if code != 0:
                raise UserError(f"run {r['name']} failed (exit {code}); its output: {log_file}")
            done = _final_val_loss(run_dir, steps)
            if done is None:
                raise UserError(f"run {r['name']} logged no validation loss (set data.val_paths)")
        results.append(
            {
                "compute": float(r["compute"]),
                "params": int(r["params"]),
                "tokens": int(r["tokens"]),
                "loss": done,
                "name": r["name"],
                "width": int(r["width"]),
                "flops": r.get("flops", "6nd"),
            }
        )
    path = out / "runs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(results[0]))
        w.writeheader()
        w.writerows(results)
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


def run_job(cfg: RunConfig, extra: list[str]) -> Path:
    """`soda isoflop run`: train the planned grid (resumable) and write runs.csv; extra
    --section.key value flags go to every run."""
    path = run_grid(Path(cfg.plan), cfg.base_config, Path(cfg.out), cfg.nproc, extra)
    print(f"runs -> {path}; fit with: soda isoflop fit --csv {path} --out {cfg.out}")
    return path


@dataclass
class FitConfig:
    csv: str = field(metadata={"help": "columns compute, params (non-embedding N), tokens, loss"})
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
