"""`soda bench train`: training throughput, MFU and memory of one preset + layout, with baselines.

Every variant runs in its own process (torchrun for a multi-rank layout), so peak memory and
compile caches of one never leak into the next, and each sees the same synthetic micro-batches
(random ids of the model's vocabulary, held in memory: the loader is benchmarked on its own by
`soda bench loader`). Variants:

- `ours`: the real training step (megatron-core schedule, DDP, optimizer), every speed switch as
  configured (`auto` = the fast path on GPU: megatron_soda/model/fast_paths.py);
- `ours-nokernels`: the same with torch's embedding and output layer + cross-entropy;
- `ours-off`: the speed levers (CUDA graphs, weight-gradient fusion, Triton RMSNorm and RoPE, fused
  AdamW) all off, the embedding/output kernels as configured; `ours-off+graphs`, `ours-off+wgrad`,
  ... turn one lever (or several, joined by +) back on: the ablation;
- `ours+fp8` (or any variant of ours +fp8): the same with `model.fp8 tensorwise` (the transformer
  layers' linears in FP8, kernels/fp8.py); same initial weights and batches, so the loss curves of
  `ours` and `ours+fp8` compare step by step; likewise `+blockwise` (the output layer in
  kernels/blockwise_ce.py) and `+filter` (that kernel with cut-cross-entropy's gradient filter);
- `hf`: transformers' Qwen3ForCausalLM of the same config, SDPA, fused AdamW, bf16 autocast on
  GPU (fp32 on CPU), one process holding the same per-GPU micro-batches; `hf-compile` adds
  torch.compile. This is what a user would otherwise write.

Times are medians over the measured steps after `warmup` steps. The step split: `forward` is a
forward-only pass of the same micro-batches with autograd recording (what a training forward
costs), `grad_sync` is the exposed part of the gradient reduction (megatron's
finalize_model_grads; with overlap on, most of it hides in backward), `backward` is the rest of
the forward-backward call, `optimizer` the optimizer step. MFU = model FLOPs (the training code's
formula, attention included) x tokens/s per GPU / peak bf16 FLOP/s.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import CCE_FILTER_EPS, Device, UserError

VARIANTS = ("ours", "ours-nokernels", "ours-off", "hf", "hf-compile")
# lever name in a variant -> the config switch it turns on (off: the switch's torch choice)
LEVER_NAMES = {"graphs": "cuda_graph", "wgrad": "wgrad", "norm": "norm", "rope": "rope", "adam": "adam"}
# opt-in features a variant of ours can add (`ours+fp8`, `ours-off+rope+fp8`): name -> (overrides, what it is)
EXTRAS = {
    "fp8": ({"model": {"fp8": "tensorwise"}}, "model.fp8 tensorwise"),
    "blockwise": ({"model": {"output_impl": "blockwise"}}, "model.output_impl blockwise"),
    "filter": (
        {"model": {"output_impl": "blockwise", "ce_filter_eps": CCE_FILTER_EPS}},
        f"blockwise with model.ce_filter_eps {CCE_FILTER_EPS:.6f}",
    ),
}
EXTRAS_HELP = ", ".join(f"+{name} ({what})" for name, (_, what) in EXTRAS.items())


def _extra_overrides(part: str) -> dict:
    """The config overrides of a variant's `+part` ({} for a lever)."""
    return EXTRAS[part][0] if part in EXTRAS else {}


def check_variant(v: str) -> None:
    """`ours-off+graphs+adam` and `ours+fp8` style names are valid too; raises a UserError naming the
    unknown part."""
    base, *parts = v.split("+")
    levers = [x for x in parts if x not in EXTRAS]
    if base not in VARIANTS or (parts and not base.startswith("ours")) or (levers and base != "ours-off"):
        raise UserError(
            f"unknown variant {v!r}: {', '.join(VARIANTS)}, ours-off+<lever>[+<lever>...], "
            f"or a variant of ours +{'/+'.join(EXTRAS)}"
        )
    bad = [x for x in levers if x not in LEVER_NAMES]
    if bad:
        raise UserError(
            f"variant {v!r}: unknown lever {bad[0]!r} (levers: {', '.join(LEVER_NAMES)}; extras: {', '.join(EXTRAS)})"
        )
    kernel = [x for x in parts if "output_impl" in _extra_overrides(x).get("model", {})]
    if base == "ours-nokernels" and kernel:
        raise UserError(f"variant {v!r}: +{kernel[0]} puts a kernel into ours-nokernels (torch's output layer)")


def variant_overrides(v: str) -> dict:
    """The config overrides a variant of ours stands for."""
    from megatron_soda.config import SWITCHES, switch_options

    base, *parts = v.split("+")
    levers = [x for x in parts if x not in EXTRAS]
    out: dict = {}
    if base == "ours-nokernels":
        out = {"model": {"embedding_impl": "torch", "output_impl": "torch"}}
    if base == "ours-off":
        on = {LEVER_NAMES[x] for x in levers}
        for name in LEVER_NAMES.values():
            section, key = SWITCHES[name]
            fast, slow = switch_options(name)
            out.setdefault(section, {})[key] = fast if name in on else slow
    for x in parts:
        for section, values in _extra_overrides(x).items():
            out.setdefault(section, {}).update(values)
    return out


def bench_layout(vocab_size: int):
    """A token layout matching `vocab_size` (the loss breakdown needs one); 0 = the SODA layout."""
    from megatron_soda.tokenization.vocab import LLAMA3_LAYOUT, SodaLayout

    if vocab_size in (0, LLAMA3_LAYOUT.vocab_size):
        return LLAMA3_LAYOUT
    text = vocab_size - 4 - LLAMA3_LAYOUT.codebooks * LLAMA3_LAYOUT.codebook_size
    if text < 2:
        raise UserError(
            f"model.vocab_size {vocab_size}: must be 0 (SODA's 144,644) or > 16,389 (audio ids + delimiters)"
        )
    return SodaLayout(text_vocab_size=text, bos_id=0, eos_id=1)


# --- the suite: variants side by side -----------------------------------------------------------


@dataclass
class TrainBenchConfig:
    config: str | None = field(default=None, metadata={"help": "preset YAML (configs/soda-135m.yaml ...)"})
    nproc: int = field(default=1, metadata={"help": "ranks for our variants (TP x PP x DP); baselines use one"})
    device: Device = field(default="auto", metadata={"help": "where every variant runs"})
    steps: int = field(default=10, metadata={"help": "measured steps (median reported)"})
    warmup: int = field(default=3, metadata={"help": "steps run before measuring"})
    variants: list[str] = field(
        default_factory=lambda: ["ours", "ours-nokernels", "hf"],
        metadata={
            "help": "comma list of ours, ours-nokernels, ours-off (speed levers off), ours-off+<lever>[+<lever>] "
            f"(levers: {', '.join(LEVER_NAMES)}), any of those with opt-in extras {EXTRAS_HELP}, hf, "
            "hf-compile (transformers + torch.compile)"
        },
    )
    real_data: bool = field(
        default=False,
        metadata={
            "help": "ours variants train on the first warm-up + steps global batches of the config's data.paths "
            "(each step its own, as a real run) instead of the same synthetic batches every step; for loss "
            "curves on real data (transformers baselines are refused with it)"
        },
    )
    baseline_micro_batch: int = field(
        default=0,
        metadata={
            "help": "micro-batch of the transformers baselines (same global batch; default: ours'), for when "
            "theirs does not fit at ours' size"
        },
    )
    results: str = field(default="bench/results/train.jsonl", metadata={"help": "JSON lines, appended"})
    plot: str = field(default="bench/results/train.png", metadata={"help": "bar chart of the results file"})
    label: str = field(default="", metadata={"help": "name of this configuration in the table and plot"})
    profile: str | None = field(
        default=None, metadata={"help": "write torch.profiler traces + top operators per variant here"}
    )


def bench_job(cfg: TrainBenchConfig, overrides: dict) -> list[dict]:
    """`soda bench train`: training tokens/s, TFLOP/s, MFU, step split and peak memory; ours vs
    transformers, the kernels off and the speed levers off or one at a time. --section.key flags
    override the preset, as in `soda train`."""
    if not cfg.variants:
        raise UserError("--variants: none given")
    if cfg.real_data and any(not v.startswith("ours") for v in cfg.variants):
        raise UserError("--real-data: the transformers baselines feed synthetic batches; give only variants of ours")
    for v in cfg.variants:
        try:
            check_variant(v)
        except UserError as e:
            raise UserError(f"--variants: {e}") from None
    return run_suite(cfg, overrides, command="soda bench train " + " ".join(sys.argv[3:]))


def run_suite(cfg: TrainBenchConfig, overrides: dict, command: str = "") -> list[dict]:
    """Run each variant in its own process, append each row to `results` (JSON lines) as soon as it
    exists, then print the table with ours/baseline ratios and draw the comparison PNG."""
    import subprocess
    import tempfile

    from megatron_soda.config import data_parallel_size, load_config, validate
    from megatron_soda.parallel import processes

    variants, nproc = cfg.variants, cfg.nproc
    results, plot_path = cfg.results, cfg.plot or None
    run_cfg = load_config(cfg.config, overrides)  # fail here, with the user's flags, before any process starts
    run_cfg.train.device = cfg.device
    if any(v.startswith("ours") for v in variants):
        validate(run_cfg, nproc, need_data=cfg.real_data)
    if not cfg.real_data:  # with real data the shards' layout is the model's
        bench_layout(run_cfg.model.vocab_size)
    dp = data_parallel_size(run_cfg.parallel, nproc)
    rows: list[dict] = []
    failed: dict[str, str] = {}  # one variant out of memory must not cost the others' numbers
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            out = Path(tmp) / f"{v}.json"
            values = run_cfg.to_dict()
            if v.startswith("hf") and cfg.baseline_micro_batch:
                values["train"]["micro_batch_size"] = cfg.baseline_micro_batch
            spec = {
                "variant": v,
                "config": values,
                "steps": cfg.steps,
                "warmup": cfg.warmup,
                "profile": str(Path(cfg.profile) / v) if cfg.profile else None,
                "dp": dp,
                "real_data": cfg.real_data,
                "out": str(out),
            }
            spec_file = Path(tmp) / f"{v}.spec.json"
            spec_file.write_text(json.dumps(spec))
            module, args = "megatron_soda.tools.bench.train_step", [str(spec_file)]
            ranks = nproc if v.startswith("ours") else 1
            cmd = processes.torchrun(ranks, module, args) if ranks > 1 else processes.python_module(module, args)
            proc = subprocess.run(cmd, env=processes.rank_env(ranks), capture_output=True, text=True)
            if proc.returncode != 0 or not out.is_file():
                if "OutOfMemoryError" in proc.stderr:
                    failed[v] = "out of GPU memory"
                else:
                    err = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
                    failed[v] = f"exit {proc.returncode}: " + " | ".join((err or proc.stderr.splitlines())[-3:])
                print(f"soda bench: variant {v} failed ({failed[v]}); the others go on", file=sys.stderr)
                continue
            row = json.loads(out.read_text())
            row["label"] = (
                cfg.label
                or f"{row['preset']} tp{row['tp']}pp{row['pp']}"
                + (f"cp{row['cp']}" if row.get("cp", 1) > 1 else "")
                + f"dp{row['dp']} mb{row['micro_batch']} s{row['seq_len']}"
            )
            row["command"] = command
            ours = next((r for r in rows if r["variant"] == "ours"), None)
            if ours is not None:  # list ours first to have the ratio in every later row
                row["ours_over_this"] = ours["tokens_per_s_per_gpu"] / row["tokens_per_s_per_gpu"]
            rows.append(row)
            Path(results).parent.mkdir(parents=True, exist_ok=True)
            with open(results, "a") as f:  # now: a later variant that hangs past a time limit keeps this one
                f.write(json.dumps(row) + "\n")
            print(f"{v}: {row['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU (appended to {results})", flush=True)
    failures = "; ".join(f"bench variant {v} failed ({why})" for v, why in failed.items())
    if not rows:
        raise UserError(failures)
    ours = next((r for r in rows if r["variant"] == "ours"), None)
    for r in rows:
        if ours is not None and r is not ours:
            r["ours_over_this"] = ours["tokens_per_s_per_gpu"] / r["tokens_per_s_per_gpu"]
    print(format_table(rows))
    if plot_path:
        from megatron_soda.tools.plots import plot_bench

        print(f"plot: {plot_bench(read_results(results), plot_path)}")
    if failures:
        raise UserError(failures)
    return rows


def read_results(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def loss_gap(a: dict, b: dict) -> float | None:
    """Largest per-step loss difference of two variants of ours (same seed, data and steps), or None."""
    if not (a["variant"].startswith("ours") and b["variant"].startswith("ours")):
        return None
    la, lb = a.get("losses") or [], b.get("losses") or []
    if not la or len(la) != len(lb):
        return None
    return max(abs(x - y) for x, y in zip(la, lb, strict=True))


def format_table(rows: list[dict]) -> str:
    cols = ["tok/s/GPU", "TFLOP/s/GPU", "MFU", "MFU cau", "step s", "fwd", "bwd", "sync", "opt", "peak GB", "ours/this"]
    widths = [12, 11, 6, 7, 8, 7, 7, 7, 7, 8, 9]
    head = f"{'variant':<22} " + " ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True))
    lines = [f"{rows[0]['label']}: {rows[0]['device']}, {rows[0]['dtype']}", head, "-" * len(head)]
    for r in rows:
        split = [r["split_s"].get(k) for k in ("forward", "backward", "grad_sync", "optimizer")]
        cells = [
            f"{r['tokens_per_s_per_gpu']:,.0f}",
            f"{r['tflops_per_gpu']:.3f}",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
            f"{100 * r['mfu_causal']:.1f}%" if r.get("mfu_causal") is not None else "n/a",
            f"{r['step_time_s']:.3f}",
            *(f"{x:.3f}" if x is not None else "-" for x in split),
            f"{r['peak_memory_gb']:.2f}",
            f"{r['ours_over_this']:.2f}x" if "ours_over_this" in r else "",
        ]
        lines.append(f"{r['variant']:<22} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    lines += [f"  {r['variant']}: {r['impl']}" for r in rows]
    base = next((r for r in rows if r["variant"] == "ours-off"), None)
    for r in rows:
        gap = loss_gap(r, base) if base is not None and r is not base else None
        if gap is not None:
            lines.append(f"  {r['variant']}: max |loss - ours-off loss| over {len(r['losses'])} steps = {gap:.2e}")
    lines.append(
        "MFU: attention over the full score matrix (the paper's); MFU cau: the causal half the kernels compute"
    )
    for r in rows:
        if len(r.get("peak_memory_gb_per_rank", [])) > 1:
            lines.append(
                f"  {r['variant']}: peak GB per rank " + ", ".join(f"{x:.2f}" for x in r["peak_memory_gb_per_rank"])
            )
    if rows[0]["mfu"] is None:
        lines.append("MFU n/a: no peak FLOP/s known for this device (pass --train.peak_tflops)")
    return "\n".join(lines)
