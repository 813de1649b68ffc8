"""Fused (vocab-parallel) codec-embedding lookup, forward and backward.

megatron-core's VocabParallelEmbedding builds a mask, clones and shifts the ids, gathers, then
zeroes out-of-shard rows: several kernels and two temporaries. Here one kernel does the range
check, local-row offset, gather and zeroing, reading the ids in whatever integer dtype the shards
store; the backward accumulates straight into this shard's gradient (fp32 atomics), or, with
`deterministic`, through torch's sort-based deterministic index_put. With `into_main_grad` (megatron's
gradient-accumulation-fusion protocol) that gradient is megatron's fp32 `main_grad` itself: no dense
[V, h] buffer to zero, no bf16 copy, no second addition by the DDP hook. The TP reduction after it
is megatron-core's own (all-reduce, or reduce-scatter under sequence parallelism).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import megatron_soda.kernels  # noqa: F401  (interpreter switch on CPU)
from megatron_soda.kernels.grad_accum import accumulates_into_main_grad, finish_main_grad

BLOCK_T = 64


@triton.jit
def _embed_fwd(
    ids_ptr, w_ptr, out_ptr, n_tokens, start, end, H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_tokens
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    mine = (ids >= start) & (ids < end) & row_ok
    local = tl.where(mine, ids - start, 0)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        m = mine[:, None] & col_ok[None, :]
        v = tl.load(w_ptr + local[:, None] * H + cols[None, :], mask=m, other=0.0)
        tl.store(out_ptr + rows[:, None] * H + cols[None, :], v, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _embed_bwd(
    ids_ptr, g_ptr, gw_ptr, n_tokens, start, end, H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_tokens
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    mine = (ids >= start) & (ids < end) & row_ok
    local = tl.where(mine, ids - start, 0)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        m = mine[:, None] & col_ok[None, :]
        g = tl.load(g_ptr + rows[:, None] * H + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.atomic_add(gw_ptr + local[:, None] * H + cols[None, :], g, mask=m)


def _block_h(h: int) -> int:
    return min(triton.next_power_of_2(h), 256)


class FusedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, ids: torch.Tensor, weight: torch.Tensor, start: int, end: int, deterministic: bool, into_main_grad: bool
    ):
        flat = ids.reshape(-1).contiguous()
        n, h = flat.numel(), weight.shape[1]
        out = torch.empty(n, h, dtype=weight.dtype, device=weight.device)
        if n:
            _embed_fwd[(triton.cdiv(n, BLOCK_T),)](
                flat, weight, out, n, start, end, H=h, BLOCK_T=BLOCK_T, BLOCK_H=_block_h(h)
            )
        ctx.save_for_backward(flat)
        ctx.meta = (start, end, tuple(weight.shape), weight.dtype, deterministic)
        ctx.weight = weight if into_main_grad and accumulates_into_main_grad(weight) else None
        return out.view(*ids.shape, h)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (flat,) = ctx.saved_tensors
        start, end, shape, dtype, deterministic = ctx.meta
        g = grad_out.reshape(-1, shape[1]).contiguous()
        weight = ctx.weight
        gw = weight.main_grad if weight is not None else torch.zeros(shape, dtype=torch.float32, device=g.device)
        if deterministic:
            mine = (flat >= start) & (flat < end)
            gw.index_put_(((flat[mine] - start).long(),), g[mine].to(gw.dtype), accumulate=True)
        else:
            n = flat.numel()
            if n:
                _embed_bwd[(triton.cdiv(n, BLOCK_T),)](
                    flat, g, gw, n, start, end, H=shape[1], BLOCK_T=BLOCK_T, BLOCK_H=_block_h(shape[1])
                )
        if weight is not None:
            return None, finish_main_grad(weight), None, None, None, None
        return None, gw.to(dtype), None, None, None, None


def fused_embedding(
    ids: torch.Tensor,
    weight: torch.Tensor,
    start: int,
    end: int,
    deterministic: bool = False,
    into_main_grad: bool = False,
):
    """This TP rank's partial embedding [*ids.shape, hidden]: rows of ids outside [start, end) are 0.
    `into_main_grad`: the weight gradient is added to `weight.main_grad` (fp32) directly."""
    return FusedEmbedding.apply(ids, weight, start, end, deterministic, into_main_grad)


def vocab_parallel_embedding(module, input_: torch.Tensor, into_main_grad: bool = False) -> torch.Tensor:
    """Drop-in for VocabParallelEmbedding.forward (same parameters, same TP / SP reduction)."""
    from megatron.core.tensor_parallel.mappings import (
        reduce_from_tensor_model_parallel_region,
        reduce_scatter_to_sequence_parallel_region,
    )

    out = fused_embedding(
        input_,
        module.weight,
        module.vocab_start_index,
        module.vocab_end_index,
        module.deterministic_mode,
        into_main_grad,
    )
    if module.reduce_scatter_embeddings:
        return reduce_scatter_to_sequence_parallel_region(out.transpose(0, 1).contiguous(), group=module.tp_group)
    return reduce_from_tensor_model_parallel_region(out, group=module.tp_group)
