"""soda isoflop: fitting recovers known exponents, edges are flagged, planning follows the sweep."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np

from megatron_soda.tools.isoflop.fit import fit, predict
from megatron_soda.tools.isoflop.plan import plan
from tests.launch import ROOT

# a Chinchilla-like surface with the SODA-like asymmetry: N* ~ C^(beta/(alpha+beta)) = C^0.452
E, A, B, ALPHA, BETA = 1.7, 400.0, 1200.0, 0.34, 0.28
TOL = 0.01  # on the exponents, with 0.3% loss noise and 9 sizes per budget


def _surface(budgets, noise=0.003, spread=0.8, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i, c in enumerate(budgets):
        grid = np.logspace(5, 11, 600)
        n_opt = grid[np.argmin([E + A / n**ALPHA + B / (c / (6 * n)) ** BETA for n in grid])]
        centre = n_opt * (10**shift if i == 0 else 1.0)
        for n in centre * np.logspace(-spread, spread, 9):
            d = c / (6 * n)
            rows.append(
                {
                    "compute": c,
                    "params": n,
                    "tokens": d,
                    "loss": E + A / n**ALPHA + B / d**BETA + rng.normal(0, noise * E),
                }
            )
    return rows


def test_fit_recovers_known_exponents():
    r = fit(_surface([1e17, 3e17, 1e18, 3e18, 1e19]), bootstrap=100)
    a_true, b_true = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
    assert abs(r["n_exponent"] - a_true) < TOL and abs(r["d_exponent"] - b_true) < TOL, r
    assert abs(r["exponent_ratio_d_over_n"] - b_true / a_true) < 0.05
    lo, hi = r["n_exponent_ci95"]
    assert lo <= r["n_exponent"] <= hi and hi - lo < 0.05
    par = r["parametric"]
    assert abs(par["alpha"] - ALPHA) < 0.03 and abs(par["beta"] - BETA) < 0.03
    assert not r["flagged"]
    p = predict(r, 1e20)
    assert p["d_opt"] / p["n_opt"] > predict(r, 1e18)["d_opt"] / predict(r, 1e18)["n_opt"]  # data grows faster


def test_a_budget_with_its_minimum_off_the_grid_is_flagged_not_fitted():
    rows = _surface([1e17, 3e17, 1e18, 3e18], shift=1.5)  # the first budget's grid lies far right of its optimum
    r = fit(rows, bootstrap=20)
    assert [f["compute"] for f in r["flagged"]] == [1e17] and "edge" in r["flagged"][0]["reason"]
    assert [b["edge"] for b in r["budgets"]] == [True, False, False, False]
    assert abs(r["n_exponent"] - BETA / (ALPHA + BETA)) < 2 * TOL  # fitted from the other three


def test_plan_follows_the_sweep_rules():
    """Spot checks from the spec's reconstructed grid (training FLOPs with LM head and attention):
    paper 9e18, d=768 -> 8 layers, 6 heads, batch 32, ~48.2k steps, LR 0.00243; 3e18, d=256 ->
    3 layers, 2 heads, batch 32, ~82k steps."""
    (r,) = plan([9e18], [768], 144_644, 4096, flops="attention")
    assert (r["num_layers"], r["num_attention_heads"], r["batch"]) == (8, 6, 32)
    assert abs(r["steps"] - 48_244) / 48_244 < 0.005 and abs(r["lr"] - 0.00243) < 1e-5
    (r,) = plan([3e18], [256], 144_644, 4096, flops="attention")
    assert (r["num_layers"], r["num_attention_heads"], r["batch"]) == (3, 2, 32)
    assert abs(r["steps"] - 82_031) / 82_031 < 0.005
    (r,) = plan([1e19], [1024], 144_644, 4096)  # 6ND: the tokens spend exactly the budget
    assert abs(6 * r["params"] * r["tokens"] - 1e19) / 1e19 < 0.01


def test_fit_command_on_a_csv(tmp_path):
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["compute", "params", "tokens", "loss"])
        w.writeheader()
        w.writerows(_surface([1e17, 1e18, 1e19]))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_soda.cli",
            "isoflop",
            "fit",
            "--csv",
            str(path),
            "--out",
            str(tmp_path / "fit"),
            "--bootstrap",
            "50",
            "--predict",
            "1.3e22",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "fit" / "fit.json").read_text())
    for key in ("n_exponent", "d_exponent", "n_exponent_ci95", "d_exponent_ci95", "budgets"):
        assert key in out
    assert (tmp_path / "fit" / "isoflop_curves.png").is_file() and (tmp_path / "fit" / "isoflop_optima.png").is_file()
    assert "predict C 1.30e+22" in r.stdout

    bad = tmp_path / "bad.csv"
    bad.write_text("compute,params,loss\n1,2,3\n")
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", "isoflop", "fit", "--csv", str(bad), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "expected numeric columns compute, params, tokens, loss" in r.stderr
