"""Random access to the samples of one shard set (a `soda prepare` output directory, or its URL).

Every sample sits at a byte offset the index computes (fixed-size tar members), so a sample is one
`pread`; each read checks the tar member's name, the .npy header and the id range against the
index, so a flipped or replaced byte is an error naming the shard and sample, never silent data.

A set on object storage (`s3://`, `gs://`, `hf://`) is read the same way, in byte ranges, through
data/remote.py (a disk cache, parallel and coalesced requests, a prefetcher): its shards are listed
when it is opened (the listing's sizes are checked as a directory's are, and its sizes and tags are
what every process's reads are held to: on s3:// every request, elsewhere each open; see
object_store.py), its checksum sidecars copied into its local mirror, and every sample, from the
store or from the cache, gets the same checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megatron_soda.config import UserError
from megatron_soda.tokenization.object_store import ObjectChanged, ObjectMissing, ObjectStoreError
from megatron_soda.tokenization.shard_format import (
    SampleSpan,
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
    """Random access to the samples of one `soda prepare` output: a directory, or a URL."""

    def __init__(
        self,
        root: str | Path,
        skip_corrupt: bool = False,
        verify: bool = True,
        cache_dir: str = "",
        cache_gb: float = 20.0,
    ) -> None:
        """`verify`: check each sample read against its shard's CRC-32 (when the set has them).
        `cache_dir`, `cache_gb`: where a set on object storage is mirrored and how many GB of its
        samples are cached there (data.cache_dir, data.cache_gb; 0: none, every read from the store)."""
        self.index: ShardIndex = read_index(root, cache_dir)
        self.root = self.index.root  # for a set on object storage: its local mirror
        self.source = self.index.source  # its URL ("" for a local set)
        self.remote = None
        self._objects, self._sidecar_problems = self._list_store() if self.source else (None, {})
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
            raise ShardFormatError(f"{self.index.where}: no usable samples")
        self.shards = shards
        self.cumulative = np.cumsum([s["samples"] for s in shards])
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        if self.source:
            self.remote = self._open_remote(cache_dir, cache_gb)

    def name(self, rec: dict) -> str:
        """A shard as messages name it: its path, or its URL."""
        return f"{self.source}/{rec['file']}" if self.source else str(self.root / rec["file"])

    def _list_store(self) -> tuple[dict, dict[str, str]]:
        """The set's objects as the store lists them now, and its sidecars copied into the mirror."""
        from megatron_soda.tokenization.object_store import list_dir
        from megatron_soda.tokenization.shard_format import fetch_checksums

        objects = list_dir(self.source)
        return objects, fetch_checksums(self.index, [r for r in self.index.shards if r["file"] in objects])

    def _open_remote(self, cache_dir: str, cache_gb: float):
        from megatron_soda.data.remote import GB, RemoteShards, SampleCache
        from megatron_soda.tokenization.object_store import cache_root

        cache = SampleCache(cache_root(cache_dir), int(cache_gb * GB)) if cache_gb > 0 else None
        return RemoteShards(self.shards, self._objects, len(self._header), self._data_bytes, self.root, cache)

    def _check_shard(self, rec: dict) -> str | None:
        if self.source:
            info = self._objects.get(rec["file"])
            if info is None:
                return f"{self.name(rec)}: shard missing"
            size = info.size
        else:
            path = self.root / rec["file"]
            if not path.is_file():
                return f"{path}: shard missing"
            size = path.stat().st_size
        if size != rec["bytes"]:
            return f"{self.name(rec)}: {size} bytes, index says {rec['bytes']} (truncated or rewritten)"
        return self._sidecar_problems.get(rec["file"])

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

    def fetch(self, ks: list[int]) -> None:
        """Samples about to be read, requested together: for a set on object storage that is one
        round of parallel, coalesced range requests instead of one request after another; for a
        local set nothing (a pread is cheap)."""
        if self.remote is not None:
            self.remote.want([self.locate(k) for k in ks])

    def read_masked(self, k: int) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """Sample k's ids, its 0/1 loss mask (None: every token is a target), and whether it was
        replaced (all padding) because it is corrupt."""
        shard, j = self.locate(k)
        rec = self.shards[shard]
        span = sample_span(rec, j, len(self._header), self._data_bytes)
        if self.remote is None:
            tokens, mask, problem = self._check(os.pread(self._fd(shard), span.length, span.start), span, shard, j)
        else:
            tokens, mask, problem = self._read_remote(shard, j, span)
        if problem is None:
            return tokens, mask, False
        msg = f"{self.name(rec)}: sample {j}: {problem}"
        if not self.skip_corrupt:
            raise ShardReadError(msg)
        self.last_problem = msg
        return np.full(self.width, self.sentinel, dtype=self.dtype), None, True

    def _read_remote(self, shard: int, j: int, span: SampleSpan):
        url = self.name(self.shards[shard])
        try:
            raw, cached = self.remote.take(shard, j)
            found = self._check(raw, span, shard, j)
            if found[2] is not None and cached:  # the local copy is bad, which says nothing of the object's
                self.remote.drop(shard, j)
                found = self._check(self.remote.read_now(shard, j), span, shard, j)
            return found
        except ObjectMissing:
            return None, None, "object missing (deleted since the set was opened)"
        except ObjectChanged:
            return None, None, "object changed since the set was opened (size or ETag differs)"
        except ObjectStoreError as e:  # unreachable past the retries, access denied: not the data's fault
            raise ShardReadError(f"{url}: sample {j}: {str(e).removeprefix(url + ': ')}") from None

    def _check(self, raw: bytes, span: SampleSpan, shard: int, j: int):
        """(ids, loss mask, None), or (None, None, what is wrong with these bytes)."""
        if len(raw) != span.length:
            return None, None, "short read"
        if not span.matches(raw, self._header):
            return None, None, "member header does not match the index"
        data = np.frombuffer(raw, dtype=self.dtype, offset=span.data_at)
        tokens, mask = data[: self.width], (data[self.width :] if self.rows == 2 else None)
        bad = (tokens >= self.vocab_size) & (tokens != self.sentinel)
        if bad.any():
            return None, None, f"ids outside the vocabulary (max {int(tokens[bad].max())})"
        if mask is not None and (mask > 1).any():
            return None, None, "loss mask holds values other than 0/1"
        if self.verify and not self._checksum_ok(shard, j, raw, span.data_at):
            return None, None, "checksum mismatch (bytes changed since `soda prepare` wrote them)"
        return tokens, mask, None
