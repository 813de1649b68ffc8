"""Run megatron-core's real TP/PP/DP code on CPU processes over gloo (`--device cpu`).

megatron-core assumes CUDA in a handful of places: tensor factories with device="cuda" or
`torch.cuda.current_device()`, `torch.cuda.synchronize`, the CUDA RNG state of its tensor-parallel
RNG tracker, and `param.type() == 'torch.cuda.FloatTensor'` checks in the optimizer; and its
checkpoint writer starts a spawn-context Manager that exists to keep CUDA out of a fork. `enable()`
redirects exactly those to the CPU, for the whole process, and is only ever called when the CPU
backend was asked for or no GPU exists, so the CUDA path is never touched. fp32 only: it is for
debugging a layout, CI and the demo, not for speed.

The redirected symbols are pinned to megatron-core 0.16.x; `check_symbols()` fails loudly (and a
test calls it) if an upgrade moves one.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


class _CudaToCpu(TorchFunctionMode):
    """device="cuda" in factories and .to() becomes "cpu"; Tensor.cuda() is the identity; and
    pin_memory=True is dropped (the CPU build refuses it: "requires a CUDA or other accelerator
    backend"; megatron-core's RoPE slicing for context parallelism asks for it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            kwargs = dict(kwargs, pin_memory=False)
        name = getattr(func, "__name__", "")
        if name == "to" and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        elif name == "cuda":
            return args[0]
        return func(*args, **kwargs)


def check_symbols() -> None:
    """The megatron-core internals this module replaces must still exist where we expect them."""
    import megatron.core.optimizer.optimizer as mopt
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.tensor_parallel import random as mrandom

    for owner, name in [
        (filesystem_async, "_get_write_results_queue"),
        (filesystem_async, "_results_queue"),
        (mrandom, "_get_cuda_rng_state"),
        (mrandom, "_set_cuda_rng_state"),
        (mrandom, "CudaRNGStatesTracker"),
        (mopt, "clip_grad_by_total_norm_fp32"),
    ]:
        if not hasattr(owner, name):
            raise RuntimeError(
                f"CPU backend: megatron-core moved {owner.__name__}.{name}; "
                "update megatron_soda/parallel/cpu_backend.py"
            )


def import_megatron() -> None:
    """Import megatron-core for a CPU-backend process without torch's compiler: megatron decorates
    ~40 fused helpers with `torch.compile` at import (`megatron.core.jit.jit_fuser`), which imports
    torch's whole compiler stack, ~2 s per process; the CPU backend runs none of them (the fusions
    are off), so here they stay plain functions. Call before anything imports megatron."""
    import sys

    if "megatron.core" in sys.modules:
        return
    real = torch.compile

    def plain(model=None, **kwargs):
        return model if model is not None else (lambda fn: fn)

    torch.compile = plain
    try:
        import megatron.core.dist_checkpointing  # noqa: F401
        import megatron.core.jit  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401
    finally:
        torch.compile = real


def enable() -> None:
    global _ENABLED
    if _ENABLED:
        return
    check_symbols()
    import megatron.core.optimizer.optimizer as mopt
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.utils import to_local_if_dtensor

    # 1. devices: ~100 buffers are created on torch.cuda.current_device() or device="cuda"
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self
    _CudaToCpu().__enter__()  # stays active for the life of the process

    # 2. the tensor-parallel RNG tracker keeps CUDA generator states: keep CPU ones instead
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    def add(self, name, seed):
        if seed in self.seeds_ or name in self.states_:
            raise Exception(f"rng state {name} / seed {seed} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    mrandom.CudaRNGStatesTracker.add = add

    # 3. the optimizer asserts grads are torch.cuda.FloatTensor before clipping / sharding
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        params = [parameters] if isinstance(parameters, torch.Tensor) else parameters
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [to_local_if_dtensor(getattr(p, attr)).detach() for p in params if getattr(p, attr, None) is not None]
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            torch._foreach_mul_(grads, coeff)

    mopt.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kw):
        if dtype is None and not kw:
            s = original_type(self)
            if self.device.type == "cpu" and s.startswith("torch.") and not s.startswith("torch.cuda."):
                return "torch.cuda." + s[len("torch.") :]
            return s
        return original_type(self, dtype, non_blocking, **kw)

    torch.Tensor.type = tensor_type

    # 4. dist_checkpointing's writer collects results through a spawn-context Manager, started at a
    # process's first save: a fresh interpreter re-importing the entry module, 2-5 s per process on
    # a small CPU machine. Spawn protects a CUDA context from fork; there is none here (megatron
    # forks its writer processes anyway), so the CPU backend gives it a fork-context Manager.
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def fork_results_queue():
        if filesystem_async._results_queue is None:
            import functools
            import multiprocessing as mp
            import os
            from multiprocessing.managers import SyncManager

            from megatron_soda.parallel.processes import die_with_parent

            manager = SyncManager(ctx=mp.get_context("fork"))
            manager.start(functools.partial(die_with_parent, os.getpid()))  # never outlives this rank
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    filesystem_async._get_write_results_queue = fork_results_queue
    _ENABLED = True
