"""Initial weights that depend on (seed, parameter, element) only, not on the parallel layout.

megatron-core draws each rank's shard from that rank's RNG stream, so the same seed gives a
different model under TP=2 x PP=2 than in one process, and a run's loss curve cannot be reproduced
on another cluster shape. Here every matrix element is a function of the seed, the parameter's
layout-free name and the element's index in the whole (TP=1, PP=1) tensor: a counter-based
generator (splitmix64 hashes of the index, Box-Muller to a normal) that each rank evaluates for its
own shard only. Where a shard lies in the whole tensor comes from megatron-core's
`sharded_state_dict` (the map its distributed checkpoints use to load under any layout), so the
layer offsets of pipeline stages and the interleaved halves of the SwiGLU fc1 shards are its, not
re-derived here. Nothing bigger than a block of the local shard is ever materialised.
Norm scales keep their ones.
"""

from __future__ import annotations

import hashlib
import math

import torch

BLOCK_ELEMENTS = 1 << 22  # generated at a time (int64 + float64 temporaries: ~100 MB)
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic): a bijective 64-bit hash."""
    z = x + _i64(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _i64(_M1)
    z = (z ^ _shr(z, 27)) * _i64(_M2)
    return z ^ _shr(z, 31)


def _key(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def counter_normal(seed: int, name: str, index: torch.Tensor) -> torch.Tensor:
    """N(0, 1) samples (float64), one per int64 element index, the same on every device and rank."""
    base = splitmix64(torch.full_like(index, _key(seed, name)))
    u1 = _shr(splitmix64(base ^ (2 * index)), 11).to(torch.float64) * 2.0**-53
    u2 = _shr(splitmix64(base ^ (2 * index + 1)), 11).to(torch.float64) * 2.0**-53
    return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2 * math.pi * u2)


def _global_index(shape: tuple[int, ...], offset: tuple[int, ...], global_shape: tuple[int, ...], rows, device):
    """int64 indices in the whole tensor of local rows `rows` of a shard at `offset`."""
    strides = [1] * len(global_shape)
    for d in range(len(global_shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * global_shape[d + 1]
    lead = len(global_shape) - len(shape)  # megatron prepends e.g. the layer axis
    index = torch.zeros((), dtype=torch.int64, device=device)
    index = index + sum(offset[d] * strides[d] for d in range(lead))
    for d, size in enumerate(shape):
        local = rows if d == 0 else torch.arange(size, device=device)
        coord = (local + offset[lead + d]) * strides[lead + d]
        index = index.unsqueeze(-1) + coord if d else index + coord
    return index


def _shards(chunk) -> list:
    """The ShardedTensors of a model chunk's parameters (factories built into their parts)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = []
    for item in nested_values(chunk.sharded_state_dict()):
        if isinstance(item, ShardedTensorFactory):
            out += [t for t in nested_values(item.build()) if isinstance(t, ShardedTensor)]
        elif isinstance(item, ShardedTensor):
            out.append(item)
    return out


@torch.no_grad()
def layout_invariant_init(chunks: list, std: float, seed: int) -> int:
    """Overwrite every weight matrix of this rank's chunks with N(0, std) values that are a function
    of (seed, name, whole-tensor index); returns how many parameters it set. Call before the DDP
    wrapper copies the weights (and before any optimizer exists)."""
    done = 0
    for chunk in chunks:
        params = {p.untyped_storage().data_ptr(): p for p in chunk.parameters()}
        covered = set()
        for sh in _shards(chunk):
            data = sh.data
            ptr = data.untyped_storage().data_ptr() if torch.is_tensor(data) else None
            if ptr not in params or data.dim() < 2 or sh.flattened_range is not None:
                continue  # norm scales (ones), extra state, anything not a weight matrix
            rows_per_block = max(1, BLOCK_ELEMENTS // max(1, data[0].numel()))
            for r0 in range(0, data.shape[0], rows_per_block):
                rows = torch.arange(r0, min(r0 + rows_per_block, data.shape[0]), device=data.device)
                index = _global_index(
                    tuple(data.shape), tuple(sh.global_offset), tuple(sh.global_shape), rows, data.device
                )
                data[rows] = (counter_normal(seed, sh.key, index) * std).to(data.dtype)
            covered.add(ptr)
        missing = [
            n for n, p in chunk.named_parameters() if p.dim() >= 2 and p.untyped_storage().data_ptr() not in covered
        ]
        if missing:
            raise RuntimeError(f"layout-invariant init found no shard map for {missing[:3]}")
        done += len(covered)
    return done
