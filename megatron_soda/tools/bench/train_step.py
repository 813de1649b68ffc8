"""One variant of `soda bench train` in its own process (ours under torchrun for a multi-rank layout):
`python -m megatron_soda.tools.bench.train_step SPEC.json`, the spec written by `run_suite`
(tools/bench/train.py, which says what the variants and the step split are)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from megatron_soda.model.flops import flops_per_token, mfu, peak_tflops
from megatron_soda.parallel.setup import peak_memory_gb, reset_peak_memory, synchronize
from megatron_soda.tools.bench.train import bench_layout, variant_overrides


def synthetic_micro_batches(vocab: int, micro: int, seq: int, n: int, seed: int = 0) -> list[dict]:
    """`n` micro-batches of random ids: one rank's share of a global batch, as the loader yields it."""
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


def sdpa_backend(cfg, device: str, dtype: torch.dtype) -> str:
    """Which of torch SDPA's kernels a layer's causal self-attention takes at this run's shape (micro
    batch, heads, this rank's sequence, head dim, GQA), on this device and dtype: at head dim 64 the
    135M preset may fall off flash attention, which a row should say. torch's own dispatcher is
    asked (a private function: "unknown" where it is missing or refuses)."""
    from torch.nn.attention import SDPBackend

    m, t = cfg.model, cfg.train
    heads = m.num_attention_heads // cfg.parallel.tp
    groups = max(1, m.num_query_groups // cfg.parallel.tp)
    seq = t.seq_length // cfg.parallel.cp
    q = torch.empty(t.micro_batch_size, heads, seq, m.head_dim, dtype=dtype, device=device)
    kv = torch.empty(t.micro_batch_size, groups, seq, m.head_dim, dtype=dtype, device=device)
    try:
        choice = torch._fused_sdp_choice(q, kv, kv, None, 0.0, True, enable_gqa=heads != groups)
        return SDPBackend(choice).name.lower()
    except Exception:  # noqa: BLE001 - a record, never a reason for a bench to fail
        return "unknown"


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
    ftok_causal = flops_per_token(cfg.model, t.seq_length, causal=True)
    return {
        "variant": variant,
        "preset": cfg.model.name,
        "device": _device_name(device),
        "world": world,
        "tp": p.tp if variant.startswith("ours") else 1,
        "pp": p.pp if variant.startswith("ours") else 1,
        "cp": p.cp if variant.startswith("ours") else 1,
        "dp": dp,
        "vpp": p.vpp if variant.startswith("ours") else 1,
        "sp": bool(p.sequence_parallel) if variant.startswith("ours") else False,
        "recompute": p.recompute if variant.startswith("ours") else "none",
        "micro_batch": t.micro_batch_size,
        "global_batch": t.global_batch_size,
        "seq_len": t.seq_length,
        "vocab": cfg.model.vocab_size,  # resolved (0 in a preset: the shards' or the bench layout's)
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
        "mfu": mfu(ftok, per_gpu, peak),  # the paper's convention: attention over the full score matrix
        "flops_per_token_causal": ftok_causal,
        "mfu_causal": mfu(ftok_causal, per_gpu, peak),  # the attention FLOPs causal kernels compute
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


def real_global_batches(cfg, trainer, dataset, n: int) -> list[list[dict]]:
    """The first `n` global batches of this rank from the config's data (each step its own, as in a
    real run), held in memory so that loading is not timed."""
    from itertools import islice

    from megatron_soda.data.loader import SodaDataLoader

    t = cfg.train
    loader = SodaDataLoader(
        dataset, t.micro_batch_size, t.global_batch_size, trainer.dp_rank, trainer.dp, num_workers=0
    )
    return list(islice(iter(loader), n))


def bench_ours(
    cfg, steps: int, warmup: int, variant: str, profile_dir: str | None, real_data: bool = False
) -> dict | None:
    """Time the Trainer's own training step; call inside an initialized process group. Row on rank 0.
    `real_data`: the steps train on the config's data (batches loaded before timing), else on the
    same synthetic batches every step."""
    import dataclasses
    import itertools

    import torch.distributed as dist

    from megatron_soda.config import config_from_dict, num_micro_batches
    from megatron_soda.training.trainer import build_trainer

    values = cfg.to_dict()
    for section, kv in variant_overrides(variant).items():
        values[section].update(kv)
    cfg = config_from_dict(values)
    if real_data:
        from megatron_soda.training.loop import open_dataset

        dataset = open_dataset(cfg)
        layout = dataset.layout
    else:
        layout = bench_layout(cfg.model.vocab_size)
    cfg.model.vocab_size = layout.vocab_size
    trainer = build_trainer(cfg, layout, need_data=real_data)
    device, fp, dp = trainer.device, trainer.fast_paths, trainer.dp
    graphs = fp.cuda_graph != "none"
    t = cfg.train
    if real_data:
        batches = real_global_batches(cfg, trainer, dataset, warmup + steps)
    else:
        batches = [
            synthetic_micro_batches(
                layout.vocab_size,
                t.micro_batch_size,
                t.seq_length,
                num_micro_batches(t.global_batch_size, t.micro_batch_size, dp),
                seed=dist.get_rank(),
            )
        ]
    micro = batches[0]
    order = itertools.cycle(batches)
    trainer.time_grad_sync = not graphs  # inside a CUDA graph nothing may synchronise: the sync is then backward's

    def step():
        row = trainer.train_step(next(order))
        # backward still holds the forward: it is subtracted below
        sync = row.get("grad_sync_s", 0.0)
        return row["loss"], {
            "step": row["step_s"],
            "optimizer": row["optimizer_s"],
            "grad_sync": sync,
            "backward": row["fwd_bwd_s"] - sync,
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
    impl = fp.describe() + (f", fp8 {cfg.model.fp8}" if cfg.model.fp8 != "none" else "")
    impl += f", ce_filter_eps {cfg.model.ce_filter_eps:g}" if cfg.model.ce_filter_eps else ""
    row = _summary(cfg, variant, impl, device, dist.get_world_size(), dp, times, losses, peak_tflops(t.peak_tflops))
    row["fast_paths"] = dataclasses.asdict(fp)
    row["fp8"] = cfg.model.fp8  # MFU stays against the bf16 peak: comparable with every other row
    row["ce_filter_eps"] = cfg.model.ce_filter_eps  # > 0: an approximate gradient (compare the loss curves)
    row["data"] = "real: " + ",".join(cfg.data.paths) if real_data else "synthetic"
    row["layers"] = trainer.layer_path
    # the kernel SDPA picks at this shape (what runs unless flash-attn's or Transformer Engine's path is on)
    row["sdpa_backend"] = sdpa_backend(cfg, device, torch.bfloat16 if device == "cuda" else torch.float32)
    # every rank's peak matters (PP stages differ; CP divides the activations): each, and the largest
    mine = torch.tensor([row["peak_memory_gb"]], dtype=torch.float64, device=device if device == "cuda" else "cpu")
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    row["peak_memory_gb_per_rank"] = [float(x.item()) for x in every]
    row["peak_memory_gb"] = max(row["peak_memory_gb_per_rank"])
    return row if dist.get_rank() == 0 else None


# --- transformers baseline ----------------------------------------------------------------------


def bench_hf(cfg, steps: int, warmup: int, compile_model: bool, profile_dir: str | None, dp: int) -> dict:
    """transformers' Qwen3ForCausalLM, same shapes, as a user would train it on one GPU: one GPU's
    share (global batch / `dp`) of ours' global batch."""
    from transformers import Qwen3ForCausalLM

    from megatron_soda.checkpoints_tools.qwen3_mapping import hf_config
    from megatron_soda.config import num_micro_batches
    from megatron_soda.parallel.setup import resolve_device

    device = resolve_device(cfg.train.device)
    cuda = device == "cuda"
    layout = bench_layout(cfg.model.vocab_size)
    cfg.model.vocab_size = layout.vocab_size
    t, o = cfg.train, cfg.optim
    num_micro = num_micro_batches(t.global_batch_size, t.micro_batch_size, dp)
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


def run_variant(spec: dict) -> int:
    """One variant in this process (ours under torchrun for a multi-rank layout), from the spec file
    `run_suite` wrote: the resolved config, the variant, steps, where the row goes."""
    from megatron_soda.config import config_from_dict, data_parallel_size, validate
    from megatron_soda.parallel.setup import init_distributed, resolve_device, teardown

    cfg = config_from_dict(spec["config"])
    variant = spec["variant"]
    if variant.startswith("ours") and resolve_device(cfg.train.device) == "cpu":
        from megatron_soda.parallel.cpu_backend import import_megatron

        import_megatron()
    if variant.startswith("hf"):
        row = bench_hf(cfg, spec["steps"], spec["warmup"], variant == "hf-compile", spec["profile"], spec["dp"])
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        validate(cfg, world, need_data=spec.get("real_data", False))
        init_distributed(resolve_device(cfg.train.device))
        try:
            row = bench_ours(cfg, spec["steps"], spec["warmup"], variant, spec["profile"], spec.get("real_data", False))
        finally:
            teardown()
        assert data_parallel_size(cfg.parallel, world) == spec["dp"]
    if row is not None:
        Path(spec["out"]).write_text(json.dumps(row))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_soda.tools.bench.train_step SPEC.json`: one variant's process."""
    from megatron_soda.parallel.processes import spec_main

    return spec_main(run_variant, "soda bench train", argv)


if __name__ == "__main__":
    sys.exit(main())
