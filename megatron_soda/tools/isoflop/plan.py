"""Planning an IsoFLOP grid the way the SODA sweep did: its FLOPs count, width grid, shape, batch,
LR and optimizer rules, and the runs it dropped (each with its reason).

The paper's budgets are total training FLOPs C = 3 x forward FLOPs x tokens (the sweep's code works
in forward FLOPs, 1e18 ... 1e20, and the paper relabels them x3). The forward count is Levanter's
(`model.flops.forward_flops_per_token(..., softmax=True)`): every matmul including the LM head, and
the full (not causally halved) attention map. Counting 6 N D instead (N non-embedding) gives small,
embedding-heavy models far too many tokens (d=256 at 3e18: 159B tokens instead of 10.75B), so it is
a named option, never the default. Sizes N are total parameters with both embedding matrices, as
the sweep labels its models (77M ... 4.2B).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import ModelConfig, UserError
from megatron_soda.model.flops import forward_flops_per_token, param_counts

CONVENTIONS = {
    "paper": "C = 3 x forward FLOPs x D (forward: all matmuls incl. LM head + full attention map); "
    "N = total parameters incl. both embedding matrices",
    "6nd": "C = 6 N_non-embedding D (Kaplan); N in the fit = total parameters incl. both embedding matrices",
}
PAPER_BUDGETS = [3e18, 9e18, 1.8e19, 3e19, 9e19, 1.8e20, 3e20]
# Hand-picked larger widths the sweep added at its top budgets (paper FLOPs), run under the same rules:
# with them the grid is 59 sweep + 7 target runs (the paper trained 64 of these 66).
PAPER_TARGETS = {9e19: [2048], 1.8e20: [2048, 2304], 3e20: [2048, 2304, 2816, 3072]}
FINE_GRID_MAX_FORWARD = 9e18  # widths in steps of 128 up to this forward budget, 256 above
MIN_BATCH, MAX_STEPS, BUDGET_TOLERANCE, MAX_LR = 8, 400_000, 0.01, 0.01
# The sweep's optimizer (Levanter's Cautious Adam with AdamC weight decay); beta2 follows the batch.
SWEEP_OPTIM = {"beta1": 0.95, "eps": 1e-15, "weight_decay": 0.1, "warmup_fraction": 0.1, "decay_fraction": 0.2}


def shape(width: int, head_dim: int = 128) -> dict:
    """The sweep's shape rule: layers = round(d / (64 + 4 log2 d - 7)), MHA heads of `head_dim`, MLP 4d."""
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


def sweep_widths(compute: float) -> list[int]:
    """The sweep's widths for a (paper) budget: 128 ... 2048 in steps of 128, or 256 above the fine-grid budget."""
    step = 128 if compute / 3 <= FINE_GRID_MAX_FORWARD else 256
    return list(range(128, 2048 + 1, step))


def training_flops_per_token(model: ModelConfig, seq_len: int, flops: str) -> float:
    if flops == "paper":
        return 3.0 * forward_flops_per_token(model, seq_len, softmax=True)
    if flops == "6nd":
        return 6.0 * param_counts(model)["non_embedding"]
    raise UserError(f"--flops: expected one of {', '.join(CONVENTIONS)}, got {flops!r}")


def plan_run(
    compute: float,
    width: int,
    vocab: int,
    seq_len: int,
    head_dim: int = 128,
    global_batch: int | None = None,
    flops: str = "paper",
    target: bool = False,
) -> tuple[dict | None, str]:
    """One run of the grid, or (None, why it was dropped)."""
    s = shape(width, head_dim)
    model = ModelConfig(vocab_size=vocab, **s)
    counts = param_counts(model)
    per_seq = training_flops_per_token(model, seq_len, flops) * seq_len
    if global_batch:
        batch = global_batch
    else:
        # smallest power of two that finishes the budget within 2^16 steps, halved while the LR is too high
        batch = 2 ** max(0, math.ceil(math.log2(compute / (per_seq * 2**16))))
        while 0.33 * math.sqrt(batch) / width > MAX_LR and batch >= MIN_BATCH:
            batch //= 2
        if batch < MIN_BATCH:
            return None, f"batch {batch} < {MIN_BATCH}"
    lr = min(0.33 * math.sqrt(batch) / width, MAX_LR)  # a fixed batch can ask for more: capped as the sweep's
    steps = round(compute / (batch * per_seq))
    achieved = steps * batch * per_seq
    if steps < 1 or abs(achieved - compute) / compute > BUDGET_TOLERANCE:
        return None, f"{steps} steps spend {achieved:.3g} FLOPs, more than 1% off the budget"
    if steps >= MAX_STEPS:
        return None, f"{steps} steps >= {MAX_STEPS}"
    return {
        "compute": compute,
        "width": width,
        **s,
        "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "tokens": steps * batch * seq_len,
        "batch": batch,
        "steps": steps,
        "seq_len": seq_len,
        "lr": lr,
        **SWEEP_OPTIM,
        "beta2": 0.98 ** (batch / 128),
        "z_loss": 0.0,
        "flops": flops,
        "achieved_compute": achieved,
        "target": target,
        "name": f"C{compute:.1e}_d{width}".replace("+", ""),
    }, ""


def plan(
    budgets: list[float],
    widths: list[int] | None,
    vocab: int,
    seq_len: int,
    head_dim: int = 128,
    global_batch: int | None = None,
    flops: str = "paper",
    targets: bool = True,
) -> tuple[list[dict], list[dict]]:
    """(runs, dropped): one row per kept (budget, width), and per dropped one its reason. Without
    `widths` each budget gets the sweep's own widths (and, with `targets`, the extra target runs)."""
    rows, dropped = [], []
    for c in budgets:
        candidates = [(w, False) for w in (widths or sweep_widths(c))]
        if targets and not widths:
            candidates += [(w, True) for w in PAPER_TARGETS.get(c, []) if w not in dict(candidates)]
        for w, is_target in candidates:
            row, why = plan_run(c, w, vocab, seq_len, head_dim, global_batch, flops, is_target)
            if row:
                rows.append(row)
            else:
                dropped.append({"compute": c, "width": w, "reason": why})
    return rows, dropped


def write_plan(rows: list[dict], dropped: list[dict], out: Path, base_config: str | None, micro_batch: int) -> Path:
    """Ready training configs (one YAML per run), plan.csv (every hyper-parameter of every run) and
    dropped.csv (what the rules left out, and why)."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    model_keys = ("hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "head_dim", "ffn_hidden_size")
    optim_keys = ("lr", "beta1", "beta2", "eps", "weight_decay", "warmup_fraction", "decay_fraction", "z_loss")
    for r in rows:
        cfg = {
            "model": {k: r[k] for k in model_keys} | {"name": r["name"]},
            "optim": {k: r[k] for k in optim_keys} | {"schedule": "wsd", "min_lr": 0.0, "adamc": True},
            "train": {
                "seq_length": r["seq_len"],
                "global_batch_size": r["batch"],
                "steps": r["steps"],
                "micro_batch_size": min(micro_batch, r["batch"]),
            },
        }
        (out / f"{r['name']}.yaml").write_text(
            (f"# base: {base_config}\n" if base_config else "") + yaml.safe_dump(cfg, sort_keys=False)
        )
    for name, table, fields in (
        ("plan.csv", rows, list(rows[0]) if rows else ["name"]),
        ("dropped.csv", dropped, ["compute", "width", "reason"]),
    ):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(table)
    return out / "plan.csv"


@dataclass
class PlanConfig:
    out: str
    budgets: list[float] = field(default_factory=lambda: list(PAPER_BUDGETS))
    widths: list[int] = field(
        default_factory=list, metadata={"help": "the same widths for every budget (default: the sweep's grid)"}
    )
    targets: bool = field(default=True, metadata={"help": "add the sweep's extra target widths at the top budgets"})
    head_dim: int = 128
    seq_len: int = 4096
    vocab: int = 144_644
    global_batch: int | None = field(default=None, metadata={"help": "fixed batch (default: the sweep's rule)"})
    micro_batch: int = 1
    flops: str = field(default="paper", metadata={"choices": list(CONVENTIONS)})
    base_config: str | None = None


def plan_job(cfg: PlanConfig) -> list[dict]:
    """`soda isoflop plan`: budgets x widths -> one training config per run + plan.csv + dropped.csv."""
    rows, dropped = plan(
        cfg.budgets, cfg.widths or None, cfg.vocab, cfg.seq_len, cfg.head_dim, cfg.global_batch, cfg.flops, cfg.targets
    )
    if not rows:
        raise UserError(f"no run of the grid survives the sweep's rules: {dropped[0]['reason'] if dropped else ''}")
    path = write_plan(rows, dropped, Path(cfg.out), cfg.base_config, cfg.micro_batch)
    print(f"{len(rows)} runs planned, {len(dropped)} dropped ({cfg.flops}: {CONVENTIONS[cfg.flops]}) -> {path}")
    for r in rows:
        print(
            f"  C {r['compute']:.1e}  d {r['width']:>5}  L {r['num_layers']:>2}  N {r['params'] / 1e6:9.3f}M  "
            f"D {r['tokens']:10.4g}  batch {r['batch']:>4}  steps {r['steps']:>7}  lr {r['lr']:.2e}  "
            f"beta2 {r['beta2']:.4f}{'  (target)' if r['target'] else ''}"
        )
    for d in dropped:
        print(f"  dropped C {d['compute']:.1e}  d {d['width']:>5}: {d['reason']}")
    return rows
