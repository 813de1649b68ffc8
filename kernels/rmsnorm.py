"""RMSNorm forward and backward in Triton: the layer norms and the QK-norm of every layer.

torch's RMSNorm backward on the GPU runs the generic layer-norm reduction (GammaBetaBackward) for
the weight gradient, which the H100 profiles showed at 9-18% of a training step. Here one kernel
normalises a block of rows in fp32 and writes the output in the input's dtype, keeping the inverse
RMS per row for the backward. The backward is two launches, as torch's: one pass over the rows,
where each program writes d(input) for the row blocks it visits and its fp32 partial sum of
d(weight) over them into its own row of a [programs, hidden] buffer (every row written, so the
buffer needs no zeroing), then one small kernel that sums those partial rows per column in fp32 and
writes d(weight) in the weight's dtype (no separate cast). The first version launched four (zeros,
the kernel, torch's sum, a cast). Rows are the flattened leading dimensions, so the same kernels
serve hidden states [s, b, h] and per-head query/key vectors [s, b, heads, head_dim] (QK-norm, head
dim 64 or 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import megatron_soda.kernels  # noqa: F401  (interpreter switch on CPU)

MAX_BLOCK_ELEMENTS = 4096  # rows x columns held by one program on a GPU
INTERPRETER_BLOCK_ELEMENTS = 1 << 16  # Triton's interpreter pays per program: few, large ones
PROGRAMS_PER_SM = 4  # backward programs per SM: the GPU filled, the partial d(weight) rows few
INTERPRETER_PROGRAMS = 2
DW_BLOCK_P, DW_BLOCK_N = 32, 128  # the d(weight) sum: partial rows x columns per step of one program


@triton.jit
def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, N: tl.constexpr, eps, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ok = (rows < n_rows)[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rms_bwd(
    x_ptr,
    w_ptr,
    dy_ptr,
    rstd_ptr,
    dx_ptr,
    dw_part_ptr,
    n_rows,
    N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program p visits row blocks p, p + P, p + 2P, ... (P programs, P <= the number of row blocks,
    so each visits at least one); writes d(input) for them and its partial d(weight) (fp32) to row p
    of `dw_part` [P, N]."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], tl.float32)
    for start in range(pid * BLOCK_M, n_rows, n_prog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        xhat = x * rstd[:, None]
        dyw = dy * w[None, :]
        mean = tl.sum(dyw * xhat, axis=1) / N
        dx = (dyw - xhat * mean[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_part_ptr + pid * N + cols, dw, mask=col_ok)


@triton.jit
def _dw_sum(part_ptr, dw_ptr, n_part, N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """d(weight)[cols] = sum over the partial rows of `part` [n_part, N] (fp32), in the weight's dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for p0 in range(0, n_part, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        ok = (rows < n_part)[:, None] & col_ok[None, :]
        acc += tl.sum(tl.load(part_ptr + rows[:, None] * N + cols[None, :], mask=ok, other=0.0), axis=0)
    tl.store(dw_ptr + cols, acc.to(dw_ptr.dtype.element_ty), mask=col_ok)


def _num_warps(block_n: int) -> int:
    """Wide rows get more warps per program (Liger-Kernel's rule for its norms); 4 below 2048 columns."""
    return 16 if block_n >= 8192 else 8 if block_n >= 2048 else 4


def _blocks(n: int, device: torch.device) -> tuple[int, int]:
    block_n = triton.next_power_of_2(n)
    if device.type != "cuda":
        return max(1, INTERPRETER_BLOCK_ELEMENTS // block_n), block_n
    return max(1, min(64, MAX_BLOCK_ELEMENTS // block_n)), block_n


def _num_programs(n_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU, few enough that summing their partial d(weight) is cheap."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_blocks, PROGRAMS_PER_SM * sms))
    return max(1, min(n_blocks, INTERPRETER_PROGRAMS))  # the interpreter: few programs, each looping over many rows


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        rows = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block_m, block_n = _blocks(n, x.device)
        if rows:
            _rms_fwd[(triton.cdiv(rows, block_m),)](
                x2, weight, y, rstd, rows, N=n, eps=eps, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_n)
            )
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n = x2.shape[1]
        rows = x2.shape[0]
        dy2 = dy.reshape(-1, n).contiguous()
        dx = torch.empty_like(x2)
        block_m, block_n = _blocks(n, x2.device)
        if not rows:
            return dx.view(dy.shape), torch.zeros_like(weight), None
        progs = _num_programs(triton.cdiv(rows, block_m), x2.device)
        dw_part = torch.empty(progs, n, dtype=torch.float32, device=x2.device)  # every row written
        _rms_bwd[(progs,)](
            x2,
            weight,
            dy2,
            rstd,
            dx,
            dw_part,
            rows,
            N=n,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=_num_warps(block_n),
        )
        dw = torch.empty_like(weight)
        _dw_sum[(triton.cdiv(n, DW_BLOCK_N),)](dw_part, dw, progs, N=n, BLOCK_P=DW_BLOCK_P, BLOCK_N=DW_BLOCK_N)
        return dx.view(dy.shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension, statistics in fp32."""
    return TritonRMSNorm.apply(x, weight, eps)
