"""`soda bench generate`: tokens/s of `soda generate`'s sampling loop at batch 1 and 64.

What is timed is `megatron_soda.generate.sample_tokens`, the loop `soda generate` and `soda eval`
run: transformers' Qwen3 with its KV cache, SDPA attention, the layout constraint on every step and
the authors' speech sampling (temperature 0.9, top-p 0.8). Each sequence continues an audio prompt
of `--prompt-tokens` (seeded random codes in whole frames: the compute does not depend on what they
say) by exactly `--new-tokens` (no early stop), so every row measures the same work. The model is an
exported folder (`--model`) or, from a preset (`--config configs/soda-600m.yaml`), a random-weight
model of that shape built in memory: speed depends on the shape, not on the weights.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from typing import Literal

from megatron_soda.config import UserError, opt


@dataclass
class GenerateBenchConfig:
    model: str = opt("", "an HF folder (`soda export-hf`'s) to time")
    config: str = opt("", "or a preset YAML: a random-weight model of its shape, built in memory")
    batch: list[int] = opt([1, 64], "sequences generated together, one row each")
    new_tokens: int = opt(256, "tokens generated per sequence (exactly: no early stop)")
    prompt_tokens: int = opt(256, "prompt length per sequence (BOS, <|audio_start|>, whole frames of audio)")
    reps: int = opt(3, "timed repetitions per batch size (the median is reported), after one warm-up")
    device: str = opt("auto", "auto (cuda when a GPU exists) | cpu | cuda[:N]")
    dtype: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"help": "auto: bf16 on cuda, fp32 on cpu (as soda generate)"}
    )
    seed: int = opt(0, "of the prompts, the random weights and the sampling")
    json: str = opt("", "append the rows here as JSON lines")


def build_model(cfg: GenerateBenchConfig, device: str, dtype: str):
    """(model, layout, name) of `--model` or of `--config`'s shape (random weights, seeded)."""
    import torch

    if cfg.model:
        from megatron_soda.generate import load_model

        loaded = load_model(cfg.model, device, dtype=dtype)
        return loaded.model, loaded.layout, cfg.model
    from transformers import Qwen3ForCausalLM

    from megatron_soda.checkpoints_tools.qwen3_mapping import hf_config
    from megatron_soda.config import load_config
    from megatron_soda.tools.bench.train import bench_layout

    m = load_config(cfg.config).model
    layout = bench_layout(m.vocab_size)
    m.vocab_size = layout.vocab_size
    hc = hf_config(m, layout.bos_id, layout.eos_id)
    hc._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # initialised where it runs: a 4B model never lands in host memory first
        model = Qwen3ForCausalLM(hc)
    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    return model, layout, m.name


def audio_prompts(layout, batch: int, tokens: int, seed: int) -> list[list[int]]:
    """`batch` prompts of BOS, <|audio_start|> and seeded random frames, `tokens` long at most."""
    import numpy as np

    frames = max(1, (tokens - 2) // layout.codebooks)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, layout.codebook_size, (batch, frames, layout.codebooks))
    return [[layout.bos_id, layout.audio_start, *map(int, layout.codes_to_ids(c))] for c in codes]


def _timed(model, layout, prompts: list[list[int]], s, max_frames: int, device: str, n: int) -> float:
    """Wall seconds of sampling exactly `n` tokens after each prompt."""
    import torch

    from megatron_soda.generate import sample_tokens

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sample_tokens(model, layout, prompts, "continue", s, max_frames, n, min_new=n)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_job(cfg: GenerateBenchConfig) -> list[dict]:
    """`soda bench generate`: tokens/s of soda generate's sampling at each `--batch`."""
    if bool(cfg.model) == bool(cfg.config):
        raise UserError("give one of --model (an HF folder) or --config (a preset YAML)")
    if cfg.new_tokens < 1 or cfg.prompt_tokens < 3 or cfg.reps < 1 or not cfg.batch or min(cfg.batch) < 1:
        raise UserError("--new-tokens, --reps and each --batch must be >= 1, --prompt-tokens >= 3")
    import torch

    from megatron_soda.generate import SamplingConfig, model_dtype
    from megatron_soda.tools.bench.train_step import _device_name, _versions

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = model_dtype(cfg.dtype, device)
    model, layout, name = build_model(cfg, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    s = SamplingConfig(temperature=0.9, top_p=0.8, seed=cfg.seed)
    rows = []
    for b in cfg.batch:
        prompts = audio_prompts(layout, b, cfg.prompt_tokens, cfg.seed)
        # the constraint never closes the audio segment early: its frame limit lies past the end
        max_frames = (len(prompts[0]) + cfg.new_tokens) // layout.codebooks + 2

        timed = partial(_timed, model, layout, prompts, s, max_frames, device)
        timed(min(cfg.new_tokens, 8))  # warm-up: kernels, the allocator, cuBLAS's choices
        seconds = statistics.median(timed(cfg.new_tokens) for _ in range(cfg.reps))
        row = {
            "bench": "generate",
            "model": name,
            "parameters": params,
            "device": _device_name("cuda" if device.startswith("cuda") else "cpu"),
            "dtype": dtype,
            "attention": "sdpa",
            "batch": b,
            "prompt_tokens": len(prompts[0]),
            "new_tokens": cfg.new_tokens,
            "reps": cfg.reps,
            "seconds": seconds,
            "tokens_per_s": b * cfg.new_tokens / seconds,
            "tokens_per_s_per_sequence": cfg.new_tokens / seconds,
            "ms_per_step": 1000 * seconds / cfg.new_tokens,
            "date": date.today().isoformat(),
            "versions": _versions(),
        }
        rows.append(row)
        print(
            f"{name} {dtype} batch {b:>3}: {row['tokens_per_s']:10,.1f} tokens/s "
            f"({row['ms_per_step']:.1f} ms per step, {len(prompts[0])} prompt + {cfg.new_tokens} new tokens)",
            flush=True,
        )
    if cfg.json:
        with open(cfg.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows
