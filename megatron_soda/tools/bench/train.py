"""`soda bench train`: training throughput, MFU and memory of one preset + layout, with baselines.

Every variant runs in its own process (torchrun for a multi-rank layout), so peak memory and
compile caches of one never leak into the next, and each sees the same synthetic micro-batches
(random ids of the model's vocabulary, held in memory: the loader is benchmarked on its own by
`soda bench loader`). Variants:

- `ours`: the real training step (megatron-core schedule, DDP, optimizer), every speed switch as
  configured (`auto` = the fast path on GPU: megatron_soda/fast_paths.py);
- `ours-nokernels`: the same with torch's embedding and output layer + cross-entropy;
- `ours-off`: the speed levers (CUDA graphs, weight-gradient fusion, Triton RMSNorm and RoPE, fused
  AdamW) all off, the embedding/output kernels as configured; `ours-off+graphs`, `ours-off+wgrad`,
  ... turn one lever (or several, joined by +) back on: the ablation;
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

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import torch

from megatron_soda.config import UserError
from megatron_soda.model.flops import flops_per_token, mfu, peak_tflops
from megatron_soda.parallel.setup import peak_memory_gb, reset_peak_memory, synchronize

VARIANTS = ("ours", "ours-nokernels", "ours-off", "hf", "hf-compile")
# lever name in a variant -> the config switch it turns on (off: the switch's torch choice)
LEVER_NAMES = {"graphs": "cuda_graph", "wgrad": "wgrad", "norm": "norm", "rope": "rope", "adam": "adam"}


def check_variant(v: str) -> None:
    """`ours-off+graphs+adam` style names are valid too; raises ValueError naming the unknown part."""
    base, *levers = v.split("+")
    if base not in VARIANTS or (levers and base != "ours-off"):
        raise ValueError(f"unknown variant {v!r}: {', '.join(VARIANTS)}, or ours-off+<lever>[+<lever>...]")
    bad = [x for x in levers if x not in LEVER_NAMES]
    if bad:
        raise ValueError(f"variant {v!r}: unknown lever {bad[0]!r} (levers: {', '.join(LEVER_NAMES)})")


def variant_overrides(v: str) -> dict:
    """The config overrides a variant of ours stands for."""
    from megatron_soda.config import IMPL_CHOICES

    base, *levers = v.split("+")
    out: dict = {}
    if base == "ours-nokernels":
        out = {"model": {"embedding_impl": "torch", "output_impl": "torch"}}
    if base == "ours-off":
        on = {LEVER_NAMES[x] for x in levers}
        for name in LEVER_NAMES.values():
            section, key, (fast, slow) = IMPL_CHOICES[name]
            out.setdefault(section, {})[key] = fast if name in on else slow
    return out


def bench_layout(vocab_size: int):
    """A token layout matching `vocab_size` (the loss breakdown needs one); 0 = the SODA layout."""
    from megatron_soda.tokenization.vocab import LLAMA3_LAYOUT, SodaLayout

    if vocab_size in (0, LLAMA3_LAYOUT.vocab_size):
        return LLAMA3_LAYOUT
    text = vocab_size - 4 - LLAMA3_LAYOUT.codebooks * LLAMA3_LAYOUT.codebook_size
    if text < 2:
        raise ValueError(
            f"model.vocab_size {vocab_size}: must be 0 (SODA's 144,644) or > 16,389 (audio ids + delimiters)"
        )
    return SodaLayout(text_vocab_size=text, bos_id=0, eos_id=1)


def synthetic_micro_batches(vocab: int, micro: int, seq: int, n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro, seq + 1), generator=g)
        out.append(
            {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "loss_mask": torch.ones(micro, seq)}
        )
    return out


def _versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("megatron-core", "transformers", "triton", "transformer-engine", "flash-attn"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return v


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _summary(
    cfg,
    variant: str,
    impl: str,
    device: str,
    world: int,
    dp: int,
    times: dict[str, list[float]],
    losses: list[float],
    peak,
) -> dict:
    t, p = cfg.train, cfg.parallel
    step = statistics.median(times["step"])
    tokens_per_s = t.global_batch_size * t.seq_length / step
    per_gpu = tokens_per_s / world
    ftok = flops_per_token(cfg.model, t.seq_length)
    return {
        "variant": variant,
        "preset": cfg.model.name,
        "device": _device_name(device),
        "world": world,
        "tp": p.tp if variant.startswith("ours") else 1,
        "pp": p.pp if variant.startswith("ours") else 1,
        "dp": dp,
        "vpp": p.vpp if variant.startswith("ours") else 1,
        "sp": bool(p.sequence_parallel) if variant.startswith("ours") else False,
        "recompute": p.recompute if variant.startswith("ours") else "none",
        "micro_batch": t.micro_batch_size,
        "global_batch": t.global_batch_size,
        "seq_len": t.seq_length,
        "dtype": "bf16" if device == "cuda" else "fp32",
        "impl": impl,
        "steps": len(times["step"]),
        "step_time_s": step,
        "split_s": {k: statistics.median(v) for k, v in times.items() if k != "step" and v},
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": per_gpu,
        "tflops_per_gpu": ftok * per_gpu / 1e12,
        "flops_per_token": ftok,
        "peak_tflops": peak,
        "mfu": mfu(ftok, per_gpu, peak),
        "peak_memory_gb": peak_memory_gb(device),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": losses,  # every step's, warm-up included: variants started alike compare step by step
        "date": date.today().isoformat(),
        "versions": _versions(),
    }


def _measure(step, warmup: int, steps: int, device: str, profile_dir: str | None, rank: int):
    """Call `step() -> (loss, {part: seconds})` warmup + steps times; returns the parts of the measured
    steps (memory peak and the profiler start after warm-up) and every step's loss."""
    times: dict[str, list[float]] = {}
    losses = []
    prof = _profiler(profile_dir, device) if profile_dir else None
    for i in range(warmup + steps):
        if i == warmup:
            reset_peak_memory(device)
            if prof:
                prof.start()
        loss, parts = step()
        losses.append(loss)
        if i >= warmup:
            for k, v in parts.items():
                times.setdefault(k, []).append(v)
        if prof:
            prof.step()
    if prof:
        prof.stop()
        _report_profile(prof, profile_dir, rank)
    return times, losses


# --- ours ----------------------------------------------------------------------------------------


def bench_ours(cfg, steps: int, warmup: int, variant: str, profile_dir: str | None) -> dict | None:
    """Time the Trainer's own training step; call inside an initialized process group. Row on rank 0."""
    import dataclasses

    import torch.distributed as dist

    from megatron_soda.config import config_from_dict
    from megatron_soda.model.fast_paths import resolve_fast_paths
    from megatron_soda.parallel.setup import resolve_device, setup_parallel
    from megatron_soda.training.trainer import Trainer

    device = resolve_device(cfg.train.device)
    values = cfg.to_dict()
    for section, kv in variant_overrides(variant).items():
        values[section].update(kv)
    cfg = config_from_dict(values)
    fp = resolve_fast_paths(cfg, device == "cuda")
    graphs = fp.cuda_graph != "none"
    dp = setup_parallel(cfg, need_data=False, graph_safe_rng=graphs)
    layout = bench_layout(cfg.model.vocab_size)
    cfg.model.vocab_size = layout.vocab_size
    trainer = Trainer(cfg, device, fp, layout, dp)
    t = cfg.train
    micro = synthetic_micro_batches(
        layout.vocab_size, t.micro_batch_size, t.seq_length, trainer.num_micro, seed=dist.get_rank()
    )
    sync_time = [0.0]
    finalize = trainer.config.finalize_model_grads_func

    def timed_finalize(*args, **kwargs):
        synchronize(device)
        t0 = time.perf_counter()
        out = finalize(*args, **kwargs)
        synchronize(device)
        sync_time[0] += time.perf_counter() - t0
        return out

    if not graphs:  # inside a CUDA graph nothing may synchronise: the grad sync is then part of backward
        trainer.config.finalize_model_grads_func = timed_finalize

    def step():
        sync_time[0] = 0.0
        row = trainer.train_step(micro)
        # backward still holds the forward: it is subtracted below
        return row["loss"], {
            "step": row["step_s"],
            "optimizer": row["optimizer_s"],
            "grad_sync": sync_time[0],
            "backward": row["fwd_bwd_s"] - sync_time[0],
        }

    times, losses = _measure(step, warmup, steps, device, profile_dir, dist.get_rank())
    times["forward"] = []
    for _ in range(max(1, min(steps, 5))):
        synchronize(device)
        t0 = time.perf_counter()
        trainer.forward_only(micro)
        synchronize(device)
        times["forward"].append(time.perf_counter() - t0)
    f = statistics.median(times["forward"])
    times["backward"] = [max(0.0, b - f) for b in times["backward"]]
    row = _summary(
        cfg, variant, fp.describe(), device, dist.get_world_size(), dp, times, losses, peak_tflops(t.peak_tflops)
    )
    row["fast_paths"] = dataclasses.asdict(fp)
    # every rank's peak matters (PP stages differ): report the largest
    peak = torch.tensor([row["peak_memory_gb"]], dtype=torch.float64, device=device if device == "cuda" else "cpu")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    row["peak_memory_gb"] = peak.item()
    return row if dist.get_rank() == 0 else None


# --- transformers baseline ----------------------------------------------------------------------


def bench_hf(cfg, steps: int, warmup: int, compile_model: bool, profile_dir: str | None) -> dict:
    """transformers' Qwen3ForCausalLM, same shapes, as a user would train it on one GPU."""
    from transformers import Qwen3ForCausalLM

    from megatron_soda.checkpoints_tools.qwen3_mapping import hf_config
    from megatron_soda.parallel.setup import resolve_device

    device = resolve_device(cfg.train.device)
    cuda = device == "cuda"
    layout = bench_layout(cfg.model.vocab_size)
    cfg.model.vocab_size = layout.vocab_size
    t, o = cfg.train, cfg.optim
    dp = max(1, int(os.environ.get("SODA_BENCH_DP", "1")))  # per-GPU share of ours' global batch
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    torch.manual_seed(t.seed)
    hc = hf_config(cfg.model, None, None)
    hc._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(hc).to(device)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, fused=cuda
    )
    run = torch.compile(model) if compile_model else model
    micro = [
        {k: v.to(device) for k, v in b.items()}
        for b in synthetic_micro_batches(layout.vocab_size, t.micro_batch_size, t.seq_length, num_micro)
    ]
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        opt.zero_grad(set_to_none=True)
        fw = bw = total = 0.0
        synchronize(device)
        t0 = time.perf_counter()
        for b in micro:
            a = time.perf_counter()
            with amp:
                logits = run(input_ids=b["tokens"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten())
            synchronize(device)
            m = time.perf_counter()
            (loss / num_micro).backward()
            synchronize(device)
            fw, bw = fw + m - a, bw + time.perf_counter() - m
            total += loss.item() / num_micro
        t1 = time.perf_counter()
        if o.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        synchronize(device)
        t2 = time.perf_counter()
        return total, {"step": t2 - t0, "forward": fw, "backward": bw, "optimizer": t2 - t1}

    times, losses = _measure(step, warmup, steps, device, profile_dir, 0)
    impl = "transformers Qwen3ForCausalLM, sdpa" + (", torch.compile" if compile_model else "")
    variant = "hf-compile" if compile_model else "hf"
    return _summary(cfg, variant, impl, device, 1, 1, times, losses, peak_tflops(t.peak_tflops))


# --- profiling -----------------------------------------------------------------------------------


def _profiler(out_dir: str, device: str):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    return profile(activities=acts, record_shapes=False)


def _report_profile(prof, out_dir: str, rank: int) -> None:
    """A Chrome trace per rank plus the top operators by device (or CPU) time, printed on rank 0."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    trace = Path(out_dir) / f"trace_rank{rank}.json"
    prof.export_chrome_trace(str(trace))
    if rank == 0:
        key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=20)
        (Path(out_dir) / "top_ops.txt").write_text(table)
        print(table, file=sys.stderr)
        print(f"profile: {trace} (open in chrome://tracing or ui.perfetto.dev)", file=sys.stderr)


# --- one variant per process ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry of one variant's process (`python -m megatron_soda.tools.bench.train`, torchrun for ours)."""
    import logging
    import warnings

    from megatron_soda.config import ConfigError, load_config, validate
    from megatron_soda.parallel.setup import init_distributed, resolve_device, teardown

    ap = argparse.ArgumentParser(prog="soda bench train (one variant)")
    ap.add_argument("--variant", required=True)
    ap.add_argument("--config")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile")
    ap.add_argument("--out", required=True, help="the row is written here as JSON")
    a, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", module=r"megatron\.core.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        cfg = load_config(a.config, rest)
        cfg.train.device = a.device
        device = resolve_device(cfg.train.device)
        check_variant(a.variant)
        if a.variant.startswith("ours"):
            validate(cfg, int(os.environ.get("WORLD_SIZE", "1")), need_data=False)
        bench_layout(cfg.model.vocab_size)
    except (ConfigError, ValueError) as e:
        print(f"soda bench train: error: {e}", file=sys.stderr)
        return 2
    if a.variant.startswith("hf"):
        row = bench_hf(cfg, a.steps, a.warmup, a.variant == "hf-compile", a.profile)
    else:
        init_distributed(device)
        try:
            row = bench_ours(cfg, a.steps, a.warmup, a.variant, a.profile)
        except ConfigError as e:
            print(f"soda bench train: error: {e}", file=sys.stderr)
            return 2
        finally:
            teardown()
    if row is not None:
        Path(a.out).write_text(json.dumps(row))
    return 0


# --- the suite: variants side by side -----------------------------------------------------------


@dataclass
class TrainBenchConfig:
    config: str | None = field(default=None, metadata={"help": "preset YAML (configs/soda-135m.yaml ...)"})
    nproc: int = field(default=1, metadata={"help": "ranks for our variants (TP x PP x DP); baselines use one"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cuda", "cpu"]})
    steps: int = field(default=10, metadata={"help": "measured steps (median reported)"})
    warmup: int = field(default=3, metadata={"help": "steps run before measuring"})
    variants: list[str] = field(
        default_factory=lambda: ["ours", "ours-nokernels", "hf"],
        metadata={
            "help": "comma list of ours, ours-nokernels, ours-off (speed levers off), ours-off+<lever>[+<lever>] "
            "(levers: graphs, wgrad, norm, rope, adam), hf, hf-compile (transformers + torch.compile)"
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


def bench_job(cfg: TrainBenchConfig, overrides: list[str]) -> list[dict]:
    """`soda bench train`: training tokens/s, TFLOP/s, MFU, step split and peak memory; ours vs
    transformers, the kernels off and the speed levers off or one at a time. Extra --section.key
    value flags override the preset, as in `soda train`."""
    if not cfg.variants:
        raise ValueError("--variants: none given")
    for v in cfg.variants:
        try:
            check_variant(v)
        except ValueError as e:
            raise ValueError(f"--variants: {e}") from None
    return run_suite(cfg, overrides, command="soda bench train " + " ".join(sys.argv[3:]))


def run_suite(cfg: TrainBenchConfig, overrides: list[str], command: str = "") -> list[dict]:
    """Run each variant in its own process, append each row to `results` (JSON lines) as soon as it
    exists, then print the table with ours/baseline ratios and draw the comparison PNG."""
    import subprocess
    import tempfile

    from megatron_soda.config import load_config

    config, variants, nproc, device = cfg.config, cfg.variants, cfg.nproc, cfg.device
    steps, warmup, results, plot_path = cfg.steps, cfg.warmup, cfg.results, cfg.plot or None
    label, profile, baseline_micro_batch = cfg.label, cfg.profile, cfg.baseline_micro_batch

    cfg = load_config(config, overrides)  # fail here, with the user's flags, before any process starts
    dp = max(1, nproc // (cfg.parallel.tp * cfg.parallel.pp))
    rows: list[dict] = []
    failed: dict[str, str] = {}  # one variant out of memory must not cost the others' numbers
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            out = Path(tmp) / f"{v}.json"
            args = [
                "--variant",
                v,
                "--device",
                device,
                "--steps",
                str(steps),
                "--warmup",
                str(warmup),
                "--out",
                str(out),
            ]
            args += ["--config", config] if config else []
            args += ["--profile", str(Path(profile) / v)] if profile else []
            env = dict(os.environ, SODA_BENCH_DP=str(dp))
            if v.startswith("ours") and nproc > 1:
                env.setdefault("OMP_NUM_THREADS", "1")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
            else:
                cmd = [sys.executable]
            extra = []
            if v.startswith("hf") and baseline_micro_batch:
                extra = ["--train.micro_batch_size", str(baseline_micro_batch)]
            proc = subprocess.run(
                [*cmd, "-m", "megatron_soda.tools.bench.train", *args, *overrides, *extra],
                env=env,
                capture_output=True,
                text=True,
            )
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
                label
                or f"{row['preset']} tp{row['tp']}pp{row['pp']}dp{row['dp']} mb{row['micro_batch']} s{row['seq_len']}"
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
    cols = ["tok/s/GPU", "TFLOP/s/GPU", "MFU", "step s", "fwd", "bwd", "sync", "opt", "peak GB", "ours/this"]
    widths = [12, 11, 6, 8, 7, 7, 7, 7, 8, 9]
    head = f"{'variant':<22} " + " ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True))
    lines = [f"{rows[0]['label']}: {rows[0]['device']}, {rows[0]['dtype']}", head, "-" * len(head)]
    for r in rows:
        split = [r["split_s"].get(k) for k in ("forward", "backward", "grad_sync", "optimizer")]
        cells = [
            f"{r['tokens_per_s_per_gpu']:,.0f}",
            f"{r['tflops_per_gpu']:.3f}",
            f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
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
    if rows[0]["mfu"] is None:
        lines.append("MFU n/a: no peak FLOP/s known for this device (pass --train.peak_tflops)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
