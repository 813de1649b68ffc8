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
    buckets = sorted({k for r in rows for k in r if k.startswith("val_loss_pos_")}, key=_bucket_start)
    scores = sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith("/accuracy")})
    panels = 2 + bool(buckets) + bool(scores)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    ax, ax2 = axes[0], axes[1]
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="train loss (all tokens)")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("mean token NLL")
    ax.legend()
    ax.grid(alpha=0.3)
    for key in sorted({k for r in rows for k in r if k.startswith("loss_") and not k.startswith("loss_pos_")}):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax2.plot(*zip(*pts, strict=True), label=key[5:], lw=1)
    ax2.set_xlabel("step")
    ax2.set_title("per-modality loss")
    ax2.legend(fontsize=7, ncol=2)
    ax2.grid(alpha=0.3)
    if buckets:  # long context: is the loss of late positions (much context) below that of early ones?
        ax3 = axes[2]
        for key in buckets:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax3.plot(*zip(*pts, strict=True), "o-", label=key[len("val_loss_pos_") :].replace("_", "-"), lw=1)
        ax3.set_xlabel("step")
        ax3.set_title("validation loss by token position")
        ax3.legend(fontsize=7, ncol=2)
        ax3.grid(alpha=0.3)
    if scores:  # in-run downstream evaluation (eval.tasks): does the ablation move the benchmarks?
        ax4 = axes[-1]
        for key in scores:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax4.plot(*zip(*pts, strict=True), "o-", label=key[len("eval/") : -len("/accuracy")], lw=1)
        ax4.set_xlabel("step")
        ax4.set_title("downstream accuracy (eval.tasks)")
        ax4.legend(fontsize=7)
        ax4.grid(alpha=0.3)
    fig.suptitle(f"{Path(run_dir).resolve()}: {len(rows)} logged steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bucket_start(key: str) -> int:
    """val_loss_pos_4k_8k -> 4096 (the buckets in position order, not name order)."""
    lo = key[len("val_loss_pos_") :].split("_")[0]
    return int(lo[:-1]) * 1024 if lo.endswith("k") else int(lo)


# bars of the headline chart, in this order within a preset; the lever variants go to the ablation chart
HEADLINE = {
    "ours": ("ours (levers auto)", "tab:blue"),
    "ours+fp8": ("ours + FP8", "navy"),
    "ours-nokernels": ("ours, kernels off", "tab:cyan"),
    "ours-off": ("ours, levers off", "tab:purple"),
    "hf": ("transformers Qwen3", "tab:orange"),
    "hf-compile": ("transformers + compile", "tab:red"),
}


def _run_letters(rows: list[dict]) -> dict[str, str]:
    """A letter per invocation (`command`), in file order: the letters docs/PERFORMANCE.md's tables use."""
    out: dict[str, str] = {}
    for r in rows:
        out.setdefault(r.get("command", ""), chr(ord("A") + len(out)))
    return out


def _gpu(row: dict) -> str:
    return row["device"].removeprefix("NVIDIA ")


def _preset_name(preset: str) -> str:
    return preset.removeprefix("soda-").upper().replace("TINY", "tiny")


def _mb(row: dict) -> str:
    return f"{row['micro_batch']}x{row['global_batch'] // (row['micro_batch'] * row.get('dp', 1))}"


def _headline(ax, rows: list[dict], letters: dict[str, str]) -> None:
    """One GPU kind: presets on the x axis (smallest first), the newest row of each headline variant
    side by side, tokens/s per GPU as the bar, MFU on top, run letter and micro x accumulation in it."""
    presets = sorted(
        {r["preset"] for r in rows}, key=lambda p: min(r["flops_per_token"] for r in rows if r["preset"] == p)
    )
    newest = {(r["preset"], r["variant"]): r for r in rows}  # file order: the last one wins
    variants = [v for v in HEADLINE if any(k[1] == v for k in newest)]
    width = 0.8 / max(1, len(variants))
    top = max(r["tokens_per_s_per_gpu"] for r in newest.values())
    for j, v in enumerate(variants):
        label, color = HEADLINE[v]
        for i, p in enumerate(presets):
            r = newest.get((p, v))
            if r is None:
                continue
            x = i - 0.4 + (j + 0.5) * width
            y = r["tokens_per_s_per_gpu"]
            ax.bar(
                x,
                y,
                width * 0.92,
                color=color,
                label=label if i == min(k for k, q in enumerate(presets) if (q, v) in newest) else None,
            )
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else f"{r['tflops_per_gpu']:.2g} TF/s"
            ax.annotate(mfu, (x, y), ha="center", va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
            ax.annotate(
                f"{letters[r.get('command', '')]} {_mb(r)}",
                (x, 0),
                ha="center",
                va="bottom",
                fontsize=6,
                rotation=90,
                color="white",
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(presets)), [_preset_name(p) for p in presets])
    ax.set_yscale("log")
    ax.set_ylim(top=top * 2.2)
    ax.set_ylabel("tokens/s per GPU (log)")
    ax.grid(axis="y", alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=3, loc="upper right")


def _ablation_runs(rows: list[dict]) -> list[list[dict]]:
    """Invocations with at least one `ours-off+<lever>` row and their `ours-off` reference."""
    by_cmd: dict[str, list[dict]] = {}
    for r in rows:
        by_cmd.setdefault(r.get("command", ""), []).append(r)
    return [
        run
        for run in by_cmd.values()
        if any(r["variant"].startswith("ours-off+") for r in run) and any(r["variant"] == "ours-off" for r in run)
    ]


def _levers(ax, runs: list[list[dict]], letters: dict[str, str]) -> None:
    """Each lever alone (and all of them: `ours`) as the change of tokens/s against the same run's
    `ours-off`, one bar per run, so runs of other lengths stand next to each other."""
    names = []
    for run in runs:
        for r in run:
            v = r["variant"]
            if v != "ours-off" and (v.startswith("ours-off+") or v == "ours") and v not in names:
                names.append(v)
    names.sort(key=lambda v: (v == "ours", v))
    width = 0.8 / len(runs)
    for j, run in enumerate(runs):
        base = next(r for r in run if r["variant"] == "ours-off")
        steps = base["steps"]
        for i, v in enumerate(names):
            r = next((x for x in run if x["variant"] == v), None)
            if r is None:
                continue
            change = 100 * (r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] - 1)
            x = i - 0.4 + (j + 0.5) * width
            label = (
                f"run {letters[base.get('command', '')]} ({steps} steps)"
                if i == names.index(next(n for n in names if any(q["variant"] == n for q in run)))
                else None
            )
            ax.bar(x, change, width * 0.92, color=f"C{j}", label=label)
            ax.annotate(
                f"{change:+.1f}%",
                (x, change),
                ha="center",
                va="bottom" if change >= 0 else "top",
                fontsize=7,
                xytext=(0, 1 if change >= 0 else -1),
                textcoords="offset points",
            )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(
        range(len(names)), [("all levers (ours)" if v == "ours" else "+" + v.split("+", 1)[1]) for v in names]
    )
    ax.set_ylabel("tokens/s vs ours-off, same run (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def _most_common(values):
    from collections import Counter

    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else None


def plot_bench(rows: list[dict], out: str | Path, last: int | None = None) -> Path:
    """The `soda bench train` rows (the last `last` of them, default all) as charts a reader can read:
    `out`, one panel per GPU kind with the presets side by side (ours, ours + FP8, kernels off,
    levers off, transformers: the newest row of each; MFU above each bar, the run letter and micro x
    accumulation inside), and, when the rows hold a lever ablation, `<out>_levers.png` beside it:
    each lever alone against all off in the same run, a panel per GPU kind and preset. Returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[-last:] if last else list(rows)
    letters = _run_letters(rows)
    gpus = list(dict.fromkeys(_gpu(r) for r in rows))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    heads = [[r for r in rows if _gpu(r) == g and r["variant"] in HEADLINE] for g in gpus]
    # one sequence length per panel (its most common: the presets' 4,096), so a long-context row
    # (gpu_check.sh long) never stands in for a preset's headline bar
    heads = [[r for r in h if r["seq_len"] == _most_common(x["seq_len"] for x in h)] for h in heads]
    heads = [(g, h) for g, h in zip(gpus, heads, strict=True) if h]
    if heads:
        widths = [max(2, len({r["preset"] for r in h})) for _, h in heads]
        fig, axes = plt.subplots(
            1,
            len(heads),
            figsize=(sum(2.6 * w for w in widths) + 1, 4.8),
            squeeze=False,
            gridspec_kw={"width_ratios": widths},
        )
        for ax, (g, h) in zip(axes[0], heads, strict=True):
            _headline(ax, h, letters)
            ax.set_title(f"{g}: {h[0]['dtype']}, seq {h[0]['seq_len']}", fontsize=9)
        fig.suptitle(
            "soda bench train: tokens/s per GPU by preset; MFU (full-attention count) above each bar", fontsize=9
        )
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)
    panels = []
    for g in gpus:
        mine = [r for r in rows if _gpu(r) == g]
        for preset in dict.fromkeys(r["preset"] for r in mine):
            runs = _ablation_runs([r for r in mine if r["preset"] == preset])
            if runs:
                panels.append((g, preset, runs))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
        for ax, (g, preset, runs) in zip(axes[0], panels, strict=True):
            _levers(ax, runs, letters)
            ax.set_title(f"speed levers one at a time: {_preset_name(preset)} on {g}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out.with_name(out.stem + "_levers.png"), dpi=120)
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
