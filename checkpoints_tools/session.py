"""A one-process megatron-core session (TP = PP = DP = 1) for offline checkpoint tools.

dist_checkpointing reshards on load, so a checkpoint written under any TP/PP/DP layout comes back
whole in a single process; the conversions then work on plain full tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from megatron_soda.config import ModelConfig, ParallelConfig


@contextmanager
def single_process(seed: int = 1234) -> Iterator[None]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megatron_soda.parallel.setup import init_distributed

    init_distributed("cpu")  # offline tools run on CPU: a checkpoint of any size converts on a CPU node
    ps.initialize_model_parallel(1, 1)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def build_full_model(m: ModelConfig):
    """The whole model in one process, with the reference (torch) implementation of every seam
    (build_model's default): the tools need plain logits, and the parameters are the same whichever
    path trained them."""
    from megatron_soda.model.gpt import build_model

    (model,), _ = build_model(m, ParallelConfig(), torch.float32, cuda=False)
    return model.eval()
