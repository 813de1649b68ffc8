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

import megatron_soda.kernels  # noqa: F401  (interpreter switch on CPU)
from megatron_soda.kernels.grad_accum import accumulates_into_main_grad, add_wgrad_, finish_main_grad

BLOCK_V = 4096  # columns per tile
NUM_WARPS = 8
BLOCK_T = 1  # rows per program on a GPU: many programs in flight, each row's second read from L2
INTERPRETER_BLOCK_T = 64  # Triton's interpreter pays per program: few, large ones
# kernel modes (Triton needs module-level constants as tl.constexpr)
STATS, GRAD, BOTH, LOSS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


@triton.jit
def _ce_rows(
    logits_ptr,
    labels_ptr,
    max_ptr,
    sum_ptr,
    tgt_ptr,
    lse_ptr,
    nll_ptr,
    g_nll_ptr,
    g_lse_ptr,
    n_rows,
    V,
    n_real,
    start,
    z_loss,
    MODE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """BLOCK_T rows of a logits chunk (this TP rank's vocabulary slice; columns >= n_real are padding).

    STATS: (max, sum of exp, target logit) over the real columns, for the TP combine.
    GRAD: with the combined log Z given, the rows become d(loss)/d(logits) in place,
      p * (g_nll + g_lse) - onehot * g_nll, 0 on padding.
    LOSS (no TP): the statistics, then log Z and NLL.
    BOTH (no TP): LOSS, then the gradient in the same program, the rows' second read mostly served
      from L2; g_nll is the token's loss weight, g_lse = 2 z w log Z.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    base = rows.to(tl.int64)[:, None] * V
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - start
    if MODE != GRAD:
        m = tl.full([BLOCK_T], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_T], tl.float32)
        tgt = tl.zeros([BLOCK_T], tl.float32)
        for v0 in range(0, n_real, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols < n_real)[None, :]
            x = tl.load(logits_ptr + base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, axis=1))
            safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
            s = s * tl.exp(m - safe_m) + tl.sum(tl.exp(x - safe_m[:, None]), axis=1)
            m = new_m
            tgt += tl.sum(tl.where(ok & (cols[None, :] == labels[:, None]), x, 0.0), axis=1)
    if MODE == STATS:
        tl.store(max_ptr + rows, m, mask=row_ok)
        tl.store(sum_ptr + rows, s, mask=row_ok)
        tl.store(tgt_ptr + rows, tgt, mask=row_ok)
    if MODE == BOTH or MODE == LOSS:
        lse = tl.where(row_ok, m + tl.log(tl.where(row_ok, s, 1.0)), 0.0)  # rows past the end stay finite
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(nll_ptr + rows, lse - tgt, mask=row_ok)
    if MODE == BOTH:
        g_nll = tl.load(g_nll_ptr + rows, mask=row_ok, other=0.0)
        g_lse = 2.0 * z_loss * g_nll * lse
    if MODE == GRAD:
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g_nll = tl.load(g_nll_ptr + rows, mask=row_ok, other=0.0)
        g_lse = tl.load(g_lse_ptr + rows, mask=row_ok, other=0.0)
    if MODE == GRAD or MODE == BOTH:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            in_v = row_ok[:, None] & (cols < V)[None, :]
            x = tl.load(logits_ptr + base + cols[None, :], mask=in_v, other=0.0).to(tl.float32)
            p = tl.where((cols < n_real)[None, :], tl.exp(x - lse[:, None]), 0.0)
            grad = p * (g_nll + g_lse)[:, None] - tl.where(cols[None, :] == labels[:, None], g_nll[:, None], 0.0)
            tl.store(logits_ptr + base + cols[None, :], grad.to(logits_ptr.dtype.element_ty), mask=in_v)


def _launch(mode: int, logits, labels, n_real: int, start: int, **bufs) -> None:
    rows, v = logits.shape
    if rows == 0:
        return
    block_t = BLOCK_T if logits.is_cuda else INTERPRETER_BLOCK_T
    dummy = labels  # unused pointer arguments of this mode
    args = [bufs.get(k, dummy) for k in ("max", "sum", "tgt", "lse", "nll", "g_nll", "g_lse")]
    _ce_rows[(triton.cdiv(rows, block_t),)](
        logits,
        labels,
        *args,
        rows,
        v,
        n_real,
        start,
        float(bufs.get("z_loss", 0.0)),
        MODE=mode,
        BLOCK_T=block_t,
        BLOCK_V=BLOCK_V if logits.is_cuda else min(BLOCK_V, triton.next_power_of_2(v)),
        num_warps=NUM_WARPS,
    )


def _stats(logits: torch.Tensor, labels: torch.Tensor, n_real: int, start: int):
    n = logits.shape[0]
    m = torch.empty(n, dtype=torch.float32, device=logits.device)
    s, t = torch.empty_like(m), torch.empty_like(m)
    _launch(STATS, logits, labels, n_real, start, max=m, sum=s, tgt=t)
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
    _launch(
        GRAD, logits, labels, n_real, start, lse=lse.contiguous(), g_nll=g_nll.contiguous(), g_lse=g_lse.contiguous()
    )


def _tp_group(group):
    """The group to combine over, or None when there is nothing to combine (no TP, no process group)."""
    return group if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1 else None


def _chunk_grads_(grad_logits, h, weight, grad_h, grad_w) -> None:
    """d(hidden) of this chunk's rows into `grad_h`, d(weight) accumulated into `grad_w` (fp32)."""
    if grad_h.dtype == weight.dtype:
        torch.mm(grad_logits, weight, out=grad_h)
    else:
        grad_h.copy_(grad_logits @ weight)
    add_wgrad_(grad_w, grad_logits.t(), h)


def _chunk_stats(h, weight, labels, n_real: int, start: int, group):
    """One chunk: logits in the weight's dtype (the matmul accumulates in fp32, as torch's bf16 path;
    the Triton reductions read them in fp32), then (lse, nll) over the whole vocabulary: in the
    kernel without TP (as the one-pass training kernel computes them), else combined over TP."""
    logits = h @ weight.t()
    if group is None:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        nll = torch.empty_like(lse)
        _launch(LOSS, logits, labels, n_real, start, lse=lse, nll=nll)
        return logits, lse, nll
    m, s, t = _combine_tp(*_stats(logits, labels, n_real, start), group)
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
            _softmax_grad_(logits, labels[sl], lse[sl], g_nll[sl], g_lse[sl], n_real, start)
            _chunk_grads_(logits, h[sl], weight, grad_h[sl], grad_w)
        if reduce_group is not None:  # every TP rank holds part of the vocabulary: sum their d(hidden)
            dist.all_reduce(grad_h, group=reduce_group)
        return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None, None, None, None, None


class FusedLinearCELoss(torch.autograd.Function):
    """loss = sum(w * (nll + z * logZ^2)) with its gradients computed in the forward, while each
    chunk's logits are at hand (as Liger-Kernel does): no recomputation in backward, so the output
    layer costs the same three N x V x h matmuls as the unfused path, without its logits memory.
    Without TP one Triton program per row computes the statistics and the gradient in one pass.
    d(weight) is accumulated in fp32; with `into_main_grad` the backward adds it to megatron's
    fp32 `main_grad` itself (no bf16 gradient, no second addition by the DDP hook).
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
        into_main_grad: bool,
    ):
        n = hidden.shape[0]
        n_real = max(0, min(weight.shape[0], real_vocab - vocab_start))
        tp_group = _tp_group(group)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        nll = torch.empty_like(lse)
        w = loss_weight.float().contiguous()
        h = hidden.to(weight.dtype)
        grad_h = torch.empty(hidden.shape, dtype=weight.dtype, device=hidden.device) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        for c0 in range(0, n, chunk):
            sl = slice(c0, min(n, c0 + chunk))
            if need_grad and tp_group is None:
                logits = h[sl] @ weight.t()
                _launch(
                    BOTH, logits, labels[sl], n_real, vocab_start, lse=lse[sl], nll=nll[sl], g_nll=w[sl], z_loss=z_loss
                )
            else:
                logits, lse[sl], nll[sl] = _chunk_stats(h[sl], weight, labels[sl], n_real, vocab_start, tp_group)
                if need_grad:
                    g_lse = 2 * z_loss * w[sl] * lse[sl]
                    _softmax_grad_(logits, labels[sl], lse[sl], w[sl], g_lse, n_real, vocab_start)
            if need_grad:
                _chunk_grads_(logits, h[sl], weight, grad_h[sl], grad_w)
        if need_grad and tp_group is not None and reduce_grad_input:
            dist.all_reduce(grad_h, group=tp_group)
        loss = (w * (nll + z_loss * lse.square())).sum()
        ctx.mark_non_differentiable(nll, lse)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_dtype = hidden.dtype
        ctx.weight = weight if into_main_grad and accumulates_into_main_grad(weight) else None
        return nll, lse, loss

    @staticmethod
    def backward(ctx, _g_nll, _g_lse, g_loss):
        grad_h, grad_w = ctx.saved_tensors  # need_grad was True: without it autograd records no graph
        weight = ctx.weight
        if weight is not None:
            weight.main_grad.addcmul_(grad_w, g_loss)  # the loss's upstream gradient scales this micro-batch's share
            g_weight = finish_main_grad(weight)
        else:
            g_weight = (grad_w * g_loss).to(grad_h.dtype)
        return (grad_h * g_loss).to(ctx.hidden_dtype), g_weight, *([None] * 10)


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
    into_main_grad: bool = False,
):
    """hidden [N, h] (replicated over TP), weight [V_local, h] (this rank's vocab rows), labels [N]
    (global ids) -> (nll [N], log_z [N]). Each TP rank's d(hidden) covers only its vocabulary rows;
    they are all-reduced over `group` here, unless the caller's own communication does it
    (`reduce_grad_input=False`: sequence parallelism's gather, whose backward reduce-scatters).

    With `loss_weight` [N] (the loss mask): -> (nll, log_z, loss), loss = sum(w * (nll + z_loss *
    log_z^2)) the one differentiable output, its gradients computed during the forward (the
    training path: 3/4 of the matmuls of the recomputing backward). `into_main_grad`: add d(weight)
    to megatron's `weight.main_grad` directly (gradient-accumulation fusion)."""
    args = (hidden.contiguous(), weight, labels.contiguous())
    if loss_weight is None:
        return FusedLinearCE.apply(*args, vocab_start, real_vocab, chunk, group, reduce_grad_input)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return FusedLinearCELoss.apply(
        *args,
        loss_weight.reshape(-1),
        vocab_start,
        real_vocab,
        chunk,
        group,
        reduce_grad_input,
        z_loss,
        need_grad,
        into_main_grad,
    )
