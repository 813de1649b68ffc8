"""Triton kernels: the fused codec-embedding lookup and the fused output-layer cross-entropy.

On a machine without a GPU Triton only runs in its interpreter; importing this package there turns
the interpreter on (TRITON_INTERPRET=1) before Triton is imported, so the same kernels are tested
on CPU tensors in CI. fp32 on CPU: the interpreter's bf16 arithmetic is not trustworthy.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
