"""`soda isoflop`: the SODA scaling-law study as a tool: plan a grid, run it, fit it, plot it.

FLOPs convention (stated in every output): C = 6 N D with N the non-embedding parameters, as the
paper counts; `--flops attention` uses our per-token training FLOPs instead (matmuls incl. LM head
+ attention scores, `model.flops_per_token`). Fitting follows the paper (Chinchilla "approach 2"):
per budget a parabola of loss against log N gives N*, D* = C / (6 N*) and L*, then power laws
N* = k C^a and D* = k' C^b by log-linear regression, with bootstrap confidence intervals. The
parametric surface L(N, D) = E + A / N^alpha + B / D^beta is fitted as a cross-check
(a = beta / (alpha + beta), b = alpha / (alpha + beta)). A budget whose minimum is not inside its
grid is flagged and left out of the power laws, never silently extrapolated.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONVENTIONS = {
    "6nd": "C = 6 N D, N = non-embedding parameters (paper)",
    "attention": "C = training FLOPs incl. LM head and attention (model.flops_per_token); N non-embedding",
}
PAPER_BUDGETS = [3e18, 9e18, 1.8e19, 3e19, 9e19, 1.8e20, 3e20]


# --- planning -----------------------------------------------------------------------------------


def shape(width: int, head_dim: int = 128) -> dict:
    """The Marin/SODA sweep's shape rule: layers = round(d / (64 + 4 log2 d - 7)), MHA heads of
    `head_dim`, MLP 4d."""
    layers = max(1, round(width / (64 + 4 * math.log2(width) - 7)))
    heads = max(1, width // head_dim)
    return {
        "hidden_size": width,
        "num_layers": layers,
        "num_attention_heads": heads,
        "num_query_groups": heads,
        "head_dim": width // heads,
        "ffn_hidden_size": 4 * width,
    }


def non_embedding_params(s: dict) -> int:
    d, hd, h = s["hidden_size"], s["head_dim"], s["num_attention_heads"]
    per_layer = d * hd * 3 * h + h * hd * d + 3 * d * s["ffn_hidden_size"] + 2 * d + 2 * hd
    return s["num_layers"] * per_layer + d


def plan(
    budgets: list[float],
    widths: list[int],
    vocab: int,
    seq_len: int,
    head_dim: int = 128,
    global_batch: int | None = None,
    flops: str = "6nd",
) -> list[dict]:
    """One row per (budget, width): shape, N, tokens D spending the budget, batch, steps, LR."""
    from megatron_soda.config import ModelConfig
    from megatron_soda.model import flops_per_token

    rows = []
    for c in budgets:
        for w in widths:
            s = shape(w, head_dim)
            n = non_embedding_params(s)
            per_token = 6 * n if flops == "6nd" else flops_per_token(ModelConfig(vocab_size=vocab, **s), seq_len)
            tokens = c / per_token
            # the sweep's batch rule: smallest power of two >= C / (FLOPs per sequence x 2^16), halved while LR > 0.01
            batch = global_batch or max(8, 2 ** math.ceil(math.log2(max(1.0, c / (per_token * seq_len * 2**16)))))
            lr = 0.33 * math.sqrt(batch) / w
            while global_batch is None and lr > 0.01 and batch > 8:
                batch //= 2
                lr = 0.33 * math.sqrt(batch) / w
            steps = max(1, round(tokens / (batch * seq_len)))
            rows.append(
                {
                    "compute": c,
                    "width": w,
                    **s,
                    "params": n,
                    "tokens": steps * batch * seq_len,
                    "batch": batch,
                    "steps": steps,
                    "lr": min(lr, 0.01),
                    "flops": flops,
                    "name": f"C{c:.0e}_d{w}".replace("+", ""),
                }
            )
    return rows


def write_plan(rows: list[dict], out: Path, base_config: str | None, seq_len: int, micro_batch: int) -> Path:
    """Ready training configs (one YAML per run) + plan.csv."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        cfg = {
            "model": {
                k: r[k]
                for k in (
                    "hidden_size",
                    "num_layers",
                    "num_attention_heads",
                    "num_query_groups",
                    "head_dim",
                    "ffn_hidden_size",
                )
            }
            | {"name": r["name"]},
            "optim": {
                "lr": r["lr"],
                "beta1": 0.95,
                "beta2": 0.98,
                "eps": 1e-15,
                "weight_decay": 0.1,
                "schedule": "wsd",
                "warmup_fraction": 0.1,
                "decay_fraction": 0.2,
                "z_loss": 0.0,
            },
            "train": {
                "seq_length": seq_len,
                "global_batch_size": r["batch"],
                "steps": r["steps"],
                "micro_batch_size": min(micro_batch, r["batch"]),
            },
        }
        (out / f"{r['name']}.yaml").write_text(
            (f"# base: {base_config}\n" if base_config else "") + yaml.safe_dump(cfg, sort_keys=False)
        )
    with open(out / "plan.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out / "plan.csv"


# --- fitting ------------------------------------------------------------------------------------


@dataclass
class BudgetFit:
    compute: float
    n_opt: float
    d_opt: float
    loss_opt: float
    curvature: float
    edge: bool  # the fitted minimum lies outside the grid's range (or the parabola opens downward)
    points: int


def read_csv(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, r in enumerate(csv.DictReader(f), 2):
            try:
                rows.append({k: float(r[k]) for k in ("compute", "params", "tokens", "loss")})
                rows[-1]["flops"] = r.get("flops") or "6nd"
            except (KeyError, ValueError, TypeError):
                raise ValueError(f"{path}:{i}: expected numeric columns compute, params, tokens, loss") from None
    return rows


def fit_budget(c: float, n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> BudgetFit:
    x = np.log(n)
    a, b, c0 = np.polyfit(x, loss, 2)
    if a <= 0:
        i = int(np.argmin(loss))
        return BudgetFit(c, float(n[i]), float(d[i]), float(loss[i]), float(a), True, len(n))
    x_opt = -b / (2 * a)
    n_opt = float(np.exp(x_opt))
    # D* from the tokens the grid actually trained (C = 6 N D up to the convention's constant)
    slope, icpt = np.polyfit(x, np.log(d), 1)
    d_opt = float(np.exp(icpt + slope * x_opt))
    edge = not (x.min() < x_opt < x.max())
    return BudgetFit(c, n_opt, d_opt, float(a * x_opt**2 + b * x_opt + c0), float(a), edge, len(n))


def _power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    a, logk = np.polyfit(np.log(c), np.log(y), 1)
    return float(a), float(math.exp(logk))


def fit_parametric(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> dict:
    """L = E + A/N^alpha + B/D^beta, least squares over a few starts (scipy)."""
    from scipy.optimize import least_squares

    def resid(p):
        e, la, lb, al, be = p
        return e + np.exp(la - al * np.log(n)) + np.exp(lb - be * np.log(d)) - loss

    best = None
    for al0 in (0.2, 0.35, 0.6):
        for be0 in (0.2, 0.35, 0.6):
            p0 = [max(loss.min() * 0.5, 1e-3), 5.0, 5.0, al0, be0]
            r = least_squares(resid, p0, bounds=([0, -20, -20, 0.01, 0.01], [loss.min(), 40, 40, 2, 2]))
            if best is None or r.cost < best.cost:
                best = r
    e, la, lb, al, be = best.x
    return {
        "E": float(e),
        "A": float(math.exp(la)),
        "B": float(math.exp(lb)),
        "alpha": float(al),
        "beta": float(be),
        "n_exponent": float(be / (al + be)),
        "d_exponent": float(al / (al + be)),
    }


def fit(rows: list[dict], bootstrap: int = 200, seed: int = 0) -> dict:
    budgets = sorted({r["compute"] for r in rows})
    per, flagged = [], []
    for c in budgets:
        g = [r for r in rows if r["compute"] == c]
        if len(g) < 3:
            flagged.append({"compute": c, "reason": f"only {len(g)} runs (a parabola needs 3)"})
            continue
        bf = fit_budget(c, *(np.array([r[k] for r in g]) for k in ("params", "tokens", "loss")))
        per.append(bf)
        if bf.edge:
            flagged.append({"compute": c, "reason": "minimum at or beyond the edge of the grid: widen the grid"})
    good = [b for b in per if not b.edge]
    if len(good) < 2:
        raise ValueError(
            f"need >= 2 budgets with an interior minimum to fit power laws, have {len(good)}; flagged: {flagged}"
        )
    cs = np.array([b.compute for b in good])
    a, ka = _power_law(cs, np.array([b.n_opt for b in good]))
    bexp, kb = _power_law(cs, np.array([b.d_opt for b in good]))
    lexp, kl = _power_law(cs, np.array([b.loss_opt for b in good]))
    rng = np.random.default_rng(seed)
    samples = []
    good_c = {b.compute for b in good}
    for _ in range(bootstrap):
        opts = []
        for c in sorted(good_c):
            g = [r for r in rows if r["compute"] == c]
            pick = [g[i] for i in rng.integers(0, len(g), len(g))]
            if len({p["params"] for p in pick}) < 3:
                continue
            bf = fit_budget(c, *(np.array([r[k] for r in pick]) for k in ("params", "tokens", "loss")))
            if not bf.edge:
                opts.append(bf)
        if len(opts) >= 2:
            cc = np.array([o.compute for o in opts])
            samples.append(
                (
                    _power_law(cc, np.array([o.n_opt for o in opts]))[0],
                    _power_law(cc, np.array([o.d_opt for o in opts]))[0],
                )
            )
    s = np.array(samples) if samples else np.full((1, 2), np.nan)
    result = {
        "flops_convention": CONVENTIONS[
            "attention" if rows and all(r.get("flops") == "attention" for r in rows) else "6nd"
        ],
        "n_exponent": a,
        "n_coefficient": ka,
        "d_exponent": bexp,
        "d_coefficient": kb,
        "n_exponent_ci95": [float(np.nanpercentile(s[:, 0], 2.5)), float(np.nanpercentile(s[:, 0], 97.5))],
        "d_exponent_ci95": [float(np.nanpercentile(s[:, 1], 2.5)), float(np.nanpercentile(s[:, 1], 97.5))],
        "exponent_ratio_d_over_n": bexp / a,
        "loss_frontier": {"exponent": lexp, "coefficient": kl},
        "budgets": [b.__dict__ for b in per],
        "flagged": flagged,
        "bootstrap_samples": len(samples),
    }
    try:
        result["parametric"] = fit_parametric(*(np.array([r[k] for r in rows]) for k in ("params", "tokens", "loss")))
    except Exception as e:  # a cross-check: its failure must not hide the main fit
        result["parametric"] = {"error": str(e)}
    return result


def predict(result: dict, compute: float) -> dict:
    n = result["n_coefficient"] * compute ** result["n_exponent"]
    d = result["d_coefficient"] * compute ** result["d_exponent"]
    lf = result["loss_frontier"]
    return {
        "compute": compute,
        "n_opt": n,
        "d_opt": d,
        "loss": lf["coefficient"] * compute ** lf["exponent"],
        "tokens_per_param": d / n,
    }


def plot(rows: list[dict], result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    cmap = plt.get_cmap("viridis")
    budgets = result["budgets"]
    for i, b in enumerate(budgets):
        g = sorted((r for r in rows if r["compute"] == b["compute"]), key=lambda r: r["params"])
        n = np.array([r["params"] for r in g])
        color = cmap(i / max(1, len(budgets) - 1))
        ax.scatter(n, [r["loss"] for r in g], color=color, s=18, label=f"C = {b['compute']:.1e}")
        x = np.linspace(np.log(n.min()) - 0.3, np.log(n.max()) + 0.3, 100)
        coef = np.polyfit(np.log(n), [r["loss"] for r in g], 2)
        ax.plot(np.exp(x), np.polyval(coef, x), color=color, lw=1)
        ax.plot(b["n_opt"], b["loss_opt"], marker="x" if b["edge"] else "*", color="red", ms=10)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation loss")
    ax.set_title("IsoFLOP curves (red star: fitted minimum; x: flagged edge)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p1 = out / "isoflop_curves.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    good = [b for b in budgets if not b["edge"]]
    cs = np.array([b["compute"] for b in good])
    grid = np.logspace(np.log10(cs.min()) - 0.5, np.log10(cs.max()) + 0.5, 50)
    for ax, key, coef, exp_, label in (
        (axes[0], "n_opt", result["n_coefficient"], result["n_exponent"], "N*"),
        (axes[1], "d_opt", result["d_coefficient"], result["d_exponent"], "D*"),
    ):
        ax.scatter(cs, [b[key] for b in good], color="k", zorder=3)
        ax.plot(grid, coef * grid**exp_, label=f"{label} ~ C^{exp_:.3f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    p2 = out / "isoflop_optima.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def write_fit(rows: list[dict], out: Path, bootstrap: int = 200) -> dict:
    result = fit(rows, bootstrap)
    out.mkdir(parents=True, exist_ok=True)
    result["plots"] = [str(p) for p in plot(rows, result, out)]
    (out / "fit.json").write_text(json.dumps(result, indent=1))
    return result


# --- running ------------------------------------------------------------------------------------


def _flatten(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out += [f"--{prefix}{k}", json.dumps(v)]
    return out


def run_grid(plan_dir: Path, base_config: str, out: Path, nproc: int, extra: list[str]) -> Path:
    """Train every planned run that has not finished (resumable), then write runs.csv."""
    import subprocess
    import sys

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
            cmd = [
                sys.executable,
                "-m",
                "megatron_soda.cli",
                "train",
                "--nproc",
                str(nproc),
                "--config",
                base_config,
                "--run-dir",
                str(run_dir),
                *overrides,
                "--train.eval_interval",
                str(steps),
                *extra,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] or proc.stderr.splitlines()
                raise RuntimeError(f"run {r['name']} failed ({run_dir}): {lines[-1] if lines else proc.returncode}")
            done = _final_val_loss(run_dir, steps)
            if done is None:
                raise RuntimeError(f"run {r['name']} logged no validation loss (set data.val_paths)")
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
    from megatron_soda.plots import read_metrics

    if not (run_dir / "metrics.jsonl").is_file():
        return None
    rows = read_metrics(run_dir)
    last = [r for r in rows if r.get("step") == steps and "val_loss" in r]
    return float(last[-1]["val_loss"]) if last else None
