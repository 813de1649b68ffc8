"""IsoFLOP plots: loss against N per budget with the fitted parabolas, and N*, D* against C."""

from __future__ import annotations

from pathlib import Path


def plot(rows: list[dict], result: dict, out: Path) -> list[Path]:
    import matplotlib
    import numpy as np

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
    ax.set_xlabel("parameters N (total, both embedding matrices)")
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
