"""Step time from our own measurements: the `soda bench train` rows of a GPU type (docs/bench) give
the compute rate, the byte counts of comm.py over a table of link bandwidths give the communication,
and megatron-core's overlap rules (no Transformer Engine) say which part of it stays exposed.

Compute. A single-GPU row's forward + backward time per token, divided by the FLOPs the hardware
runs per token (`flops.flops_per_token(causal=True)`: every matmul, the LM head, causal attention),
is the seconds per FLOP of that model. Over the presets it falls with the width like a GEMM's
efficiency, and `a + b (1000 / hidden)` fits it (two numbers per GPU type, least squares over its
rows); the row of each preset is predicted from the other presets' within 5% (tests/test_plan.py).
Only rows of today's speed switches (`fast_paths` equal to what `auto` picks now) calibrate; a GPU
type without such rows borrows another's fit scaled by the step-time ratio of rows both GPUs ran
alike, and a GPU type without any row the peak-FLOP/s ratio (said in the output).
The optimizer step is seconds per parameter on the rank (its rows' `optimizer` split).

Everything multi-GPU (TP's narrower GEMMs at the rate of width h / TP, the pipeline bubble, the
communication) is the model's, unvalidated until a multi-GPU row exists.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.tools.plan.comm import Collective
from megatron_soda.tools.plan.layout import Layout, Run


@dataclass(frozen=True)
class GPU:
    key: str
    name: str  # what torch.cuda.get_device_name() contains (a row's `device`)
    peak_tflops: float  # dense bf16 (model/flops.py's table)
    memory_gib: float  # torch's total_memory
    intra_gbs: float  # GB/s per GPU inside a node (NVLink), what NCCL reaches on large messages
    inter_gbs: float  # GB/s per GPU between nodes (one NIC per GPU)
    latency_intra_s: float = 15e-6
    latency_inter_s: float = 30e-6


# Link bandwidths are the vendors' nominal figures derated to what NCCL's bus bandwidth typically
# reaches on large messages; they were not measured here: override them (--intra-node-gbs, --inter-node-gbs).
GPUS = {
    "h100-80gb": GPU("h100-80gb", "H100", 989.0, 79.2, 360.0, 45.0),
    "h200": GPU("h200", "H200", 989.0, 139.8, 360.0, 45.0),
    "a100-80gb": GPU("a100-80gb", "A100", 312.0, 79.2, 230.0, 22.0),
    "b200": GPU("b200", "B200", 2250.0, 178.4, 720.0, 45.0),
}
RESERVED_GIB = 1.0  # outside torch's allocator: CUDA context, NCCL buffers


@dataclass
class Calibration:
    """Seconds per hardware FLOP = a + b * 1000 / width, and optimizer seconds per parameter."""

    gpu: str
    a: float
    b: float
    optimizer_s_per_param: float
    rows: list[str] = field(default_factory=list)  # the rows it was fitted on (label: preset, run)
    source: str = ""  # how: fitted here, borrowed with a ratio, or scaled by peak FLOP/s

    def s_per_flop(self, width: float) -> float:
        return self.a + self.b * 1000.0 / width


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def read_rows(bench_dir: Path) -> list[dict]:
    """Every `soda bench train` row of docs/bench/train*.jsonl (GPU and CPU)."""
    rows = []
    for path in sorted(Path(bench_dir).glob("train*.jsonl")):
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                r = json.loads(line)
                r["_source"] = f"{path.name}:{i + 1}"
                rows.append(r)
    return rows


def row_config(row: dict, configs_dir: Path):
    """The run config a row measured: its preset with the row's batch, sequence and layout."""
    from megatron_soda.config import load_config

    path = Path(configs_dir) / f"{row['preset']}.yaml"
    if not path.is_file():
        return None
    return load_config(
        str(path),
        {
            "train": {
                "seq_length": row["seq_len"],
                "micro_batch_size": row["micro_batch"],
                "global_batch_size": row["global_batch"],
            },
            "parallel": {"tp": row["tp"], "pp": row["pp"], "vpp": row.get("vpp", 1), "recompute": row["recompute"]},
        },
    )


def row_fast_paths(row: dict):
    """The speed switches a row ran with: its `fast_paths`, else parsed from `impl` (older rows name
    only the embedding and output; the levers did not exist then, i.e. their torch references)."""
    from megatron_soda.model.fast_paths import FastPaths

    if row.get("fast_paths"):
        return FastPaths(**row["fast_paths"])
    named = dict(part.strip().split(" ", 1) for part in row["impl"].split(",") if " " in part.strip())
    return FastPaths(**{k: v for k, v in named.items() if k in FastPaths.__dataclass_fields__})


def is_ours(row: dict) -> bool:
    return row["variant"].startswith("ours")


def gpu_of(row: dict) -> str | None:
    return next((g.key for g in GPUS.values() if g.name in row["device"]), None)


def compute_s_per_token(row: dict) -> float:
    """A row's forward + backward seconds per token (the step minus its optimizer split)."""
    tokens = row["global_batch"] * row["seq_len"]
    return (row["step_time_s"] - row["split_s"].get("optimizer", 0.0)) / tokens


def hw_flops(m, seq: int) -> float:
    from megatron_soda.model.flops import flops_per_token

    return flops_per_token(m, seq, causal=True)


def calibration_rows(rows: list[dict], gpu: str, configs_dir: Path) -> list[tuple[dict, object]]:
    """The single-GPU rows of ours on `gpu` that ran today's `auto` speed switches."""
    import dataclasses

    from megatron_soda.model.fast_paths import resolve_fast_paths

    out = []
    for r in rows:
        if not is_ours(r) or gpu_of(r) != gpu or (r["tp"], r["pp"], r["dp"]) != (1, 1, 1) or r["recompute"] != "none":
            continue
        cfg = row_config(r, configs_dir)
        if cfg is None:
            continue
        if dataclasses.asdict(row_fast_paths(r)) != dataclasses.asdict(resolve_fast_paths(cfg, True)):
            continue
        out.append((r, cfg))
    return out


def fit(samples: list[tuple[dict, object]], gpu: str, exclude_preset: str | None = None) -> Calibration | None:
    """Least squares of seconds-per-FLOP = a + b * 1000 / width over the rows (one preset left out)."""
    import numpy as np

    from megatron_soda.model.flops import param_counts

    use = [(r, c) for r, c in samples if r["preset"] != exclude_preset]
    if not use:
        return None
    y = np.array([compute_s_per_token(r) / hw_flops(c.model, r["seq_len"]) for r, c in use])
    widths = {c.model.hidden_size for _, c in use}
    if len(widths) > 1:
        A = np.array([[1.0, 1000.0 / c.model.hidden_size] for _, c in use])
        (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    else:
        a, b = float(y.mean()), 0.0
    params = np.array([param_counts(c.model)["total"] for _, c in use], dtype=float)
    opt = np.array([r["split_s"].get("optimizer", 0.0) for r, _ in use])
    per_param = float((opt * params).sum() / (params * params).sum())
    return Calibration(
        gpu, float(a), float(b), per_param, [f"{r['preset']} ({r['_source']})" for r, _ in use], "fitted"
    )


def calibrate(gpu: str, rows: list[dict], configs_dir: Path) -> Calibration:
    """The calibration of `gpu`: fitted on its own rows, else borrowed (module docstring)."""
    own = fit(calibration_rows(rows, gpu, configs_dir), gpu)
    if own is not None:
        own.source = f"fitted on {len(own.rows)} {GPUS[gpu].name} rows"
        return own
    for other in GPUS:
        base = fit(calibration_rows(rows, other, configs_dir), other)
        if base is None:
            continue
        ratio, pairs = matched_ratio(rows, gpu, other)
        if ratio is None:
            ratio, how = GPUS[other].peak_tflops / GPUS[gpu].peak_tflops, "peak FLOP/s ratio (no common row)"
        else:
            how = f"step-time ratio {ratio:.2f} over {pairs} row pairs run alike on both"
        return Calibration(
            gpu,
            base.a * ratio,
            base.b * ratio,
            base.optimizer_s_per_param * ratio,
            base.rows,
            f"no {GPUS[gpu].name} row of today's speed switches: {GPUS[other].name} fit x {how}; unvalidated",
        )
    raise ValueError("no calibration row of any GPU type in the bench rows")


def matched_ratio(rows: list[dict], gpu: str, other: str) -> tuple[float | None, int]:
    """Mean of (compute time on `gpu`) / (on `other`) over rows of the same preset, variant, batch,
    sequence and speed switches measured on both."""

    def key(r):
        return (r["preset"], r["variant"], r["micro_batch"], r["global_batch"], r["seq_len"], r["impl"], r["recompute"])

    mine: dict = {}
    theirs: dict = {}
    for r in rows:
        if not is_ours(r) or (r["tp"], r["pp"], r["dp"]) != (1, 1, 1):
            continue
        target = mine if gpu_of(r) == gpu else theirs if gpu_of(r) == other else None
        if target is not None:
            target.setdefault(key(r), []).append(compute_s_per_token(r))
    ratios = [(sum(mine[k]) / len(mine[k])) / (sum(theirs[k]) / len(theirs[k])) for k in mine.keys() & theirs.keys()]
    if not ratios:
        return None, 0
    return sum(ratios) / len(ratios), len(ratios)


# --- one layout's step ---------------------------------------------------------------------------


def layer_flops(m, seq: int) -> tuple[float, float, float]:
    """Training FLOPs per token of (one layer's matmuls, one layer's causal attention, the LM head)."""
    d, hd = m.hidden_size, m.head_dim
    proj = d * hd * (m.num_attention_heads + 2 * m.num_query_groups) + m.num_attention_heads * hd * d
    dense = 6.0 * (proj + 3 * d * m.ffn_hidden_size)
    attn = 3.0 * 2 * 2 * ((seq + 1) / 2) * m.num_attention_heads * hd
    head = 6.0 * d * m.vocab_size
    return dense, attn, head


def group_ranks(lay: Layout, group: str) -> list[int]:
    """Rank 0's group members under megatron's rank order (tp fastest, then cp, dp, pp)."""
    tp, cp, dp, pp = lay.tp, lay.cp, lay.dp, lay.pp
    if group == "tp":
        return list(range(tp))
    if group == "cp":
        return [i * tp for i in range(cp)]
    if group == "dp_cp":
        return [i * tp for i in range(cp * dp)]
    if group == "pp":
        return [i * tp * cp * dp for i in range(pp)]
    if group == "mp":
        return [t + i * tp * cp * dp for i in range(pp) for t in range(tp)]
    return list(range(lay.world))


def collective_time(c: Collective, lay: Layout, gpu: GPU, gpus_per_node: int, intra: float, inter: float) -> float:
    """Seconds of one call: latency + the ring algorithm's bytes per rank over the group's link."""
    n = c.size
    if n <= 1:
        return 0.0
    ranks = group_ranks(lay, c.group)
    one_node = len({r // gpus_per_node for r in ranks}) == 1
    bw = (intra if one_node else inter) * 1e9
    latency = gpu.latency_intra_s if one_node else gpu.latency_inter_s
    if c.op == "all_reduce":
        factor = 2.0 * (n - 1) / n
    elif c.op.startswith(("all_gather", "reduce_scatter")):
        factor = (n - 1) / n
    else:  # point-to-point, broadcast
        factor = 1.0
    return latency + factor * c.nbytes / bw


@dataclass
class StepTime:
    compute_s: float  # forward + backward of the slowest stage, bubble included
    bubble_s: float
    exposed_comm_s: float
    comm_by_kind: dict[str, float]  # exposed seconds per kind (comm.py)
    optimizer_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.optimizer_s


def step_time(
    run: Run,
    lay: Layout,
    stages: list,
    collectives: dict[int, list[Collective]],
    cal: Calibration,
    gpu: GPU,
    gpus_per_node: int,
    intra: float,
    inter: float,
) -> StepTime:
    """Predicted step time of a layout (module docstring and docs/PLAN.md)."""
    m = run.model
    M = run.micro_batches(lay)
    dense, attn, head = layer_flops(m, run.seq)
    if lay.recompute == "full":
        dense, attn = dense * 4 / 3, attn * 4 / 3  # the forward runs again in the backward
    elif lay.recompute == "selective":
        attn = attn * 4 / 3  # core attention's forward runs again
    tokens = lay.micro_batch * run.seq / lay.cp
    rate = cal.s_per_flop(m.hidden_size / lay.tp)
    per_stage = []
    for st in stages:
        flops = sum(c.layers * (dense + attn) + (head if c.last else 0.0) for c in st.chunks) / lay.tp
        per_stage.append(flops * tokens * rate)
    slowest = max(per_stage)
    bubble = (lay.pp - 1) / lay.vpp * slowest
    compute = M * slowest + bubble
    kinds: dict[str, float] = {}
    worst = 0.0
    for st in stages:
        k: dict[str, float] = {}
        for c in collectives[st.rank]:
            t = c.calls * collective_time(c, lay, gpu, gpus_per_node, intra, inter)
            k[c.kind] = k.get(c.kind, 0.0) + t
        # megatron issues the column-parallel linears' backward collectives asynchronously: they hide
        # behind the weight-gradient GEMMs (a third of the layers' matmul time)
        wgrad = M * sum(c.layers for c in st.chunks) * dense / 3 / lay.tp * tokens * rate
        k["tp_bwd_async"] = max(0.0, k.get("tp_bwd_async", 0.0) - wgrad)
        if "pp" in k:  # a batched send + receive run at once: half the tensors are on the critical path
            k["pp"] /= 2
        if lay.overlap_grad_reduce and "dp_grad" in k:  # hidden behind backward but for the last bucket
            last = [c for c in collectives[st.rank] if c.kind == "dp_grad"]
            k["dp_grad"] = collective_time(last[-1], lay, gpu, gpus_per_node, intra, inter) if last else 0.0
        total = sum(k.values())
        if total >= worst:
            worst, kinds = total, k
    params = max(st.params for st in stages)
    opt_params = params / (lay.dp * lay.cp) if lay.distributed_optimizer else params
    optimizer = cal.optimizer_s_per_param * opt_params
    return StepTime(compute, bubble, worst, kinds, optimizer)


def tokens_per_s_per_gpu(run: Run, lay: Layout, step_s: float) -> float:
    return run.global_batch * run.seq / step_s / lay.world


def mfu(run: Run, tokens_per_s: float, gpu: GPU) -> float:
    """MFU as the rows count it: flops_per_token with attention over the full score matrix."""
    from megatron_soda.model.flops import flops_per_token

    return flops_per_token(run.model, run.seq) * tokens_per_s / (gpu.peak_tflops * 1e12)


def in_flight(lay: Layout, rank: int, micro_batches: int) -> int:
    """Chunk forwards whose activations pipeline rank `rank` holds at its peak (megatron's warmup
    micro-batches + 1: 1F1B pp - rank; interleaved 2 (pp - rank - 1) + (vpp - 1) pp + 1)."""
    if lay.pp == 1:
        return 1
    if lay.vpp == 1:
        return min(lay.pp - rank, micro_batches)
    warmup = (lay.pp - rank - 1) * 2 + (lay.vpp - 1) * lay.pp
    return min(warmup + 1, micro_batches * lay.vpp)


def isclose(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)
