"""soda isoflop: fitting recovers known exponents, edges are flagged, planning follows the sweep."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np

from megatron_soda.tools.isoflop.fit import fit, predict
from megatron_soda.tools.isoflop.plan import PAPER_BUDGETS, plan
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


def test_default_plan_is_the_papers_grid(tmp_path):
    """`soda isoflop plan` with its defaults reproduces the SODA sweep: 7 budgets, 59 sweep + 7 target
    runs, and the spec's spot checks (paper FLOPs = 3 x forward incl. LM head and full attention map)."""
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", "isoflop", "plan", "--out", str(tmp_path / "plan")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "plan" / "plan.csv")))
    assert len(rows) == 66 and sum(x["target"] == "True" for x in rows) == 7
    per_budget = {c: sum(float(x["compute"]) == c for x in rows) for c in PAPER_BUDGETS}
    assert list(per_budget.values()) == [7, 12, 14, 7, 8, 8, 10], per_budget  # 59 sweep runs + 1, 2, 4 targets
    run = {(float(x["compute"]), int(x["width"])): x for x in rows}
    # paper 3e18, d=768: 8 layers, 6 heads, batch 8, ~2.11B tokens, ~297.7M parameters (both embeddings)
    x = run[(3e18, 768)]
    assert (int(x["num_layers"]), int(x["num_attention_heads"]), int(x["batch"])) == (8, 6, 8)
    assert int(x["steps"]) == 64_326 and abs(int(x["tokens"]) / 2.11e9 - 1) < 0.005
    assert abs(int(x["params"]) / 297.7e6 - 1) < 0.001 and int(x["non_embedding_params"]) < 80e6
    # paper 9e18, d=768: batch 32, 48,244 steps, LR 0.00243, beta2 0.98^(32/128)
    x = run[(9e18, 768)]
    assert (int(x["batch"]), int(x["steps"])) == (32, 48_244) and abs(float(x["lr"]) - 0.00243) < 5e-6
    assert abs(float(x["beta2"]) - 0.98**0.25) < 1e-12
    assert (float(x["beta1"]), float(x["eps"]), float(x["weight_decay"]), float(x["z_loss"])) == (0.95, 1e-15, 0.1, 0)
    # paper 3e18, d=256: 3 layers, 2 heads, batch 32, 82,031 steps, 10.75B tokens, 77M parameters
    x = run[(3e18, 256)]
    assert (int(x["num_layers"]), int(x["batch"]), int(x["steps"])) == (3, 32, 82_031)
    assert abs(int(x["params"]) / 77.2e6 - 1) < 0.01
    # the widths step by 128 up to paper 1.8e19 and by 256 above; the 3e20 targets reach 5.42B
    assert sorted(w for c, w in run if c == 3e19) == [384, 640, 896, 1152, 1408, 1664, 1920]
    assert abs(int(run[(3e20, 3072)]["params"]) / 5.42e9 - 1) < 0.01
    dropped = {
        (float(x["compute"]), int(x["width"])): x["reason"]
        for x in csv.DictReader(open(tmp_path / "plan" / "dropped.csv"))
    }
    assert "steps >= 400000" in dropped[(3e18, 128)] and "< 8" in dropped[(3e18, 1152)]
    yaml_text = (tmp_path / "plan" / "C9.0e18_d768.yaml").read_text()
    assert "beta2: 0.99" in yaml_text and "adamc: true" in yaml_text and "z_loss: 0.0" in yaml_text
    assert "66 runs planned, 21 dropped (paper:" in r.stdout


def test_6nd_is_a_named_option():
    rows, _ = plan([1e19], [1024], 144_644, 4096, flops="6nd")
    (r,) = rows
    assert abs(6 * r["non_embedding_params"] * r["tokens"] - 1e19) / 1e19 < 0.01 and r["flops"] == "6nd"
    # the issue that made it non-default: 6ND gives d=256 at 3e18 ~159B tokens, the paper trains 10.75B
    # over 1.2M steps at batch 32, which the sweep's rules drop
    rows, dropped = plan([3e18], [256], 144_644, 4096, flops="6nd", global_batch=32)
    steps = int(dropped[0]["reason"].split()[0])
    assert not rows and abs(steps * 32 * 4096 / 159e9 - 1) < 0.02
    (paper,), _ = plan([3e18], [256], 144_644, 4096)
    assert abs(paper["tokens"] / 10.75e9 - 1) < 0.005


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
    a_true, b_true = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)  # the surface's exponents, known
    assert abs(out["n_exponent"] - a_true) < TOL and abs(out["d_exponent"] - b_true) < TOL, out
    assert out["n_exponent_ci95"][0] <= out["n_exponent"] <= out["n_exponent_ci95"][1] and len(out["budgets"]) == 3
    assert out["n_definition"].startswith("total parameters") and out["flops_convention"].startswith("paper:")
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
