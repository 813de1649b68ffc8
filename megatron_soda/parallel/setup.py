"""Processes, devices and megatron-core's process groups: the one place a run becomes N ranks.

torchrun and SLURM both set the environment this reads; NCCL on GPU, gloo with the CPU backend
(used only when asked or when no GPU exists, so the CUDA path never sees it).
"""

from __future__ import annotations

import os
import resource
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_soda.config import ConfigError, SodaConfig, data_parallel_size


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device cuda: torch sees no GPU (use --device cpu for the CPU backend)")
    return name


def init_distributed(device: str) -> None:
    """torchrun/SLURM environment -> process group (NCCL on GPU, gloo with the CPU backend)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun with one task per device
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from megatron_soda.parallel.processes import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", timeout=timedelta(minutes=10))
    else:
        from megatron_soda.parallel import cpu_backend

        cpu_backend.enable()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        dist.init_process_group("gloo", timeout=timedelta(seconds=int(os.environ.get("SODA_GLOO_TIMEOUT_S", "300"))))


def setup_parallel(cfg: SodaConfig, graph_safe_rng: bool = False) -> int:
    """Process groups for TP x PP x CP x DP (megatron-core's order tp-cp-ep-dp-pp: CP peers sit TP
    ranks apart, inside a node) and the seeded RNG trackers of a validated config; returns the DP
    degree. `graph_safe_rng`: CUDA graphs need megatron's graph-safe tracker (generator objects a
    graph can register) from the start."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    dp = data_parallel_size(cfg.parallel, dist.get_world_size())
    p = cfg.parallel
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
        context_parallel_size=p.cp,
    )
    torch.manual_seed(cfg.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed, use_cudagraphable_rng=graph_safe_rng)
    return dp


def node_name() -> str:
    """The node this rank runs on: SLURM's name for it where SLURM started us (several SLURM nodes
    can share a host, and clusters name nodes apart from their hostnames), else the hostname."""
    import socket

    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def rank_layout() -> list[dict]:
    """Where every rank runs and which TP/PP/DP coordinates it holds (a collective: every rank
    calls it). A tensor-parallel group spread over nodes sends every layer's all-reduce over the
    network; this is how a launch is checked for it."""
    from megatron.core import parallel_state as ps

    mine = {
        "rank": dist.get_rank(),
        "node": node_name(),
        "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "cp_rank": ps.get_context_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
    }
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def tp_groups_across_nodes(layout: list[dict]) -> list[list[int]]:
    """The tensor-parallel groups (as rank lists) whose ranks are not all on one node."""
    groups: dict[tuple[int, int, int], list[dict]] = {}
    for r in layout:
        groups.setdefault((r["pp_rank"], r.get("cp_rank", 0), r["dp_rank"]), []).append(r)
    return [[r["rank"] for r in g] for g in groups.values() if len({r["node"] for r in g}) > 1]


def teardown() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: str) -> float:
    """The most memory this process has held: allocated device memory on GPU (since the last
    `reset_peak_memory`), the process's peak resident set on CPU (its lifetime)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
