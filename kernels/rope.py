"""Rotary position embedding in one Triton kernel (forward and backward), for megatron-core's
`apply_rope_fusion` seam, which otherwise needs Transformer Engine.

megatron-core's unfused path runs about ten elementwise kernels per query and key tensor (cos, sin,
two casts, split, negate, concatenate, two products, a sum, a concatenate). Here one kernel reads
each row of the query/key tensor once (any strides of its leading dimensions: the query and key
are views into the fused QKV projection), computes cos/sin of the angle table in fp32 and writes
the rotated row. The backward is the same rotation by the negated angle. Layout as megatron's:
t [s, b, heads, d], angles [s, 1, 1, d] with the two halves rotated against each other
(non-interleaved, the angle table repeated over the halves as megatron builds it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import megatron_soda.kernels  # noqa: F401  (interpreter switch on CPU)

BLOCK_R = 16  # rows per program on a GPU
INTERPRETER_BLOCK_R = 1024  # Triton's interpreter pays per program: few, large ones


@triton.jit
def _rope(
    x_ptr,
    f_ptr,
    y_ptr,
    n_rows,
    B,
    H,
    sx_s,
    sx_b,
    sx_h,
    sf_s,
    HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    s = rows // (B * H)
    b = (rows // H) % B
    h = rows % H
    cols = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (cols < HALF)[None, :]
    x_row = s.to(tl.int64) * sx_s + b.to(tl.int64) * sx_b + h.to(tl.int64) * sx_h
    f_row = s.to(tl.int64) * sf_s
    x1 = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_row[:, None] + HALF + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    f1 = tl.load(f_ptr + f_row[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    f2 = tl.load(f_ptr + f_row[:, None] + HALF + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    c1, s1, c2, s2 = tl.cos(f1), tl.sin(f1), tl.cos(f2), tl.sin(f2)
    if BACKWARD:  # the transpose of the forward rotation
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    out_row = rows.to(tl.int64) * (2 * HALF)
    tl.store(y_ptr + out_row[:, None] + cols[None, :], y1.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(y_ptr + out_row[:, None] + HALF + cols[None, :], y2.to(y_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    s, b, h, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    f = freqs.reshape(freqs.shape[0], d)
    if f.stride(-1) != 1:
        f = f.contiguous()
    y = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    rows = s * b * h
    if rows:
        half = d // 2
        block_r = BLOCK_R if x.is_cuda else INTERPRETER_BLOCK_R
        _rope[(triton.cdiv(rows, block_r),)](
            x,
            f,
            y,
            rows,
            b,
            h,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            f.stride(0),
            HALF=half,
            BLOCK_R=block_r,
            BLOCK_D=triton.next_power_of_2(half),
            BACKWARD=backward,
        )
    return y


class TritonRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, freqs: torch.Tensor):
        ctx.save_for_backward(freqs)
        return _launch(t, freqs, backward=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (freqs,) = ctx.saved_tensors
        return _launch(dy, freqs, backward=True), None


def supports(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool) -> bool:
    """The shapes this kernel covers: rotation over the whole head dimension, halves rotated."""
    return (
        not interleaved
        and t.dim() == 4
        and t.shape[-1] % 2 == 0
        and freqs.shape[-1] == t.shape[-1]
        and freqs.shape[0] == t.shape[0]
        and freqs.numel() == freqs.shape[0] * freqs.shape[-1]
    )


def fused_apply_rotary_pos_emb(
    t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False, interleaved: bool = False
) -> torch.Tensor:
    """megatron-core's `fused_apply_rotary_pos_emb` signature (its Transformer Engine binding);
    shapes outside `supports` go to megatron-core's own unfused implementation."""
    if not supports(t, freqs, interleaved):
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    return TritonRoPE.apply(t, freqs)
