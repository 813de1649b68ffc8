"""FP8 matmuls for the transformer layers' linears (QKV, attention projection, MLP): `model.fp8 tensorwise`.

Dynamic per-tensor scaling, as torchao's "tensorwise" recipe: each operand's scale is computed from
its current absolute maximum (no amax history), scale = the format's largest finite value / amax,
so the operand's largest element lands exactly on the format's largest value and nothing saturates.
The forward operands (activation, weight) are cast to e4m3 (more mantissa), the output gradient to
e5m2 (more range: gradients span more decades). Each of a linear's three GEMMs (output, d(input),
d(weight)) runs on scaled FP8 operands through `torch._scaled_mm` with fp32 accumulation; the
output and d(input) come back in the activation's dtype, d(weight) in fp32 (added into megatron's
fp32 `main_grad` when gradient-accumulation fusion is on). The embedding and output layer stay in
bf16 (their seams are elsewhere): the LM head's logits are the most precision-sensitive matmul.

Tensor parallelism: where an operand is split over the TP group (every weight shard at TP > 1; the
input of a row-parallel linear, split along its features, and of a column-parallel one under
sequence parallelism, split along the sequence; the output gradient of a column-parallel linear,
split along its features), its amax is all-reduced (MAX) over the TP group before the scale is
taken, so every rank quantises on the grid a TP=1 run would use: FP8 numerics independent of the
TP degree (the layout tests' premise: a layout's losses equal the single-process run's), at the
cost of one scalar all-reduce per split operand. Per-shard scales would also be valid (each rank's
GEMM sees one uniform scale per operand) but make the result depend on TP. Replicated operands (a
column-parallel input without SP, a row-parallel output gradient) have the same amax on every rank
and need no reduction. Under sequence parallelism the input is quantised before the all-gather,
which then moves 1 byte per element instead of 2 (the same FP8 values, since the scale is global).

`torch._scaled_mm` wants its first operand row-major and its second column-major, both dimensions
multiples of 16 (checked here on every call, so the CPU tests hold the GPU's layout rules; rows are
padded with zeros to a multiple of 16). On the CPU (`emulate`, the default there) each GEMM is the
fp32 product of the dequantised operands, i.e. exactly the FP8 arithmetic with fp32 accumulation:
the tests check the scaling, casts and TP logic against that, and against torch's CPU `_scaled_mm`.
Training with FP8 needs a GPU with FP8 tensor cores (compute capability 8.9+); the CPU backend
refuses `model.fp8 tensorwise` (model/fast_paths.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_soda.kernels.grad_accum import finish_main_grad

E4M3 = torch.float8_e4m3fn  # forward operands: activations and weights
E5M2 = torch.float8_e5m2  # the output gradient
AMAX_FLOOR = 1e-12  # an all-zero tensor gets a finite scale (its values stay 0)
ALIGN = 16  # torch._scaled_mm: both dimensions of both operands


def fp8_max(fmt: torch.dtype) -> float:
    """The largest finite value of an FP8 format: 448 (e4m3fn), 57344 (e5m2)."""
    return float(torch.finfo(fmt).max)


def amax(t: torch.Tensor, group=None) -> torch.Tensor:
    """max |t| as an fp32 scalar on t's device (no host sync: CUDA-graph safe), MAX-reduced over `group`."""
    a = t.detach().abs().amax().float() if t.numel() else torch.zeros((), device=t.device)
    if group is not None:
        dist.all_reduce(a, op=dist.ReduceOp.MAX, group=group)
    return a


def scale_for(a: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    """The quantisation scale of a tensor whose amax is `a`: the format's max / amax (fp32)."""
    return fp8_max(fmt) / a.clamp(min=AMAX_FLOOR)


def quantize(t: torch.Tensor, fmt: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """t * scale, rounded to the nearest value of `fmt` (products in fp32; clamped, so a value just
    past the max after rounding of the scale cannot become inf/NaN)."""
    m = fp8_max(fmt)
    return (t.float() * scale).clamp_(-m, m).to(fmt)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 values an FP8 tensor stands for: q / scale."""
    return q.float() / scale


def to_fp8(t: torch.Tensor, fmt: torch.dtype, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor scaling of `t` (amax over `group` where t is split over it) -> (fp8, scale)."""
    scale = scale_for(amax(t, group), fmt)
    return quantize(t, fmt, scale), scale


def _row_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) == t.shape[1]


def _col_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) == t.shape[0]


def scaled_mm(a, a_scale, b, b_scale, out_dtype: torch.dtype, emulate: bool) -> torch.Tensor:
    """(a / a_scale) @ (b / b_scale) for FP8 `a` [M, K] (row-major) and `b` [K, N] (column-major),
    accumulated in fp32, returned in `out_dtype`. `emulate`: dequantise and multiply in fp32;
    else torch._scaled_mm (its scales multiply, so it gets the reciprocals)."""
    if not (_row_major(a) and _col_major(b)):
        raise ValueError(f"scaled_mm: a must be row-major, b column-major (strides {a.stride()}, {b.stride()})")
    if any(d % ALIGN for d in (*a.shape, *b.shape)):
        raise ValueError(f"scaled_mm: dimensions must be multiples of {ALIGN}, got {tuple(a.shape)} @ {tuple(b.shape)}")
    if emulate:
        return (dequantize(a, a_scale) @ dequantize(b, b_scale)).to(out_dtype)
    return torch._scaled_mm(a, b, scale_a=a_scale.reciprocal(), scale_b=b_scale.reciprocal(), out_dtype=out_dtype)


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    """FP8 `t` with zero rows up to a multiple of ALIGN (they add nothing to any product; the output
    rows they make are dropped). Byte 0 is +0.0 in both formats; torch pads no FP8 tensor itself."""
    extra = -t.shape[0] % ALIGN
    if not extra:
        return t
    zeros = torch.zeros((extra, t.shape[1]), dtype=torch.uint8, device=t.device)
    return torch.cat([t.view(torch.uint8), zeros]).view(t.dtype)


def _col_major_copy(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column-major (a transposed copy, as cuBLAS's FP8 GEMM needs)."""
    return t.t().contiguous().t()


class Fp8LinearFunction(torch.autograd.Function):
    """y = x @ w^T + b with the three GEMMs on scaled FP8 operands; megatron's linear protocol
    around them (sequence-parallel all-gather / reduce-scatter, d(input) all-reduce, main_grad)."""

    @staticmethod
    def forward(ctx, x, weight, bias, parallel, group, sequence_parallel, allreduce_dgrad, into_main_grad, emulate):
        tp = group if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1 else None
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        split_x = tp is not None and (parallel == "row" or sequence_parallel)
        xq, sx = to_fp8(x2, E4M3, tp if split_x else None)
        if sequence_parallel and tp is not None:  # gather the FP8 shards (1 byte per element) along the sequence
            full = torch.empty((xq.shape[0] * dist.get_world_size(tp), k), dtype=torch.uint8, device=x.device)
            dist.all_gather_into_tensor(full, xq.view(torch.uint8).contiguous(), group=tp)
            xq = full.view(E4M3)
        wq, sw = to_fp8(weight, E4M3, tp)
        rows = xq.shape[0]
        xq = _pad_rows(xq)
        out = scaled_mm(xq, sx, wq.t(), sw, x.dtype, emulate)[:rows]
        if bias is not None:
            out = out + bias
        ctx.save_for_backward(xq, sx, wq, sw)
        ctx.weight = weight  # for main_grad; not in save_for_backward, as megatron's own linear keeps it
        ctx.meta = (rows, tuple(x.shape), x.dtype, parallel, tp, sequence_parallel, allreduce_dgrad, emulate)
        ctx.has_bias, ctx.into_main_grad = bias is not None, into_main_grad
        return out.view(rows // x2.shape[0] * x.shape[0], *x.shape[1:-1], weight.shape[0])  # SP: the whole sequence

    @staticmethod
    def backward(ctx, grad_out):
        xq, sx, wq, sw = ctx.saved_tensors
        rows, x_shape, x_dtype, parallel, tp, sequence_parallel, allreduce_dgrad, emulate = ctx.meta
        weight = ctx.weight
        n = grad_out.shape[-1]
        g2 = grad_out.reshape(-1, n)
        gq, sg = to_fp8(g2, E5M2, tp if parallel == "column" else None)
        gq = _pad_rows(gq)
        grad_x = scaled_mm(gq, sg, _col_major_copy(wq), sw, x_dtype, emulate)[:rows]
        handle = None
        if sequence_parallel and tp is not None:
            local = torch.empty((rows // dist.get_world_size(tp), grad_x.shape[1]), dtype=x_dtype, device=grad_x.device)
            handle = dist.reduce_scatter_tensor(local, grad_x.contiguous(), group=tp, async_op=True)
            grad_x = local
        elif allreduce_dgrad and tp is not None:
            handle = dist.all_reduce(grad_x, group=tp, async_op=True)
        grad_w32 = scaled_mm(gq.t().contiguous(), sg, _col_major_copy(xq), sx, torch.float32, emulate)
        if ctx.into_main_grad and getattr(weight, "main_grad", None) is not None:
            weight.main_grad.add_(grad_w32)
            grad_w = finish_main_grad(weight)
        else:
            grad_w = grad_w32.to(weight.dtype)
        grad_b = g2.sum(0) if ctx.has_bias else None
        if handle is not None:
            handle.wait()
        return grad_x.view(x_shape), grad_w, grad_b, None, None, None, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    parallel: str = "column",
    group=None,
    sequence_parallel: bool = False,
    allreduce_dgrad: bool = False,
    into_main_grad: bool = False,
    emulate: bool | None = None,
) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T (+ bias) with FP8 GEMMs. `parallel`: "column" (weight split
    along its outputs; the output gradient is then split too) or "row" (weight split along its
    inputs, and so is x); `group`: the TP group (None or size 1: nothing is split).
    `sequence_parallel` (column only): x holds this rank's part of the sequence; it is gathered for
    the GEMM and d(input) reduce-scattered back. `allreduce_dgrad`: d(input) is all-reduced over TP
    (a column-parallel linear without SP). `into_main_grad`: d(weight) is added to
    `weight.main_grad` (fp32). `emulate`: fp32 products of the dequantised operands instead of
    torch._scaled_mm (default: on CPU tensors)."""
    if parallel not in ("column", "row"):
        raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
    if sequence_parallel and parallel != "column":
        raise ValueError("sequence_parallel is a column-parallel linear's (a row-parallel one reduce-scatters outside)")
    if x.dim() < 2:
        raise ValueError(
            f"x must be [..., {weight.shape[1]}] with at least one leading dimension, got {tuple(x.shape)}"
        )
    emulate = (not x.is_cuda) if emulate is None else emulate
    return Fp8LinearFunction.apply(
        x, weight, bias, parallel, group, sequence_parallel, allreduce_dgrad, into_main_grad, emulate
    )
