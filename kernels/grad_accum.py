"""Weight gradients accumulated straight into megatron's fp32 `main_grad`, without apex.

megatron-core's linears can skip their bf16 weight gradient and the separate fp32 `main_grad +=
grad` that follows (8% of a 1.7B step on the H100) when apex's `fused_weight_gradient_mlp_cuda`
extension exists (`gradient_accumulation_fusion`). torch's GEMM with an output dtype
(`torch.addmm(..., out_dtype=torch.float32)`, CUDA, bf16 inputs) does the same: the product of the
bf16 operands is accumulated by cuBLAS into the fp32 buffer in place. The functions below have
apex's names and arguments, so megatron-core calls them unchanged; `add_wgrad_` is the one
primitive, also used by the fused embedding and fused cross-entropy backward.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("soda")

_PATH: dict[tuple, str] = {}  # (device type, operand dtype, accumulator dtype) -> the form that works there


def _accumulate(path: str, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if path == "addmm_":
        out.addmm_(a, b)
    elif path == "out_dtype_inplace":
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    elif path == "out_dtype_add":
        out.add_(torch.mm(a, b, out_dtype=out.dtype))
    else:
        out.add_(a @ b)


def _select(device: torch.device, operand: torch.dtype, accum: torch.dtype) -> str:
    """The first form that this torch supports on this device AND that accumulates correctly, checked
    on a small product (a GEMM that overwrote instead of adding would otherwise pass silently)."""
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(8, 16, generator=g), torch.randn(16, 4, generator=g)
    a, b = a32.to(device, operand), b32.to(device, operand)
    base = torch.randn(8, 4, generator=g)
    want = base + a.float().cpu() @ b.float().cpu()
    for path in ("out_dtype_inplace", "out_dtype_add", "cast_add"):
        out = base.to(device, accum)
        try:
            _accumulate(path, out, a, b)
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        if torch.allclose(out.float().cpu(), want, atol=0.05, rtol=0.02):
            log.info("weight-gradient accumulation on %s, %s into %s: %s", device.type, operand, accum, path)
            return path
    raise RuntimeError(f"no working weight-gradient accumulation for {operand} into {accum} on {device}")


def add_wgrad_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, where out may be wider (fp32) than a and b (bf16): in place with an fp32 GEMM
    output where this torch supports it, else an fp32 product then an add, else a product in the
    operands' dtype then an add (chosen once per device and dtypes, before any CUDA graph capture)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
        return
    key = (out.device.type, a.dtype, out.dtype)
    if key not in _PATH:
        _PATH[key] = _select(out.device, a.dtype, out.dtype)
    _accumulate(_PATH[key], out, a, b)


def wgrad_path(device: str, operand: torch.dtype, accum: torch.dtype = torch.float32) -> str | None:
    """Which form `add_wgrad_` settled on (None before its first call there)."""
    return _PATH.get((device, operand, accum))


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """apex's signature: main_grad [out, in] (fp32) += grad_output[N, out]^T @ total_input[N, in]."""
    add_wgrad_(
        main_grad, grad_output.reshape(-1, grad_output.shape[-1]).t(), total_input.reshape(-1, total_input.shape[-1])
    )


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same into a bf16/fp16 main_grad (megatron calls it when gradients are kept in 16 bits)."""
    wgrad_gemm_accum_fp32(total_input, grad_output, main_grad)


def finish_main_grad(weight: torch.Tensor) -> torch.Tensor | None:
    """megatron's protocol after writing a weight's gradient into `weight.main_grad` directly: mark
    it so the DDP hook does not add it again, and hand autograd an uninitialised gradient of the
    weight's shape (the hook then runs on the main thread, as megatron's own linears arrange)."""
    if hasattr(weight, "grad_added_to_main_grad"):
        weight.grad_added_to_main_grad = True
        if getattr(weight, "zero_out_wgrad", False):
            return torch.zeros(weight.main_grad.shape, dtype=weight.dtype, device=weight.device)
        return torch.empty(weight.main_grad.shape, dtype=weight.dtype, device=weight.device)
    return None


def accumulates_into_main_grad(weight: torch.Tensor) -> bool:
    """True when megatron's DDP gave this weight an fp32 `main_grad` buffer to accumulate into."""
    return getattr(weight, "main_grad", None) is not None
