"""Random access to the samples of one shard set (a `soda prepare` output directory).

Every sample sits at a byte offset the index computes (fixed-size tar members), so a sample is one
`pread`; each read checks the tar member's name, the .npy header and the id range against the
index, so a flipped or replaced byte is an error naming the shard and sample, never silent data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megatron_soda.config import UserError
from megatron_soda.tokenization.shard_format import (
    ShardFormatError,
    ShardIndex,
    checksum,
    read_checksums,
    read_index,
    sample_span,
)


class ShardReadError(UserError, RuntimeError):
    """A shard whose bytes are not what its index promised (truncated, overwritten, replaced)."""


# --- one shard set ------------------------------------------------------------------------------


class ShardSet:
    """Random access to the samples of one `soda prepare` output directory."""

    def __init__(self, root: str | Path, skip_corrupt: bool = False, verify: bool = True) -> None:
        """`verify`: check each sample read against its shard's CRC-32 (when the set has them)."""
        self.index: ShardIndex = read_index(root)
        self.root = self.index.root
        self.width = self.index.width
        self.dtype = self.index.dtype
        self.sentinel = self.index.layout.pad_sentinel
        self.vocab_size = self.index.layout.vocab_size
        self.skip_corrupt = skip_corrupt
        self.verify = verify
        self.last_problem = ""  # the latest sample skip_corrupt replaced, and why
        self._checksums: dict[int, np.ndarray | None] = {}
        self.skipped_shards: list[str] = []
        self.skipped_samples = 0
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
                self.skipped_samples += rec["samples"]
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

    def _checksum_ok(self, shard: int, j: int, raw: bytes, data_at: int) -> bool:
        if shard not in self._checksums:
            self._checksums[shard] = read_checksums(self.root, self.shards[shard])
        expected = self._checksums[shard]
        return expected is None or checksum(memoryview(raw)[data_at:]) == int(expected[j])

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
        span = sample_span(rec, j, len(self._header), self._data_bytes)
        raw = os.pread(self._fd(shard), span.length, span.start)
        problem = None
        if len(raw) != span.length:
            problem = "short read"
        elif not span.matches(raw, self._header):
            problem = "member header does not match the index"
        else:
            data = np.frombuffer(raw, dtype=self.dtype, offset=span.data_at)
            tokens, mask = data[: self.width], (data[self.width :] if self.rows == 2 else None)
            bad = (tokens >= self.vocab_size) & (tokens != self.sentinel)
            if bad.any():
                problem = f"ids outside the vocabulary (max {int(tokens[bad].max())})"
            elif mask is not None and (mask > 1).any():
                problem = "loss mask holds values other than 0/1"
            elif self.verify and not self._checksum_ok(shard, j, raw, span.data_at):
                problem = "checksum mismatch (bytes changed since `soda prepare` wrote them)"
        if problem is None:
            return tokens, mask, False
        msg = f"{self.root / rec['file']}: sample {j}: {problem}"
        if not self.skip_corrupt:
            raise ShardReadError(msg)
        self.last_problem = msg
        return np.full(self.width, self.sentinel, dtype=self.dtype), None, True
