"""Training data: a weighted mixture of shard sets, read by global sample index.

Why index-addressed rather than streamed: every sample has a global position g = 0, 1, 2, ...
computed from the seed alone (a blend of the shard sets by weight, each set walked through a
seeded Feistel permutation per epoch, as Marin/Levanter shuffle). Step s uses g in
[s * global_batch, (s + 1) * global_batch), each DP rank takes its contiguous slice, and the
DataLoader's workers fetch whole micro-batches. The loader's whole state is one integer,
`consumed_samples`: a resumed run sees exactly the batches an uninterrupted one would, with any
number of workers and also after a change of DP degree, and every sample of a set is seen exactly
once per epoch of that set.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tokenization.shards import TAR_BLOCK, ShardFormatError, ShardIndex, read_index
from tokenization.vocab import SodaLayout


class ShardReadError(RuntimeError):
    """A shard whose bytes are not what its index promised (truncated, overwritten, replaced)."""


# --- a seeded bijection on [0, n) ---------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread round function."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def feistel_permute(i: int, n: int, key: int, rounds: int = 4) -> int:
    """Position i of a pseudo-random permutation of range(n), in O(1) memory.

    A balanced Feistel network on the smallest even bit width covering n is a bijection on
    [0, 2^bits); cycle-walking (re-apply until the value falls below n) restricts it to [0, n).
    """
    if not 0 <= i < n:
        raise IndexError(f"{i} outside [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    lo_mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & lo_mask
        for r in range(rounds):
            left, right = right, left ^ (_mix(key ^ (r << 56) ^ right) & lo_mask)
        x = (left << half) | right
        if x < n:
            return x


# --- one shard set ------------------------------------------------------------------------------


class ShardSet:
    """Random access to the samples of one `soda prepare` output directory."""

    def __init__(self, root: str | Path, skip_corrupt: bool = False) -> None:
        self.index: ShardIndex = read_index(root)
        self.root = self.index.root
        self.width = self.index.width
        self.dtype = self.index.dtype
        self.sentinel = self.index.layout.pad_sentinel
        self.vocab_size = self.index.layout.vocab_size
        self.skip_corrupt = skip_corrupt
        self.skipped_shards: list[str] = []
        self.rows = self.index.rows  # 2: a loss-mask row follows the ids (fine-tuning sets)
        self._header = self.index.npy_header()
        self._data_bytes = self.rows * self.width * self.dtype.itemsize
        shards = []
        for rec in self.index.shards:
            if rec["samples"] == 0:
                continue
            problem = self._check_shard(rec)
            if problem is None:
                shards.append(rec)
            elif skip_corrupt:
                self.skipped_shards.append(problem)
            else:
                raise ShardReadError(problem + " (pass skip_corrupt / --data.skip_corrupt true to leave it out)")
        if not shards:
            raise ShardFormatError(f"{self.root}: no usable samples")
        self.shards = shards
        self.cumulative = np.cumsum([s["samples"] for s in shards])
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _check_shard(self, rec: dict) -> str | None:
        path = self.root / rec["file"]
        if not path.is_file():
            return f"{path}: shard missing"
        size = path.stat().st_size
        if size != rec["bytes"]:
            return f"{path}: {size} bytes, index says {rec['bytes']} (truncated or rewritten)"
        return None

    def __len__(self) -> int:
        return int(self.cumulative[-1])

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: descriptors are not shared
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.root / self.shards[shard]["file"], os.O_RDONLY)
        return fd

    def locate(self, k: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.cumulative, k, side="right"))
        start = int(self.cumulative[shard - 1]) if shard else 0
        return shard, k - start

    def read(self, k: int) -> tuple[np.ndarray, bool]:
        """Sample k as stored (seq_len + 1 ids), and whether it was replaced because it is corrupt."""
        tokens, _, corrupt = self.read_masked(k)
        return tokens, corrupt

    def read_masked(self, k: int) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """Sample k's ids, its 0/1 loss mask (None: every token is a target), and whether it was
        replaced (all padding) because it is corrupt."""
        shard, j = self.locate(k)
        rec = self.shards[shard]
        data_at = rec["data_offset"] + j * rec["stride"]
        head = TAR_BLOCK + len(self._header)
        raw = os.pread(self._fd(shard), head + self._data_bytes, data_at - head)
        name = f"{rec['key_prefix']}_{j:07d}.".encode()
        problem = None
        if len(raw) != head + self._data_bytes:
            problem = "short read"
        elif not raw[: len(name)] == name or raw[TAR_BLOCK:head] != self._header:
            problem = "member header does not match the index"
        else:
            data = np.frombuffer(raw, dtype=self.dtype, offset=head)
            tokens, mask = data[: self.width], (data[self.width :] if self.rows == 2 else None)
            bad = (tokens >= self.vocab_size) & (tokens != self.sentinel)
            if bad.any():
                problem = f"ids outside the vocabulary (max {int(tokens[bad].max())})"
            elif mask is not None and (mask > 1).any():
                problem = "loss mask holds values other than 0/1"
        if problem is None:
            return tokens, mask, False
        msg = f"{self.root / rec['file']}: sample {j}: {problem}"
        if not self.skip_corrupt:
            raise ShardReadError(msg)
        return np.full(self.width, self.sentinel, dtype=self.dtype), None, True


# --- the mixture --------------------------------------------------------------------------------


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # shard-set directories (outputs of `soda prepare`)
    val_paths: list[str] = field(default_factory=list)  # held-out shard sets for validation loss
    weights: list[float] | None = None  # sampling weights per path; default: proportional to size
    seed: int = 1234
    num_workers: int = 2
    skip_corrupt: bool = False
    blend_block: int = 4096  # mixture proportions are exact within every block of this many samples


def _block_counts(weights: np.ndarray, block: int) -> np.ndarray:
    """Largest-remainder apportionment of `block` samples to sets by weight."""
    raw = weights / weights.sum() * block
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: block - counts.sum()]:
        counts[i] += 1
    return counts


class MixtureDataset(Dataset):
    """Global sample index -> training sample; stateless, so any worker can serve any index."""

    def __init__(self, cfg: DataConfig, layout: SodaLayout | None = None, seq_len: int | None = None) -> None:
        if not cfg.paths:
            raise ValueError("data.paths: no shard sets given")
        self.cfg = cfg
        self.sets = [ShardSet(p, cfg.skip_corrupt) for p in cfg.paths]
        first = self.sets[0].index
        for s in self.sets:
            s.index.check_compatible(layout or first.layout, seq_len or first.seq_len)
        self.layout = layout or first.layout
        self.seq_len = first.seq_len
        weights = cfg.weights if cfg.weights is not None else [len(s) for s in self.sets]
        if len(weights) != len(self.sets) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"data.weights: expected {len(self.sets)} non-negative weights with a positive sum, got {weights}"
            )
        self.weights = np.asarray(weights, dtype=np.float64)
        self.block = cfg.blend_block
        self.counts = _block_counts(self.weights, self.block)
        self.pad_input = self.layout.eos_id

    def fingerprint(self) -> str:
        """Identity of the sample order: resuming under another one would silently change the data."""
        desc = {
            "sets": [[str(s.root), len(s), s.index.layout.fingerprint()] for s in self.sets],
            "counts": self.counts.tolist(),
            "seed": self.cfg.seed,
            "block": self.block,
        }
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of blocks, bounded; workers hold their own copies
    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(self.sets)), self.counts)
        np.random.default_rng([self.cfg.seed, b]).shuffle(labels)
        rank_in_block = np.zeros(self.block, dtype=np.int64)
        for d in range(len(self.sets)):
            where = labels == d
            rank_in_block[where] = np.arange(where.sum())
        return labels, rank_in_block

    def locate(self, g: int) -> tuple[int, int]:
        """Global index -> (set, sample within that set)."""
        b, o = divmod(g, self.block)
        labels, rank = self._block(b)
        d = int(labels[o])
        i = b * int(self.counts[d]) + int(rank[o])  # i-th draw from set d
        n = len(self.sets[d])
        epoch, j = divmod(i, n)
        return d, feistel_permute(j, n, _mix(self.cfg.seed * 1_000_003 + d * 7919 + epoch))

    def __len__(self) -> int:
        return 2**62  # an endless stream; epochs are per set

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([g])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A whole micro-batch in one int32 array with padding as -1: one tensor per batch is the
        cheapest thing to ship between worker processes (inputs, labels and the loss mask are
        derived afterwards by `split_batch`). Prompt tokens of fine-tuning samples (loss mask 0) go
        as -(id + 2), so the mask travels in the same tensor."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int32)
        corrupt = torch.zeros(len(indices), dtype=torch.bool)
        for row, g in enumerate(indices):
            d, k = self.locate(int(g))
            raw, mask, corrupt[row] = self.sets[d].read_masked(k)
            out[row] = raw
            if mask is not None:
                prompt = mask == 0
                out[row][prompt] = -out[row][prompt] - 2
            out[row][raw == self.sets[d].sentinel] = PAD
        return {"sample": torch.from_numpy(out), "index": torch.tensor(indices), "corrupt": corrupt}


def _collated(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch  # `__getitems__` already returns a batch


PAD = -1  # padding in collated samples


def split_batch(batch: dict[str, torch.Tensor], pad_input_id: int) -> dict[str, torch.Tensor]:
    """[B, seq_len + 1] samples -> model inputs, next-token labels and the loss mask.

    Padding never enters the loss; as an input position it reads `pad_input_id` (EOS), whose
    output is masked anyway. Prompt tokens (stored as -(id + 2)) are inputs but never labels.
    """
    sample = batch["sample"].long()
    valid = sample != PAD
    prompt = sample < PAD
    ids = torch.where(prompt, -sample - 2, sample)
    return {
        "tokens": torch.where(valid[:, :-1], ids[:, :-1], pad_input_id),
        "labels": torch.where(valid[:, 1:], ids[:, 1:], 0),
        "loss_mask": (valid[:, :-1] & valid[:, 1:] & ~prompt[:, 1:]).float(),
        "index": batch["index"],
        "corrupt": batch["corrupt"],
    }


# --- who reads what -----------------------------------------------------------------------------


class GlobalBatchSampler:
    """Micro-batches of global indices for one DP rank, from `consumed_samples` on (Megatron order)."""

    def __init__(
        self, consumed_samples: int, micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int
    ):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by micro batch {micro_batch_size} x DP {dp_size}"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        self.consumed = consumed_samples
        self.mbs, self.gbs, self.rank, self.dp = micro_batch_size, global_batch_size, dp_rank, dp_size

    def __iter__(self):
        per_rank = self.gbs // self.dp
        start = self.consumed
        while True:
            base = start + self.rank * per_rank
            for m in range(0, per_rank, self.mbs):
                yield list(range(base + m, base + m + self.mbs))
            start += self.gbs


class SodaDataLoader:
    """Iterates this rank's micro-batches; `state_dict()` goes into every checkpoint."""

    def __init__(
        self,
        dataset: MixtureDataset,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int | None = None,
        consumed_samples: int = 0,
    ) -> None:
        self.dataset = dataset
        self.mbs, self.gbs, self.dp_rank, self.dp_size = micro_batch_size, global_batch_size, dp_rank, dp_size
        self.num_workers = dataset.cfg.num_workers if num_workers is None else num_workers
        self.consumed_samples = consumed_samples
        self.corrupt_samples = 0
        GlobalBatchSampler(0, micro_batch_size, global_batch_size, dp_rank, dp_size)  # validates the shape now
        self._iter = None

    def __iter__(self):
        sampler = GlobalBatchSampler(self.consumed_samples, self.mbs, self.gbs, self.dp_rank, self.dp_size)
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            collate_fn=_collated,
            prefetch_factor=4 if self.num_workers else None,
            pin_memory=torch.cuda.is_available(),
        )
        for batch in loader:
            # every DP rank takes one micro-batch at a time in lockstep: the global position moves
            # by one micro-batch per rank
            self.consumed_samples += self.mbs * self.dp_size
            self.corrupt_samples += int(batch["corrupt"].sum())
            yield split_batch(batch, self.dataset.pad_input)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "fingerprint": self.dataset.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.dataset.fingerprint():
            raise ValueError(
                "data loader state was saved for other data (shard sets, weights, seed or block differ): "
                f"checkpoint {state.get('fingerprint')} vs now {self.dataset.fingerprint()}"
            )
        self.consumed_samples = int(state["consumed_samples"])
