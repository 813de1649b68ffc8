"""Fused output layer + cross-entropy (vocab-parallel), chunked over tokens.

The logits of a 144,644-id vocabulary dominate a small model's activation memory (tokens x V fp32).
Here they exist only one chunk of tokens at a time: forward computes each chunk's logits with a
matmul, reduces them in a Triton kernel to this TP rank's (max, sum of exp, target logit), and
combines those across the TP group exactly as megatron-core's vocab-parallel cross-entropy does;
backward recomputes the chunk's logits, turns them into the softmax gradient in place (Triton) and
does the two matmuls for d(hidden) and d(weight). Padding rows of the vocabulary are masked, so
they never receive probability mass. Returns per-token NLL and log Z (for z-loss and the
per-modality loss breakdown).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import kernels  # noqa: F401  (interpreter switch on CPU)

BLOCK_T = 16
BLOCK_V = 1024


@triton.jit
def _ce_stats(
    logits_ptr,
    labels_ptr,
    max_ptr,
    sum_ptr,
    tgt_ptr,
    n_rows,
    V: tl.constexpr,
    n_real,
    start,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - start
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    tgt = tl.zeros([BLOCK_T], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < n_real)[None, :]
        x = tl.load(logits_ptr + rows[:, None] * V + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, tl.max(x, axis=1))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe_m) + tl.sum(tl.exp(x - safe_m[:, None]), axis=1)
        m = new_m
        hit = ok & (cols[None, :] == labels[:, None])
        tgt += tl.sum(tl.where(hit, x, 0.0), axis=1)
    tl.store(max_ptr + rows, m, mask=row_ok)
    tl.store(sum_ptr + rows, s, mask=row_ok)
    tl.store(tgt_ptr + rows, tgt, mask=row_ok)


@triton.jit
def _ce_grad(
    logits_ptr,
    labels_ptr,
    lse_ptr,
    g_nll_ptr,
    g_lse_ptr,
    n_rows,
    V: tl.constexpr,
    n_real,
    start,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """In place: logits -> d(loss)/d(logits) = p * (g_nll + g_lse) - onehot * g_nll; padding -> 0."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - start
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_nll = tl.load(g_nll_ptr + rows, mask=row_ok, other=0.0)
    g_lse = tl.load(g_lse_ptr + rows, mask=row_ok, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_v = row_ok[:, None] & (cols < V)[None, :]
        real = row_ok[:, None] & (cols < n_real)[None, :]
        x = tl.load(logits_ptr + rows[:, None] * V + cols[None, :], mask=in_v, other=0.0).to(tl.float32)
        p = tl.where(real, tl.exp(x - lse[:, None]), 0.0)
        grad = p * (g_nll + g_lse)[:, None] - tl.where(cols[None, :] == labels[:, None], g_nll[:, None], 0.0)
        tl.store(logits_ptr + rows[:, None] * V + cols[None, :], grad, mask=in_v)


def _stats(logits: torch.Tensor, labels: torch.Tensor, n_real: int, start: int):
    n, v = logits.shape
    m = torch.empty(n, dtype=torch.float32, device=logits.device)
    s, t = torch.empty_like(m), torch.empty_like(m)
    _ce_stats[(triton.cdiv(n, BLOCK_T),)](
        logits, labels, m, s, t, n, V=v, n_real=n_real, start=start, BLOCK_T=BLOCK_T, BLOCK_V=BLOCK_V
    )
    return m, s, t


class FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, labels, vocab_start: int, real_vocab: int, chunk: int, group, reduce_grad_input: bool
    ):
        n = hidden.shape[0]
        v_local = weight.shape[0]
        n_real = max(0, min(v_local, real_vocab - vocab_start))
        tp = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        nll = torch.empty_like(lse)
        h = hidden.to(weight.dtype)
        for c0 in range(0, n, chunk):
            sl = slice(c0, min(n, c0 + chunk))
            logits = (h[sl] @ weight.t()).float().contiguous()
            m, s, t = _stats(logits, labels[sl], n_real, vocab_start)
            if tp > 1:
                gm = m.clone()
                dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
                s = s * torch.exp(torch.where(torch.isinf(m), torch.full_like(m, float("-inf")), m - gm))
                dist.all_reduce(s, group=group)
                dist.all_reduce(t, group=group)
                m = gm
            lse[sl] = torch.log(s) + m
            nll[sl] = lse[sl] - t
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.meta = (vocab_start, n_real, chunk, group if tp > 1 and reduce_grad_input else None)
        return nll, lse

    @staticmethod
    def backward(ctx, g_nll, g_lse):
        hidden, weight, labels, lse = ctx.saved_tensors
        start, n_real, chunk, reduce_group = ctx.meta
        n = hidden.shape[0]
        g_nll = (torch.zeros_like(lse) if g_nll is None else g_nll).float().contiguous()
        g_lse = (torch.zeros_like(lse) if g_lse is None else g_lse).float().contiguous()
        h = hidden.to(weight.dtype)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for c0 in range(0, n, chunk):
            sl = slice(c0, min(n, c0 + chunk))
            logits = (h[sl] @ weight.t()).float().contiguous()
            rows = logits.shape[0]
            _ce_grad[(triton.cdiv(rows, BLOCK_T),)](
                logits,
                labels[sl],
                lse[sl].contiguous(),
                g_nll[sl],
                g_lse[sl],
                rows,
                V=logits.shape[1],
                n_real=n_real,
                start=start,
                BLOCK_T=BLOCK_T,
                BLOCK_V=BLOCK_V,
            )
            grad_h[sl] = logits @ weight.float()
            grad_w += logits.t() @ h[sl].float()
        if reduce_group is not None:  # every TP rank holds part of the vocabulary: sum their d(hidden)
            dist.all_reduce(grad_h, group=reduce_group)
        return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden,
    weight,
    labels,
    vocab_start: int,
    real_vocab: int,
    chunk: int = 4096,
    group=None,
    reduce_grad_input: bool = True,
):
    """hidden [N, h] (replicated over TP), weight [V_local, h] (this rank's vocab rows), labels [N]
    (global ids) -> (nll [N], log_z [N]). Each TP rank's d(hidden) covers only its vocabulary rows;
    they are all-reduced over `group` here, unless the caller's own communication does it
    (`reduce_grad_input=False`: sequence parallelism's gather, whose backward reduce-scatters)."""
    return FusedLinearCE.apply(
        hidden.contiguous(), weight, labels.contiguous(), vocab_start, real_vocab, chunk, group, reduce_grad_input
    )
