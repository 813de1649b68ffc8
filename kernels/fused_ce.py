"""Fused output layer + cross-entropy (vocab-parallel), chunked over tokens.

The logits of a 144,644-id vocabulary dominate a small model's activation memory (tokens x V fp32).
Here they exist only one chunk of tokens at a time, in the matmul's dtype (bf16 on GPU, as torch's
path before its .float()): each chunk's logits come from a cuBLAS matmul, a Triton kernel reduces
them to this TP rank's (max, sum of exp, target logit), combined across the TP group exactly as
megatron-core's vocab-parallel cross-entropy does, and a second Triton kernel turns them in place
into the softmax gradient, followed by the two matmuls for d(hidden) and d(weight). The training
path (`loss_weight` given) does that gradient work in the forward, while the chunk's logits are at
hand; the general path (any upstream gradient on NLL and log Z) recomputes them in backward.
Padding rows of the vocabulary are masked, so they never receive probability mass. Per-token NLL
and log Z come back for z-loss and the per-modality loss breakdown.
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


def _combine_tp(m, s, t, group):
    """This rank's (max, sum exp, target logit) -> the TP group's, as vocab_parallel_cross_entropy."""
    gm = m.clone()
    dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
    s = s * torch.exp(torch.where(torch.isinf(m), torch.full_like(m, float("-inf")), m - gm))
    dist.all_reduce(s, group=group)
    dist.all_reduce(t, group=group)
    return gm, s, t


def _softmax_grad_(logits, labels, lse, g_nll, g_lse, n_real: int, start: int) -> None:
    rows = logits.shape[0]
    _ce_grad[(triton.cdiv(rows, BLOCK_T),)](
        logits,
        labels,
        lse.contiguous(),
        g_nll.contiguous(),
        g_lse.contiguous(),
        rows,
        V=logits.shape[1],
        n_real=n_real,
        start=start,
        BLOCK_T=BLOCK_T,
        BLOCK_V=BLOCK_V,
    )


def _tp_group(group):
    """The group to combine over, or None when there is nothing to combine (no TP, no process group)."""
    return group if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1 else None


def _chunk_grads_(logits, labels, lse, g_nll, g_lse, h, weight, grad_h, grad_w, n_real: int, start: int) -> None:
    """One chunk's backward: its logits become d(loss)/d(logits) in place, then d(hidden) into
    `grad_h` (this chunk's rows) and d(weight) accumulated into `grad_w`."""
    _softmax_grad_(logits, labels, lse, g_nll, g_lse, n_real, start)
    grad_h.copy_(logits @ weight)
    grad_w += logits.t() @ h


def _chunk_stats(h, weight, labels, n_real: int, start: int, group):
    """One chunk: logits in the weight's dtype (the matmul accumulates in fp32, as torch's bf16 path;
    the Triton reductions read them in fp32), then (lse, nll) over the whole vocabulary."""
    logits = h @ weight.t()
    m, s, t = _stats(logits, labels, n_real, start)
    if group is not None:
        m, s, t = _combine_tp(m, s, t, group)
    lse = torch.log(s) + m
    return logits, lse, lse - t


class FusedLinearCE(torch.autograd.Function):
    """(nll, log Z) per token, any upstream gradient: backward recomputes each chunk's logits."""

    @staticmethod
    def forward(
        ctx, hidden, weight, labels, vocab_start: int, real_vocab: int, chunk: int, group, reduce_grad_input: bool
    ):
        n = hidden.shape[0]
        n_real = max(0, min(weight.shape[0], real_vocab - vocab_start))
        tp_group = _tp_group(group)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        nll = torch.empty_like(lse)
        h = hidden.to(weight.dtype)
        for c0 in range(0, n, chunk):
            sl = slice(c0, min(n, c0 + chunk))
            _, lse[sl], nll[sl] = _chunk_stats(h[sl], weight, labels[sl], n_real, vocab_start, tp_group)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.meta = (vocab_start, n_real, chunk, tp_group if reduce_grad_input else None)
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
            logits = h[sl] @ weight.t()
            _chunk_grads_(
                logits, labels[sl], lse[sl], g_nll[sl], g_lse[sl], h[sl], weight, grad_h[sl], grad_w, n_real, start
            )
        if reduce_group is not None:  # every TP rank holds part of the vocabulary: sum their d(hidden)
            dist.all_reduce(grad_h, group=reduce_group)
        return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None, None, None


class FusedLinearCELoss(torch.autograd.Function):
    """loss = sum(w * (nll + z * logZ^2)) with its gradients computed in the forward, while each
    chunk's logits are at hand (as Liger-Kernel does): no recomputation in backward, so the output
    layer costs the same three N x V x h matmuls as the unfused path, without its logits memory.
    nll and log Z come back detached, for logging."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        loss_weight,
        vocab_start: int,
        real_vocab: int,
        chunk: int,
        group,
        reduce_grad_input: bool,
        z_loss: float,
        need_grad: bool,
    ):
        n = hidden.shape[0]
        n_real = max(0, min(weight.shape[0], real_vocab - vocab_start))
        tp_group = _tp_group(group)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        nll = torch.empty_like(lse)
        w = loss_weight.float()
        h = hidden.to(weight.dtype)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        for c0 in range(0, n, chunk):
            sl = slice(c0, min(n, c0 + chunk))
            logits, lse[sl], nll[sl] = _chunk_stats(h[sl], weight, labels[sl], n_real, vocab_start, tp_group)
            if need_grad:
                g_lse = 2 * z_loss * w[sl] * lse[sl]
                _chunk_grads_(
                    logits, labels[sl], lse[sl], w[sl], g_lse, h[sl], weight, grad_h[sl], grad_w, n_real, vocab_start
                )
        if need_grad and tp_group is not None and reduce_grad_input:
            dist.all_reduce(grad_h, group=tp_group)
        loss = (w * (nll + z_loss * lse.square())).sum()
        ctx.mark_non_differentiable(nll, lse)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return nll, lse, loss

    @staticmethod
    def backward(ctx, _g_nll, _g_lse, g_loss):
        grad_h, grad_w = ctx.saved_tensors  # need_grad was True: without it autograd records no graph
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * g_loss).to(h_dtype), (grad_w * g_loss).to(w_dtype), *([None] * 9)


def fused_linear_cross_entropy(
    hidden,
    weight,
    labels,
    vocab_start: int,
    real_vocab: int,
    chunk: int = 4096,
    group=None,
    reduce_grad_input: bool = True,
    loss_weight=None,
    z_loss: float = 0.0,
):
    """hidden [N, h] (replicated over TP), weight [V_local, h] (this rank's vocab rows), labels [N]
    (global ids) -> (nll [N], log_z [N]). Each TP rank's d(hidden) covers only its vocabulary rows;
    they are all-reduced over `group` here, unless the caller's own communication does it
    (`reduce_grad_input=False`: sequence parallelism's gather, whose backward reduce-scatters).

    With `loss_weight` [N] (the loss mask): -> (nll, log_z, loss), loss = sum(w * (nll + z_loss *
    log_z^2)) the one differentiable output, its gradients computed during the forward (the
    training path: 3/4 of the matmuls of the recomputing backward)."""
    args = (hidden.contiguous(), weight, labels.contiguous())
    if loss_weight is None:
        return FusedLinearCE.apply(*args, vocab_start, real_vocab, chunk, group, reduce_grad_input)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return FusedLinearCELoss.apply(
        *args, loss_weight.reshape(-1), vocab_start, real_vocab, chunk, group, reduce_grad_input, z_loss, need_grad
    )
