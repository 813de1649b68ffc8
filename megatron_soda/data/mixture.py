"""A weighted mixture of shard sets, read by global sample index.

Why index-addressed rather than streamed: every sample has a global position g = 0, 1, 2, ...
computed from the seed alone (a blend of the shard sets by weight, each set walked through a
seeded Feistel permutation per epoch, as Marin/Levanter shuffle). So a resumed run, with any number
of workers and also after a change of DP degree, sees exactly the samples an uninterrupted one
would, and every sample of a set is seen exactly once per epoch of that set.

A staged mixture (`data.stages`) changes the weights at step boundaries: stage k covers the global
samples of its steps, blended by its own weights in blocks of its own, and each set's draws go on
from where the earlier stages left them (no sample repeats early). So the source of every sample is
still a function of its global index, and a resume mid-stage is exact.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_soda.config import ConfigError, DataConfig
from megatron_soda.data.shard_set import ShardSet
from megatron_soda.tokenization.vocab import SodaLayout

PAD = -1  # padding in collated samples


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


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


def _default_names(paths: list[str]) -> list[str]:
    """Each set's folder name, or parent/name where two sets share a folder name (en/shards, zh/shards)."""
    names = [Path(p).name for p in paths]
    return [f"{Path(p).parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def _block_counts(weights: np.ndarray, block: int) -> np.ndarray:
    """Largest-remainder apportionment of `block` samples to sets by weight."""
    raw = weights / weights.sum() * block
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: block - counts.sum()]:
        counts[i] += 1
    return counts


class MixtureDataset(Dataset):
    """Global sample index -> training sample; stateless, so any worker can serve any index."""

    def __init__(
        self,
        cfg: DataConfig,
        layout: SodaLayout | None = None,
        seq_len: int | None = None,
        global_batch_size: int | None = None,
    ) -> None:
        """`global_batch_size`: what turns `data.stages` step boundaries into sample boundaries."""
        if not cfg.paths:
            raise ConfigError("data.paths: no shard sets given")
        self.cfg = cfg
        self.sets = [
            ShardSet(p, cfg.skip_corrupt, cfg.verify_checksums, cfg.cache_dir, cfg.cache_gb) for p in cfg.paths
        ]
        first = self.sets[0].index
        for s in self.sets:
            s.index.check_compatible(layout or first.layout, seq_len or first.seq_len)
        self.layout = layout or first.layout
        self.seq_len = first.seq_len
        self.names = cfg.names or _default_names(cfg.paths)
        if len(set(self.names)) != len(self.names) or "stage" in self.names:
            raise ConfigError(
                f"data.names {self.names}: each source needs its own name, not 'stage' (metrics.jsonl has "
                "data_<name> per source beside data_stage)"
            )
        if cfg.weights is not None and len(cfg.weights) != len(self.sets):
            sources = ", ".join(f"{n} {w:g}" for n, w in zip(self.names, cfg.weights, strict=False))
            raise ConfigError(
                f"data.weights has {len(cfg.weights)} weights ({sources}) for {len(self.sets)} data.paths: give one "
                "path per source, in this order, or set data.weights (and data.names) for your own mixture"
            )
        if len(self.names) != len(self.sets):
            raise ConfigError(f"data.names has {len(self.names)} names for {len(self.sets)} data.paths")
        self.by_size = cfg.weights is None
        weights = cfg.weights if cfg.weights is not None else [len(s) for s in self.sets]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(
                f"data.weights: expected {len(self.sets)} non-negative weights with a positive sum, got {weights}"
            )
        self.weights = np.asarray(weights, dtype=np.float64)
        self.block = cfg.blend_block
        self.counts = _block_counts(self.weights, self.block)
        self.stages = self._stages(cfg, global_batch_size)  # [(first sample, end sample, counts)]
        self._draws_before = self._draws_before_stages()
        self.pad_input = self.layout.eos_id
        self._fingerprints: dict[str, str] = {}

    def _stages(self, cfg: DataConfig, global_batch_size: int | None) -> list[tuple[int, float, np.ndarray]]:
        if not cfg.stages:
            return [(0, float("inf"), self.counts)]
        if global_batch_size is None:
            raise ConfigError("data.stages: the mixture needs the global batch size to place the stage boundaries")
        out, start, last = [], 0, 0
        for i, st in enumerate(cfg.stages):
            where = f"data.stages[{i}]"
            if st.until_step <= last:
                raise ConfigError(
                    f"{where}.until_step {st.until_step}: stages must end in increasing steps, after {last}"
                )
            if len(st.weights) != len(self.sets) or any(w < 0 for w in st.weights) or sum(st.weights) <= 0:
                raise ConfigError(
                    f"{where}.weights {st.weights}: expected {len(self.sets)} non-negative weights (one per data.paths "
                    "entry) with a positive sum"
                )
            end = st.until_step * global_batch_size
            out.append((start, end, _block_counts(np.asarray(st.weights, dtype=np.float64), self.block)))
            start, last = end, st.until_step
        out[-1] = (out[-1][0], float("inf"), out[-1][2])  # the last stage's weights go on to the end
        return out

    def _draws_before_stages(self) -> list[np.ndarray]:
        """Draws from each set made by the stages before each stage (whole blocks and the partial last)."""
        before, out = np.zeros(len(self.sets), dtype=np.int64), []
        for k, (start, end, counts) in enumerate(self.stages):
            out.append(before.copy())
            if end == float("inf"):
                break
            full, rest = divmod(int(end - start), self.block)
            before += full * counts
            if rest:
                labels, _ = self._block(k, full)
                before += np.bincount(labels[:rest], minlength=len(self.sets))
        return out

    def stage_of(self, g: int) -> int:
        return next(k for k, (start, end, _) in enumerate(self.stages) if start <= g < end)

    def sources(self, start: int, n: int) -> np.ndarray:
        """The set each of the global samples start .. start + n - 1 is drawn from (the blend's labels
        alone, no sample read): the realised shares of a global batch, the same on every rank."""
        out = np.empty(n, dtype=np.int64)
        for i, g in enumerate(range(start, start + n)):
            k = self.stage_of(g)
            b, o = divmod(g - self.stages[k][0], self.block)
            out[i] = self._block(k, b)[0][o]
        return out

    def describe(self, stage: int | None = None) -> str:
        """The mixture as trained (one stage's, with `stage`), for the log (and a word when it was not asked for)."""
        if stage is not None or len(self.stages) > 1:
            counts = self.stages[stage or 0][2]
            parts = ", ".join(f"{n} {c / self.block:.1%}" for n, c in zip(self.names, counts, strict=True))
            if stage is not None:
                return parts
            return f"{len(self.stages)} stages; first: {parts}"
        parts = ", ".join(f"{n} {c / self.block:.1%}" for n, c in zip(self.names, self.counts, strict=True))
        if self.by_size and len(self.sets) > 1:
            return f"{parts} (by size: data.weights not set; the paper's mixture is set in the soda-* presets)"
        return parts

    def fingerprint(self, kind: str = "content") -> str:
        if kind not in self._fingerprints:  # read once: the checksum sidecars are hashed in full
            self._fingerprints[kind] = self._fingerprint(kind)
        return self._fingerprints[kind]

    def _fingerprint(self, kind: str) -> str:
        """Identity of the sample order and of what it reads: resuming under another one would
        silently change the data. A set is identified by its content: its shard records, every
        sample's checksum (the .crc32 sidecars), the codec and tokenizer that made it, not by how its
        path is spelled or where it was copied. Checkpoints of earlier versions hold weaker kinds:
        "records" (the index records only) and "paths" (the set's path)."""

        def identity(s: ShardSet) -> str:
            if kind == "paths":
                return str(s.root)
            what = {"shards": s.index.shards}
            if kind == "content":
                what |= {
                    "checksums": [_file_digest(s.root / r["checksums"]) for r in s.index.shards if r.get("checksums")],
                    "codec": s.index.meta.get("codec"),
                    "tokenizer": (s.index.meta.get("tokenizer") or {}).get("fingerprint"),
                }
            return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

        desc = {
            "sets": [[identity(s), len(s), s.index.layout.fingerprint()] for s in self.sets],
            "counts": self.counts.tolist(),
            "seed": self.cfg.seed,
            "block": self.block,
        }
        if self.cfg.stages:  # (an unstaged mixture keeps the identity it had before stages existed)
            desc["stages"] = [[s, -1 if e == float("inf") else e, c.tolist()] for s, e, c in self.stages]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of blocks, bounded; workers hold their own copies
    def _block(self, stage: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        counts = self.stages[stage][2]
        labels = np.repeat(np.arange(len(self.sets)), counts)
        # stage 0's blocks are shuffled as an unstaged mixture's, so a mixture without stages keeps its order
        np.random.default_rng([self.cfg.seed, b] if stage == 0 else [self.cfg.seed, stage, b]).shuffle(labels)
        rank_in_block = np.zeros(self.block, dtype=np.int64)
        for d in range(len(self.sets)):
            where = labels == d
            rank_in_block[where] = np.arange(where.sum())
        return labels, rank_in_block

    def locate(self, g: int) -> tuple[int, int]:
        """Global index -> (set, sample within that set)."""
        k = self.stage_of(g)
        start, _, counts = self.stages[k]
        b, o = divmod(g - start, self.block)
        labels, rank = self._block(k, b)
        d = int(labels[o])
        i = int(self._draws_before[k][d]) + b * int(counts[d]) + int(rank[o])  # i-th draw from set d
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
        located = [self.locate(int(g)) for g in indices]
        for d, s in enumerate(self.sets):  # a set on object storage requests its samples together
            s.fetch([k for dd, k in located if dd == d])
        for row, (d, k) in enumerate(located):
            raw, mask, corrupt[row] = self.sets[d].read_masked(k)
            out[row] = raw
            if mask is not None:
                prompt = mask == 0
                out[row][prompt] = -out[row][prompt] - 2
            out[row][raw == self.sets[d].sentinel] = PAD
        return {"sample": torch.from_numpy(out), "index": torch.tensor(indices), "corrupt": corrupt}
