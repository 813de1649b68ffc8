"""Fitting an IsoFLOP grid (Chinchilla "approach 2", as the paper): a parabola of loss against log N
per budget, power laws for N*, D*, L* over budgets with bootstrap intervals, and the parametric
L(N, D) surface as a cross-check."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_soda.config import UserError
from megatron_soda.tools.isoflop.plan import CONVENTIONS

if TYPE_CHECKING:
    import numpy as np


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
    if not Path(path).is_file():
        raise UserError(f"{path}: no such runs.csv (`soda isoflop run` writes one)")
    rows = []
    with open(path) as f:
        for i, r in enumerate(csv.DictReader(f), 2):
            try:
                rows.append({k: float(r[k]) for k in ("compute", "params", "tokens", "loss")})
                rows[-1]["flops"] = r.get("flops") or "paper"
            except (KeyError, ValueError, TypeError):
                raise UserError(f"{path}:{i}: expected numeric columns compute, params, tokens, loss") from None
    return rows


def _convention(rows: list[dict]) -> str:
    names = sorted({r.get("flops", "paper") for r in rows})
    if len(names) == 1 and names[0] in CONVENTIONS:
        return f"{names[0]}: {CONVENTIONS[names[0]]}"
    return f"mixed or unknown FLOPs conventions: {names}"


def fit_budget(c: float, n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> BudgetFit:
    import numpy as np

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
    import numpy as np

    a, logk = np.polyfit(np.log(c), np.log(y), 1)
    return float(a), float(math.exp(logk))


def fit_parametric(n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> dict:
    """L = E + A/N^alpha + B/D^beta, least squares over a few starts (scipy)."""
    import numpy as np
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
    import numpy as np

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
        raise UserError(
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
        "flops_convention": _convention(rows),
        "n_definition": "total parameters incl. both embedding matrices (the runs.csv params column)",
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
