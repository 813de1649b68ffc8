"""Parameter shapes of a run's model, from the model itself: built once on the meta device by
`model/gpt.py:build_model` in a one-rank megatron session (TP = PP = 1), which takes a fraction of
a second even at 4B (torch's meta device as the default device plus megatron's
`use_cpu_initialization`, which creates every weight with a plain `torch.empty` that the meta
device turns into a shape without storage).

What one rank of a layout holds follows from that model by megatron-core's own rules, each checked
against a meta build at that layout by tests/test_plan.py:
- TP: every parameter megatron marks `tensor_model_parallel` is split along its `partition_dim`
  (QKV, FC1 and the vocabulary rows by output, attention projection and FC2 by input); norms are
  replicated;
- PP / VPP: chunk v of pipeline rank r holds layers [(v pp + r) l, (v pp + r + 1) l), l = L / (pp vpp);
  the embedding sits on the first chunk of the first rank, the final norm and the output layer on
  the last chunk of the last rank;
- DDP and the distributed optimizer: megatron's `_ParamAndGradBuffer` layout (parameters in reverse
  order into buckets of 40M elements with overlap_grad_reduce, on the first chunk of the first
  pipeline rank only, else one bucket per chunk; with the distributed optimizer each parameter
  starts on a multiple of 64 and each bucket is padded to a multiple of lcm(DP, 128), so it shards
  evenly over DP);
- finalize_model_grads all-reduces over TP the gradients of the QK-norm weights, and of every norm
  weight under sequence parallelism.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    partition_dim: int | None  # TP splits this dimension (None: every TP rank holds it whole)
    part: str  # embedding, layer, final_norm, output
    layer: int | None  # decoder layer index (part == "layer")
    norm: bool  # a norm weight (all-reduced over TP under sequence parallelism)
    qk_norm: bool  # a QK-norm weight (all-reduced over TP whenever TP > 1)
    shared_embedding: bool = False


def model_key(m) -> tuple:
    """A hashable key of a ModelConfig (what the shapes depend on)."""
    return tuple(sorted(dataclasses.asdict(m).items()))


@functools.lru_cache(maxsize=16)
def _model_params(key: tuple) -> tuple[Param, ...]:
    import torch

    from megatron_soda.config import ModelConfig, ParallelConfig
    from megatron_soda.model.gpt import build_model
    from megatron_soda.tools.plan.session import fake_session

    m = ModelConfig(**dict(key))
    m.transformer_impl = "local"
    with fake_session(1), torch.device("meta"):
        (model,), _ = build_model(m, ParallelConfig(), torch.bfloat16, cuda=False)
        out = []
        for name, p in model.named_parameters():
            if name.startswith("embedding."):
                part, layer = "embedding", None
            elif name.startswith("decoder.layers."):
                part, layer = "layer", int(name.split(".")[2])
            elif name.startswith("decoder.final_layernorm"):
                part, layer = "final_norm", None
            else:
                part, layer = "output", None
            split = getattr(p, "tensor_model_parallel", False)
            out.append(
                Param(
                    name=name,
                    shape=tuple(p.shape),
                    partition_dim=p.partition_dim if split else None,
                    part=part,
                    layer=layer,
                    norm=hasattr(p, "sequence_parallel") and p.dim() == 1,
                    qk_norm="q_layernorm" in name or "k_layernorm" in name,
                    shared_embedding=bool(getattr(p, "shared_embedding", False)),
                )
            )
    return tuple(out)


def model_params(m) -> tuple[Param, ...]:
    """Every parameter of the whole model (TP = PP = 1), in module order."""
    return _model_params(model_key(m))


def chunk_layers(num_layers: int, pp: int, vpp: int, rank: int, chunk: int) -> range:
    per = num_layers // (pp * vpp)
    start = (chunk * pp + rank) * per
    return range(start, start + per)


def rank_params(m, tp: int, pp: int, vpp: int, rank: int, chunk: int) -> list[tuple[Param, int]]:
    """(parameter, elements on this rank) of chunk `chunk` of pipeline rank `rank`, in module order."""
    layers = set(chunk_layers(m.num_layers, pp, vpp, rank, chunk))
    first, last = rank == 0 and chunk == 0, rank == pp - 1 and chunk == vpp - 1
    out = []
    for p in model_params(m):
        keep = (
            (p.part == "embedding" and first)
            or (p.part == "layer" and p.layer in layers)
            or (p.part in ("final_norm", "output") and last)
        )
        if not keep:
            continue
        shape = list(p.shape)
        if p.partition_dim is not None:
            shape[p.partition_dim] //= tp
        out.append((p, math.prod(shape)))
    if m.tie_embeddings and pp > 1 and rank == pp - 1 and chunk == vpp - 1:  # the LM head's copy of the embedding
        emb = next(p for p in model_params(m) if p.part == "embedding")
        out.append((dataclasses.replace(emb, part="output", shared_embedding=True), math.prod(emb.shape) // tp))
    return out


def buckets(numels: list[int], shared: list[bool], dp: int, distributed_optimizer: bool, bucket_size: int | None):
    """megatron-core 0.16's `_ParamAndGradBuffer` layout of parameters (module order) -> (buffer
    elements with padding, each bucket's elements)."""

    def pad(x: int, d: int) -> int:
        return int(math.ceil(x / d) * d)

    def end_pad(x: int) -> int:
        return pad(x, math.lcm(dp, 128)) if distributed_optimizer else x

    def start_pad(x: int) -> int:
        return pad(x, 64) if distributed_optimizer else x

    out: list[tuple[int, int]] = []
    start = bucket_start = 0
    n_in_bucket = 0
    end = 0
    for numel, is_shared in zip(reversed(numels), reversed(shared), strict=True):
        start = start_pad(start)
        own = is_shared and distributed_optimizer
        if own and n_in_bucket:
            e = end_pad(start)
            out.append((bucket_start, e))
            bucket_start, start, n_in_bucket = e, e, 0
        end = start + numel
        n_in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own:
            e = end_pad(end)
            out.append((bucket_start, e))
            bucket_start, start, n_in_bucket = e, e, 0
        else:
            start = end
    if n_in_bucket:
        out.append((bucket_start, end_pad(end)))
    total = out[-1][1] if out else 0
    return total, [b - a for a, b in out]


@dataclass
class ChunkState:
    layers: int
    first: bool  # holds the embedding
    last: bool  # holds the final norm, output layer and loss
    params: int  # elements on this rank
    buffer: int  # DDP gradient buffer elements (padding included)
    buckets: list[int]  # elements per bucket (what DP reduces, one collective each)
    tp_reduced_qk: int  # QK-norm weight elements (gradients all-reduced over TP when TP > 1)
    tp_reduced_norm: int  # every norm weight's elements (all-reduced over TP under SP)
    embedding: int  # word-embedding elements on this chunk (tied embeddings: all-reduced over PP ends)


@dataclass
class StageState:
    rank: int
    chunks: list[ChunkState]

    @property
    def params(self) -> int:
        return sum(c.params for c in self.chunks)

    @property
    def buffer(self) -> int:
        return sum(c.buffer for c in self.chunks)


def stage_state(m, tp: int, pp: int, vpp: int, dp_cp: int, rank: int, distributed_optimizer: bool, overlap: bool):
    """What pipeline rank `rank` holds: per chunk its parameters, DDP buffer and buckets."""
    chunks = []
    for v in range(vpp):
        params = rank_params(m, tp, pp, vpp, rank, v)
        # buckets only with overlap, on the first chunk of the first pipeline rank (megatron: DP
        # communication on later stages is off the critical path)
        bucket_size = max(40_000_000, 1_000_000 * dp_cp) if overlap and v == 0 and rank == 0 else None
        total, sizes = buckets(
            [n for _, n in params], [p.shared_embedding for p, _ in params], dp_cp, distributed_optimizer, bucket_size
        )
        chunks.append(
            ChunkState(
                layers=len(chunk_layers(m.num_layers, pp, vpp, rank, v)),
                first=rank == 0 and v == 0,
                last=rank == pp - 1 and v == vpp - 1,
                params=sum(n for _, n in params),
                buffer=total,
                buckets=sizes,
                tp_reduced_qk=sum(n for p, n in params if p.qk_norm),
                tp_reduced_norm=sum(n for p, n in params if p.norm),
                embedding=sum(n for p, n in params if p.part == "embedding" or p.shared_embedding),
            )
        )
    return StageState(rank=rank, chunks=chunks)


def meta_ddp_buffers(cfg, world: int, rank: int) -> list[tuple[int, list[int]]]:
    """(buffer elements, bucket elements) per model chunk of `rank`, from megatron's own DDP built on
    the meta device at the config's layout: what `stage_state` is checked against."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module
    from torch.overrides import TorchFunctionMode

    from megatron_soda.model.gpt import build_model
    from megatron_soda.tools.plan.session import fake_session

    class OnMeta(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if "device" in kwargs:
                kwargs = dict(kwargs, device="meta")
            return func(*args, **kwargs)

    p = cfg.parallel
    m = dataclasses.replace(cfg.model, transformer_impl="local")
    with fake_session(world, rank, tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp), torch.device("meta"), OnMeta():
        chunks, _ = build_model(m, p, torch.bfloat16, cuda=False)
        out = []
        for i, c in enumerate(chunks):
            ddp = DistributedDataParallel(
                config=c.config,
                ddp_config=DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True,
                    overlap_grad_reduce=p.overlap_grad_reduce,
                    use_distributed_optimizer=p.distributed_optimizer,
                ),
                module=Float16Module(c.config, c),
                disable_bucketing=i > 0,
            )
            out += [(b.numel, [bk.grad_data.numel() for bk in b.buckets]) for b in ddp.buffers]
    return out
