"""Blockwise output layer + cross-entropy: no logits chunk is ever written to memory.

kernels/fused_ce.py keeps the logits of a chunk of tokens (4096 x 144,644 bf16: 1.2 GB) between a
cuBLAS matmul and its Triton reductions, so each step writes and reads them several times. Here
every tile of logits (BLOCK_T tokens x BLOCK_V vocabulary rows) lives only in registers:

- forward: `_lse_fwd` multiplies hidden and weight tiles and folds each logits tile into a running
  (max, sum of exp) per token (an online log-sum-exp, as flash attention's softmax), over one of
  LSE_SPLITS slices of the vocabulary; the slices' partial results (a few floats per token) are
  combined by torch, then over the TP group exactly as megatron-core's vocab-parallel
  cross-entropy combines them. The target logit is picked from the tile that holds it.
- backward: `_grad_tiles` recomputes a tile's logits, turns them into the softmax gradient
  p * (g_nll + g_lse) - onehot * g_nll and multiplies it back by the weight tile (d hidden) and
  the hidden tile (d weight). Each tile's products are added with fp32 atomics, without locks,
  into d(hidden) and straight into megatron's fp32 `main_grad` (gradient-accumulation fusion: no
  bf16 weight gradient, no second addition by the DDP hook). The summation order of atomics
  varies run to run on a GPU: this path is not bit-reproducible (kernels/fused_ce.py is).

Four N x V x h matmuls per step (fused_ce's training path: three, plus its logits traffic), no host
synchronisation anywhere (CUDA-graph safe), vocab-parallel: each TP rank runs its slice of the
vocabulary, and padding rows get no probability mass.

Gradient filtering (`filter_eps` > 0, opt-in, an approximation): a backward tile whose every entry
of softmax minus one-hot is below `filter_eps` in magnitude is skipped, as cut-cross-entropy's
default does (bf16's machine epsilon / 32 = 2**-12 there). On a trained model's peaked softmax most
tiles hold only such entries; what it costs the loss is measured, not assumed (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

import megatron_soda.kernels  # noqa: F401  (interpreter switch on CPU)
from megatron_soda.kernels.fused_ce import _combine_tp, _tp_group
from megatron_soda.kernels.grad_accum import accumulates_into_main_grad, finish_main_grad

# GPU tiles (bf16 operands, fp32 accumulators); no autotuning: its trial runs would add their
# atomics into main_grad. Set from first principles, to be tuned by the GPU race (soda bench kernels).
BLOCK_T, BLOCK_V, BLOCK_K = 128, 128, 64
LSE_SPLITS = 16  # vocabulary slices per token block in the forward: enough programs for 132 SMs at 8k tokens
GROUP_T = 8  # token blocks that visit the same weight tiles back to back (their reads then hit L2)
NUM_WARPS, NUM_STAGES = 8, 3
# Triton's interpreter pays per program and per loop step: few, large tiles
INTERPRETER_BLOCK_T, INTERPRETER_BLOCK_V, INTERPRETER_LSE_SPLITS = 256, 2048, 2
INTERPRETER_BLOCK_K = 0  # 0: the whole hidden dimension in one step


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, n_rows, V, H, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, acc):
    """acc [BLOCK_T, BLOCK_V] += hidden[rows] @ weight[cols]^T, the hidden dimension in BLOCK_K steps."""
    row_ok = rows < n_rows
    col_ok = cols < V
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * H
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * H
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        hk = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(w_cols + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_V]
        if IEEE:  # fp32 operands (the CPU backend, fp32 checks): no TF32 rounding
            acc = tl.dot(hk, wk, acc, input_precision="ieee")
        else:
            acc = tl.dot(hk, wk, acc)
    return acc


@triton.jit
def _lse_fwd(
    h_ptr,
    w_ptr,
    labels_ptr,
    max_ptr,
    sum_ptr,
    tgt_ptr,
    n_rows,
    V,
    n_real,
    H,
    start,
    v_per_split,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Program (token block, vocabulary slice): the slice's running max and sum of exp per token
    (columns >= n_real are padding: no mass), written to [n_rows, splits]; the target logit where
    the token's label falls in the slice."""
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - start
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, n_real)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = _logits_tile(
            h_ptr, w_ptr, rows, cols, n_rows, V, H, BLOCK_K, IEEE, tl.zeros([BLOCK_T, BLOCK_V], tl.float32)
        )
        x = tl.where((cols < v_hi)[None, :], x, float("-inf"))
        new_m = tl.maximum(m, tl.max(x, axis=1))
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        s = s * tl.exp(m - safe_m) + tl.sum(tl.exp(x - safe_m[:, None]), axis=1)
        m = new_m
        hit = (labels >= v0) & (labels < tl.minimum(v0 + BLOCK_V, v_hi))
        tgt = tl.sum(tl.where(cols[None, :] == labels[:, None], x, 0.0), axis=1)
        tl.store(tgt_ptr + rows, tgt, mask=row_ok & hit)
    tl.store(max_ptr + rows * n_split + split, m, mask=row_ok)
    tl.store(sum_ptr + rows * n_split + split, s, mask=row_ok)


@triton.jit
def _grad_tiles(
    h_ptr,
    w_ptr,
    labels_ptr,
    lse_ptr,
    g_nll_ptr,
    g_lse_ptr,
    dh_ptr,
    dw_ptr,
    n_rows,
    V,
    n_real,
    H,
    start,
    filter_eps,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
    IEEE: tl.constexpr,
    FILTER: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    """One tile: recompute its logits, form d(loss)/d(logits), add its products into d(hidden) [N, H]
    and d(weight) [V, H] (both fp32) with atomics. Programs run GROUP_T token blocks per weight
    tile in turn, so a weight tile is read from memory once per group."""
    pid = tl.program_id(0)
    n_t = tl.cdiv(n_rows, BLOCK_T)
    n_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_T * n_v
    first_t = (pid // per_group) * GROUP_T
    group_t = tl.minimum(n_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_t
    pid_v = (pid % per_group) // group_t
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    col_ok = cols < V
    x = _logits_tile(h_ptr, w_ptr, rows, cols, n_rows, V, H, BLOCK_K, IEEE, tl.zeros([BLOCK_T, BLOCK_V], tl.float32))
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))  # rows past the end: p = 0
    x = tl.where((cols < n_real)[None, :], x, float("-inf"))  # padding rows (any values): no mass
    p = tl.exp(x - lse[:, None])
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - start
    is_tgt = cols[None, :] == labels[:, None]
    keep = True
    if FILTER:  # softmax minus one-hot below filter_eps everywhere in the tile: skip it
        keep = tl.max(tl.abs(p - tl.where(is_tgt, 1.0, 0.0))) >= filter_eps
    if keep:
        g_nll = tl.load(g_nll_ptr + rows, mask=row_ok, other=0.0)
        g_lse = tl.load(g_lse_ptr + rows, mask=row_ok, other=0.0)
        d = p * (g_nll + g_lse)[:, None] - tl.where(is_tgt, g_nll[:, None], 0.0)
        d = d.to(h_ptr.dtype.element_ty)
        row_off = rows.to(tl.int64)[:, None] * H  # [BLOCK_T, 1]: hidden and d(hidden) rows
        col_off = cols.to(tl.int64)[:, None] * H  # [BLOCK_V, 1]: weight and d(weight) rows
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            row_mask = row_ok[:, None] & (ks < H)[None, :]
            col_mask = col_ok[:, None] & (ks < H)[None, :]
            if COMPUTE_DH:
                wk = tl.load(w_ptr + col_off + ks[None, :], mask=col_mask, other=0.0)
                if IEEE:
                    dh = tl.dot(d, wk, input_precision="ieee")
                else:
                    dh = tl.dot(d, wk)
                tl.atomic_add(dh_ptr + row_off + ks[None, :], dh, mask=row_mask, sem="relaxed")
            if COMPUTE_DW:
                hk = tl.load(h_ptr + row_off + ks[None, :], mask=row_mask, other=0.0)
                if IEEE:
                    dw = tl.dot(tl.trans(d), hk, input_precision="ieee")
                else:
                    dw = tl.dot(tl.trans(d), hk)
                tl.atomic_add(dw_ptr + col_off + ks[None, :], dw, mask=col_mask, sem="relaxed")


def gpu_options(ieee: bool) -> dict:
    """Launch options on a GPU: fp32 operands (IEEE products, the fp32 checks) pipeline one stage
    less, their tiles being twice the bytes (the backward's shared memory at three stages: 208 KiB of
    sm_90's 227; at two: 144)."""
    return dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES - 1 if ieee else NUM_STAGES)


def _blocks(h: torch.Tensor, filtered: bool = False) -> tuple[int, int, int, dict]:
    """(BLOCK_T, BLOCK_V, BLOCK_K, launch options) for this device. Filtering skips whole tiles, so
    what it drops depends on the tile: a filtered backward in the interpreter uses the GPU's tiles
    (slower), and skips what it would skip on a GPU."""
    if h.is_cuda:
        return BLOCK_T, BLOCK_V, BLOCK_K, gpu_options(h.dtype == torch.float32)
    bk = INTERPRETER_BLOCK_K or max(16, triton.next_power_of_2(h.shape[1]))
    if filtered:
        return BLOCK_T, BLOCK_V, bk, {}
    return INTERPRETER_BLOCK_T, INTERPRETER_BLOCK_V, bk, {}


def _lse_parts(h, weight, labels, n_real: int, start: int):
    """-> (max [N], sum of exp relative to it [N], target logit [N]) over this rank's real columns."""
    n, hid = h.shape
    bt, bv, bk, opts = _blocks(h)
    splits = max(1, min(LSE_SPLITS if h.is_cuda else INTERPRETER_LSE_SPLITS, triton.cdiv(n_real, bv)))
    v_per_split = triton.cdiv(triton.cdiv(max(n_real, 1), splits), bv) * bv
    m = torch.empty(n, splits, dtype=torch.float32, device=h.device)
    s = torch.empty_like(m)
    tgt = torch.zeros(n, dtype=torch.float32, device=h.device)
    if n:
        _lse_fwd[(triton.cdiv(n, bt), splits)](
            h, weight, labels, m, s, tgt, n, weight.shape[0], n_real, hid, start, v_per_split,
            BLOCK_T=bt, BLOCK_V=bv, BLOCK_K=bk, IEEE=h.dtype == torch.float32, **opts,
        )  # fmt: skip
    gm = m.amax(1)
    safe = torch.where(torch.isinf(gm), torch.zeros_like(gm), gm)
    return gm, (s * torch.exp(m - safe[:, None])).sum(1), tgt


class BlockwiseLinearCE(torch.autograd.Function):
    """(nll, log Z) per token; any upstream gradient on either (the loss is formed by torch on top)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, labels, vocab_start: int, real_vocab: int, group, reduce_grad_input: bool,
        filter_eps: float, into_main_grad: bool,
    ):  # fmt: skip
        n_real = max(0, min(weight.shape[0], real_vocab - vocab_start))
        tp_group = _tp_group(group)
        h = hidden.to(weight.dtype)
        m, s, tgt = _lse_parts(h, weight, labels, n_real, vocab_start)
        if tp_group is not None:
            m, s, tgt = _combine_tp(m, s, tgt, tp_group)
        lse = torch.log(s) + torch.where(torch.isinf(m), torch.zeros_like(m), m)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.meta = (vocab_start, n_real, tp_group if reduce_grad_input else None, float(filter_eps), into_main_grad)
        return lse - tgt, lse

    @staticmethod
    def backward(ctx, g_nll, g_lse):
        hidden, weight, labels, lse = ctx.saved_tensors
        start, n_real, reduce_group, filter_eps, into_main_grad = ctx.meta
        need_dh, need_dw = ctx.needs_input_grad[:2]
        n, hid = hidden.shape
        h = hidden.to(weight.dtype)
        g_nll = (torch.zeros_like(lse) if g_nll is None else g_nll).float().contiguous()
        g_lse = (torch.zeros_like(lse) if g_lse is None else g_lse).float().contiguous()
        dh = torch.zeros(n, hid, dtype=torch.float32, device=hidden.device) if need_dh else lse
        main = need_dw and into_main_grad and accumulates_into_main_grad(weight)
        if main:
            dw = weight.main_grad
        else:
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else lse
        if n and weight.shape[0] and (need_dh or need_dw):
            bt, bv, bk, opts = _blocks(h, filtered=filter_eps > 0)
            grid = (triton.cdiv(n, bt) * triton.cdiv(weight.shape[0], bv),)
            _grad_tiles[grid](
                h, weight, labels, lse, g_nll, g_lse, dh, dw, n, weight.shape[0], n_real, hid, start, filter_eps,
                BLOCK_T=bt, BLOCK_V=bv, BLOCK_K=bk, GROUP_T=GROUP_T, IEEE=h.dtype == torch.float32,
                FILTER=filter_eps > 0, COMPUTE_DH=need_dh, COMPUTE_DW=need_dw, **opts,
            )  # fmt: skip
        grad_h = grad_w = None
        if need_dh:
            grad_h = dh.to(hidden.dtype)  # reduced in the activations' dtype, as the chunked kernel's
            if reduce_group is not None:  # every TP rank holds part of the vocabulary: sum their d(hidden)
                dist.all_reduce(grad_h, group=reduce_group)
        if need_dw:
            grad_w = finish_main_grad(weight) if main else dw.to(weight.dtype)
        return grad_h, grad_w, *([None] * 7)


def blockwise_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    real_vocab: int,
    group=None,
    reduce_grad_input: bool = True,
    loss_weight: torch.Tensor | None = None,
    z_loss: float = 0.0,
    into_main_grad: bool = False,
    filter_eps: float = 0.0,
):
    """hidden [N, h] (replicated over TP), weight [V_local, h] (this rank's vocab rows), labels [N]
    (global ids) -> (nll [N], log_z [N]), as kernels/fused_ce.py's `fused_linear_cross_entropy`
    (the same arguments, less its chunk size). With `loss_weight`: -> (nll, log_z, loss) with nll and
    log_z detached and loss = sum(w * (nll + z_loss * log_z^2)). `into_main_grad`: d(weight) goes
    into `weight.main_grad` directly. `filter_eps` > 0: skip backward tiles whose softmax-minus-
    one-hot entries are all below it (an approximation; 0 is exact)."""
    if filter_eps < 0:
        raise ValueError(f"filter_eps must be >= 0, got {filter_eps}")
    nll, lse = BlockwiseLinearCE.apply(
        hidden.contiguous(), weight.contiguous(), labels.contiguous(), vocab_start, real_vocab, group,
        reduce_grad_input, filter_eps, into_main_grad,
    )  # fmt: skip
    if loss_weight is None:
        return nll, lse
    w = loss_weight.reshape(-1).float()
    loss = (w * (nll + z_loss * lse.square())).sum()
    return nll.detach(), lse.detach(), loss
