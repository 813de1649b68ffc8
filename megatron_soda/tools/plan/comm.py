"""The bytes every process group moves in one training step, per rank, from the shapes alone.

Written down collective by collective as megatron-core 0.16 (local spec, no Transformer Engine) and
our Trainer issue them; each entry names its group and op as parallel/comm_stats.py counts them (the
unit is the logical tensor of the call: see there), so tests/test_plan.py compares this with a gloo
run exactly. `kind` says what, if anything, the call can hide behind (timing.py):
- `tp_fwd`: TP in the forward (row-parallel all-reduce / reduce-scatter, SP all-gather, the
  vocab-parallel embedding and the loss's TP combine): on the critical path;
- `tp_bwd_async`: the backward collectives megatron's column-parallel linear issues asynchronously
  (the input-gradient all-reduce / reduce-scatter, and the SP input re-gather for the weight
  gradient), hidden up to the GEMM they overlap;
- `tp_bwd`: the rest of the backward (the all-gather that is the backward of an SP reduce-scatter);
- `cp`: the CP attention's K/V all-gather and its backward reduce-scatter (synchronous);
- `pp`: pipeline sends and receives of activations and their gradients;
- `dp_grad`: the gradient all-reduce / reduce-scatter per bucket (after the backward unless
  overlap_grad_reduce); `dp_param`: the distributed optimizer's parameter all-gather (after the step);
- `small`: the per-step scalars (loss statistics, token count, norms, the finite check).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from megatron_soda.tools.plan.layout import Layout, Run
from megatron_soda.tools.plan.shapes import StageState


@dataclass(frozen=True)
class Collective:
    group: str
    op: str
    nbytes: int  # per call
    calls: int
    kind: str
    size: int  # ranks in the group


def step_collectives(run: Run, lay: Layout, stage: StageState) -> list[Collective]:
    """Every collective and point-to-point call pipeline rank `stage.rank` makes in one step."""
    m = run.model
    M = run.micro_batches(lay)
    tp, pp, cp, dpcp = lay.tp, lay.pp, lay.cp, lay.dp * lay.cp
    sp = lay.sequence_parallel
    tokens = lay.micro_batch * run.seq // cp  # this rank's tokens of one micro-batch
    hidden = tokens * m.hidden_size * run.act_bytes  # one [s, b, h] activation (full sequence over TP)
    out: list[Collective] = []

    def add(group: str, op: str, nbytes: int, calls: int, kind: str, size: int) -> None:
        if calls > 0:
            out.append(Collective(group, op, int(nbytes), int(calls), kind, size))

    full = lay.recompute == "full"  # the layer forward runs again in the backward
    for c in stage.chunks:
        per_mb = M
        if tp > 1:
            if c.first:  # vocab-parallel embedding
                if sp:
                    add("tp", "reduce_scatter_tensor", hidden, per_mb, "tp_fwd", tp)
                    add("tp", "all_gather_into_tensor", hidden, per_mb, "tp_bwd", tp)
                else:
                    add("tp", "all_reduce", hidden, per_mb, "tp_fwd", tp)
            n_fwd = c.layers * (2 if full else 1) * per_mb  # forward passes of a layer
            n_bwd = c.layers * per_mb
            if sp:  # per layer forward: 2 all-gathers (QKV, FC1 inputs), 2 reduce-scatters (proj, FC2)
                add("tp", "all_gather_into_tensor", hidden, 2 * n_fwd, "tp_fwd", tp)
                add("tp", "reduce_scatter_tensor", hidden, 2 * n_fwd, "tp_fwd", tp)
                add("tp", "all_gather_into_tensor", hidden, 2 * n_bwd, "tp_bwd_async", tp)  # input re-gather
                add("tp", "reduce_scatter_tensor", hidden, 2 * n_bwd, "tp_bwd_async", tp)  # input gradients
                add("tp", "all_gather_into_tensor", hidden, 2 * n_bwd, "tp_bwd", tp)  # backward of the RS
            else:  # row-parallel outputs all-reduced forward, column-parallel input gradients backward
                add("tp", "all_reduce", hidden, 2 * n_fwd, "tp_fwd", tp)
                add("tp", "all_reduce", hidden, 2 * n_bwd, "tp_bwd_async", tp)
            if c.last:
                if run.output != "torch":  # SodaOutputLayer defers the projection to the loss kernel
                    if sp:
                        add("tp", "all_gather_into_tensor", hidden, per_mb, "tp_fwd", tp)
                        add("tp", "reduce_scatter_tensor", hidden, per_mb, "tp_bwd", tp)
                    else:  # the kernel all-reduces its input gradient: fused computes it in the forward
                        when = "tp_fwd" if run.output == "fused" else "tp_bwd"
                        add("tp", "all_reduce", tokens * m.hidden_size * run.param_bytes, per_mb, when, tp)
                elif sp:  # ColumnParallelLinear with SP
                    add("tp", "all_gather_into_tensor", hidden, per_mb, "tp_fwd", tp)
                    add("tp", "all_gather_into_tensor", hidden, per_mb, "tp_bwd_async", tp)
                    add("tp", "reduce_scatter_tensor", hidden, per_mb, "tp_bwd_async", tp)
                else:
                    add("tp", "all_reduce", hidden, per_mb, "tp_bwd_async", tp)
                # the vocab-parallel loss: max, sum of exp, target logit per token (fp32)
                add("tp", "all_reduce", tokens * 4, 3 * per_mb, "tp_fwd", tp)
        if cp > 1:  # K and V all-gathered over CP per layer; the backward reduce-scatters their gradients
            kv = lay.micro_batch * run.seq * (m.num_query_groups // tp) * m.head_dim * run.act_bytes
            n_fwd = c.layers * (2 if full else 1) * per_mb
            add("cp", "all_gather_into_tensor", kv, 2 * n_fwd, "cp", cp)
            add("cp", "reduce_scatter_tensor", kv, 2 * c.layers * per_mb, "cp", cp)
    # pipeline point-to-point: each chunk boundary passes an activation forward and a gradient back
    if pp > 1:
        p2p = hidden // tp if sp else hidden
        r = stage.rank
        sends = recvs = 0
        for c in stage.chunks:
            if not c.last:
                sends += M  # activation to the next stage, its gradient back from it
                recvs += M
            if not c.first:
                recvs += M
                sends += M
        if lay.vpp == 1:  # batched p2p (trainer: batch_p2p_comm = vpp == 1)
            add("pp", "batch_isend_irecv.isend", p2p, sends, "pp", pp)
            add("pp", "batch_isend_irecv.irecv", p2p, recvs, "pp", pp)
        else:  # megatron's _p2p_ops: with 2 stages, one direction goes over the world group
            other = "world" if pp == 2 else "pp"
            add("pp" if r % 2 == 0 else other, "isend", p2p, sends, "pp", pp)
            add(other if r % 2 == 0 else "pp", "irecv", p2p, recvs, "pp", pp)
    # data parallel: gradients per bucket (fp32 buffers), the distributed optimizer's parameter gather
    if dpcp > 1:
        for c in stage.chunks:
            for b in c.buckets:
                if lay.distributed_optimizer:
                    add("dp_cp", "reduce_scatter_tensor", b * 4, 1, "dp_grad", dpcp)
                    add("dp_cp", "all_gather_into_tensor", b * run.param_bytes, 1, "dp_param", dpcp)
                else:
                    add("dp_cp", "all_reduce", b * 4, 1, "dp_grad", dpcp)
    # finalize_model_grads: QK-norm (and under SP every norm) gradients over TP, in one flat buffer
    if tp > 1:
        n = sum(c.tp_reduced_norm if sp else c.tp_reduced_qk for c in stage.chunks)
        add("tp", "all_reduce", n * 4, 1 if n else 0, "small", tp)
    if m.tie_embeddings and pp > 1 and (stage.chunks[0].first or stage.chunks[-1].last):
        emb = sum(c.embedding for c in stage.chunks)
        add("embd", "all_reduce", emb * 4, 1, "small", 2)
    # the Trainer's per-step scalars
    add("dp_cp", "all_reduce", run.stats_width * 8, 1, "small", dpcp)  # StepStats over DP x CP
    add("pp", "all_reduce", run.stats_width * 8, 1, "small", pp)  # ... and over PP
    add("pp", "broadcast", 4, 1, "small", pp)  # the step's token count from the last stage
    add("dp_cp", "all_reduce", 4, 1, "small", dpcp)  # ... summed over DP x CP
    add("mp", "all_reduce", 8, 1, "small", tp * pp)  # the weights' norm (fp64)
    add("dist_opt" if lay.distributed_optimizer else "mp", "all_reduce", 4, 1, "small", lay.world)  # grad norm
    add("world", "all_reduce", 4, 1, "small", lay.world)  # grads_finite
    return out


def totals(collectives: list[Collective]) -> dict[str, dict[str, dict[str, int]]]:
    """{"bytes": {group: {op: n}}, "calls": {...}}: comm_stats' per-step row, predicted."""
    b: dict = defaultdict(lambda: defaultdict(int))
    c: dict = defaultdict(lambda: defaultdict(int))
    for x in collectives:
        b[x.group][x.op] += x.nbytes * x.calls
        c[x.group][x.op] += x.calls
    return {
        "bytes": {g: dict(sorted(v.items())) for g, v in sorted(b.items())},
        "calls": {g: dict(sorted(v.items())) for g, v in sorted(c.items())},
    }
