"""megatron-soda: 3D-parallel training of SODA audio foundation models on megatron-core."""

import os as _os

__version__ = "0.1.0"


def _cpu_only() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


# Without a GPU, Triton kernels only run in Triton's interpreter, and `@triton.jit` picks interpreted
# or compiled at decoration time, including Triton's own helpers (tl.zeros, tl.sum ...) decorated when
# megatron-core first imports Triton. So the switch must be set before anything imports Triton.
if _cpu_only():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
