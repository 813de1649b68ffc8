"""A megatron-core session of any layout inside this one process: torch's `fake` process-group
backend (every collective a no-op) with the world size and rank asked for, and megatron-core's real
`initialize_model_parallel` on top, so the model code builds exactly the shapes that rank of that
layout holds. What `soda plan` builds on the meta device and measures activations in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def import_megatron() -> None:
    """megatron-core without torch's compiler (the CPU backend's import), and CUDA redirected to the
    CPU, as on the CPU backend: the planner runs where no GPU is."""
    from megatron_soda.parallel.cpu_backend import enable, import_megatron

    import_megatron()
    enable()


@contextmanager
def fake_session(world: int, rank: int = 0, tp: int = 1, pp: int = 1, vpp: int = 1, cp: int = 1) -> Iterator[None]:
    """Rank `rank` of a `world`-rank job with this layout, in this process (no other process group
    may be open here)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import_megatron()
    if dist.is_initialized():
        raise RuntimeError("soda plan builds its own (fake) process group: one is already initialized here")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
            context_parallel_size=cp,
            create_gloo_process_groups=False,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
