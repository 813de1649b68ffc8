"""Gradient norm, clipping and the main-to-model weight copy over many tensors at once, without apex.

Without apex or Transformer Engine megatron-core falls back to loops in Python: its grad-norm
fallback turns every parameter's norm into a Python float (one GPU-to-host sync per parameter, ~200
per step for the 1.7B preset), and clipping and the fp32 -> bf16 weight copy launch one kernel per
parameter. torch's foreach ops do each in a handful of kernels with no sync. The functions have
apex's `amp_C` names and arguments, so megatron-core's `multi_tensor_applier` calls them unchanged.
"""

from __future__ import annotations

import torch


def multi_tensor_l2norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list, per_tensor: bool, *args):
    """(global L2 norm as a 1-element fp32 tensor, per-tensor norms or None) of tensor_lists[0]."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch.stack(torch._foreach_norm(tensors)).float()
    return torch.linalg.vector_norm(norms).reshape(1), (norms if per_tensor else None)


def multi_tensor_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list, scale: float) -> None:
    """tensor_lists[1][i] = tensor_lists[0][i] * scale (dtype converted; in place when they coincide)."""
    src, dst = tensor_lists
    if not src:
        return
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    elif scale == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))
