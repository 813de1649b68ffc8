"""Plots people look at: the loss curve of a run (from its metrics.jsonl), benchmark comparisons."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import UserError
from megatron_soda.training.metrics import read_metrics


def plot_loss(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="train loss (all tokens)")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("mean token NLL")
    ax.legend()
    ax.grid(alpha=0.3)
    for key in sorted({k for r in rows for k in r if k.startswith("loss_")}):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax2.plot(*zip(*pts, strict=True), label=key[5:], lw=1)
    ax2.set_xlabel("step")
    ax2.set_title("per-modality loss")
    ax2.legend(fontsize=7, ncol=2)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).resolve()}: {len(rows)} logged steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_bench(rows: list[dict], out: str | Path, last: int = 24) -> Path:
    """Bars of tokens/s per GPU (and MFU where known) for the last `last` `soda bench train` rows,
    grouped by run label so each configuration's variants stand side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[-last:]
    names = [f"{r['label']}\n{r['variant']}" for r in rows]
    colors = {
        "ours": "tab:blue",
        "ours-nokernels": "tab:cyan",
        "ours-off": "tab:purple",
        "hf": "tab:orange",
        "hf-compile": "tab:red",
    }
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    bars = ax.bar(
        range(len(rows)),
        [r["tokens_per_s_per_gpu"] for r in rows],
        color=[colors.get(r["variant"], "tab:green" if "+" in r["variant"] else "gray") for r in rows],
    )
    for b, r in zip(bars, rows, strict=True):
        note = f"{100 * r['mfu']:.0f}% MFU" if r.get("mfu") is not None else f"{r['tflops_per_gpu']:.2g} TF/s"
        ax.annotate(note, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("tokens/s per GPU")
    devices = sorted({r["device"] for r in rows})
    ax.set_title(f"soda bench train ({', '.join(devices)})", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def ascii_curve(run_dir: str | Path, points: int = 10) -> str:
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"{Path(run_dir) / 'metrics.jsonl'}: no steps logged yet")
    n = len(rows)
    pick = [rows[i] for i in sorted({round(i * (n - 1) / max(points - 1, 1)) for i in range(points)})]
    lo, hi = min(r["loss"] for r in rows), max(r["loss"] for r in rows)
    lines = []
    for r in pick:
        bar = "#" * int(1 + 50 * (r["loss"] - lo) / max(hi - lo, 1e-9))
        lines.append(f"step {r['step']:>5}  loss {r['loss']:7.4f}  {bar}")
    return "\n".join(lines)


@dataclass
class PlotConfig:
    run_dir: str = field(metadata={"positional": True})
    out: str | None = field(default=None, metadata={"help": "default: RUN_DIR/loss.png"})


def plot_job(cfg: PlotConfig) -> None:
    """`soda plot`: loss curves of a training run as a PNG (and a rough one in the terminal)."""
    print(ascii_curve(cfg.run_dir))
    print(f"plot: {plot_loss(cfg.run_dir, cfg.out)}")
