"""Planning an IsoFLOP grid: the sweep's shape, batch and LR rules, and one training config per run."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import ModelConfig
from megatron_soda.model.flops import flops_per_token, param_counts

CONVENTIONS = {
    "6nd": "C = 6 N D, N = non-embedding parameters (paper)",
    "attention": "C = training FLOPs incl. LM head and attention (flops_per_token); N non-embedding",
}
PAPER_BUDGETS = [3e18, 9e18, 1.8e19, 3e19, 9e19, 1.8e20, 3e20]


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
    rows = []
    for c in budgets:
        for w in widths:
            s = shape(w, head_dim)
            model = ModelConfig(vocab_size=vocab, **s)
            n = param_counts(model)["non_embedding"]
            per_token = 6 * n if flops == "6nd" else flops_per_token(model, seq_len)
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


@dataclass
class PlanConfig:
    out: str
    budgets: list[float] = field(default_factory=lambda: list(PAPER_BUDGETS))
    widths: list[int] = field(default_factory=lambda: [512, 768, 1024, 1280, 1536, 1792, 2048])
    head_dim: int = 128
    seq_len: int = 4096
    vocab: int = 144_644
    global_batch: int | None = field(default=None, metadata={"help": "fixed batch (default: the sweep's rule)"})
    micro_batch: int = 1
    flops: str = field(default="6nd", metadata={"choices": list(CONVENTIONS)})
    base_config: str | None = None


def plan_job(cfg: PlanConfig) -> list[dict]:
    """`soda isoflop plan`: budgets x widths -> one training config per run + plan.csv."""
    rows = plan(cfg.budgets, cfg.widths, cfg.vocab, cfg.seq_len, cfg.head_dim, cfg.global_batch, cfg.flops)
    path = write_plan(rows, Path(cfg.out), cfg.base_config, cfg.seq_len, cfg.micro_batch)
    print(f"{len(rows)} runs planned ({cfg.flops}: {CONVENTIONS[cfg.flops]}) -> {path}")
    for r in rows:
        print(
            f"  C {r['compute']:.1e}  d {r['width']:>5}  L {r['num_layers']:>2}  N {r['params'] / 1e6:9.3f}M  "
            f"D {r['tokens'] / 1e6:10.2f}M  batch {r['batch']:>4}  steps {r['steps']:>7}  lr {r['lr']:.2e}"
        )
    return rows
