"""Packed-sequence WebDataset shards and the index that describes a shard set.

A sample is one packed training sequence of seq_len + 1 tokens (inputs and shifted labels, as
Megatron's GPT dataset), stored as `<key>.tokens.npy` in an uncompressed tar: any WebDataset reader
can stream it. Every member has the same size, so sample k of a shard sits at a fixed byte offset;
the index records it, which lets the training loader read any sample directly (global shuffle,
exact resume, any DP degree) instead of streaming.

Fine-tuning shard sets (index field `loss_mask: true`) store each sample as a [2, seq_len + 1]
array: the ids, then a 0/1 row saying which tokens are targets (the loss skips the rest).

Shards appear atomically: written under a temporary name, checked, renamed, and only then is the
`.json` sidecar written. A shard without its sidecar is unfinished and is redone on re-run.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenization.vocab import LayoutMismatchError, SodaLayout

INDEX_NAME = "index.json"
INDEX_VERSION = 1
SAMPLE_FIELD = "tokens.npy"
TAR_BLOCK = 512


class ShardFormatError(ValueError):
    """A shard or index that is not what the index says it is."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Packer:
    """Concatenates documents and cuts samples of seq_len + 1 tokens overlapping by one token.

    The overlap is what makes every token (but a shard's very first) a label exactly once. The last,
    partial sample is padded with the layout's sentinel, which the loader masks out of the loss.
    """

    def __init__(self, seq_len: int, layout: SodaLayout, with_mask: bool = False) -> None:
        self.width = seq_len + 1
        self.layout = layout
        self.dtype = layout.storage_dtype
        self.with_mask = with_mask
        self._buf: list[np.ndarray] = []  # [rows, n] pieces: ids (and the loss-mask row)
        self._buffered = 0
        self.doc_tokens = 0
        self.pad_tokens = 0

    def add(self, doc: np.ndarray, mask: np.ndarray | None = None) -> list[np.ndarray]:
        rows = [np.asarray(doc, dtype=self.dtype)]
        if self.with_mask:
            rows.append(np.ones(len(doc), dtype=self.dtype) if mask is None else np.asarray(mask, dtype=self.dtype))
        self._buf.append(np.stack(rows))
        self._buffered += len(doc)
        self.doc_tokens += len(doc)
        out = []
        if self._buffered >= self.width:
            stream = np.concatenate(self._buf, axis=1)
            start = 0
            while stream.shape[1] - start >= self.width:
                out.append(self._sample(stream[:, start : start + self.width]))
                start += self.width - 1
            self._buf = [stream[:, start:]]
            self._buffered = stream.shape[1] - start
        return out

    def _sample(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(rows if self.with_mask else rows[0])

    def finish(self) -> list[np.ndarray]:
        if self._buffered <= 1:  # a lone token was already the last label of the previous sample
            return []
        stream = np.concatenate(self._buf, axis=1)
        pad = self.width - stream.shape[1]
        self.pad_tokens += pad
        self._buf, self._buffered = [], 0
        fill = np.zeros((stream.shape[0], pad), dtype=self.dtype)
        fill[0] = self.layout.pad_sentinel
        return [self._sample(np.concatenate([stream, fill], axis=1))]


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def _member_offsets(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, int, int]:
    """(first data offset, stride, count) of the samples of a written tar; checks they form one
    arithmetic series, which is what lets the loader compute any sample's position."""
    with tarfile.open(path, "r:") as tar:
        members = tar.getmembers()
    rows = shape[0] if len(shape) == 2 else 1
    header = len(npy_header(shape[-1], dtype, rows))
    offsets = [m.offset_data + header for m in members]
    stride = offsets[1] - offsets[0] if len(offsets) > 1 else 0
    for i, m in enumerate(members):
        if m.size != header + rows * shape[-1] * dtype.itemsize or offsets[i] != offsets[0] + i * stride:
            raise ShardFormatError(f"{path}: member {m.name} is not a fixed-size sample")
    return (offsets[0] if offsets else 0), stride, len(members)


def npy_header(width: int, dtype: np.dtype, rows: int = 1) -> bytes:
    """The .npy header every sample of a shard set carries (checked on every read)."""
    shape = (width,) if rows == 1 else (rows, width)
    return _npy_bytes(np.zeros(shape, dtype=dtype))[: -rows * width * dtype.itemsize]


def write_shard(path: Path, samples: list[np.ndarray], shard_id: int, stats: dict) -> dict:
    """Write a complete shard + sidecar atomically; returns the sidecar record."""
    import webdataset as wds

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, mtime=0) as sink:  # fixed mtime: the same input gives the same bytes
            for i, s in enumerate(samples):
                sink.write({"__key__": f"{shard_id:06d}_{i:07d}", SAMPLE_FIELD: _npy_bytes(s)})
        f.flush()
        os.fsync(f.fileno())
    record = dict(stats, file=path.name, key_prefix=f"{shard_id:06d}", samples=len(samples), bytes=tmp.stat().st_size)
    if samples:
        data_offset, stride, n = _member_offsets(tmp, samples[0].shape, samples[0].dtype)
        if n != len(samples):
            raise ShardFormatError(f"{tmp}: wrote {len(samples)} samples, read back {n}")
        record.update(data_offset=data_offset, stride=stride)
    os.replace(tmp, path)
    atomic_write_text(sidecar_path(path), json.dumps(record, indent=1))
    return record


def index_entry(record: dict) -> dict:
    """The part of a shard's sidecar that the index keeps (statistics stay in the sidecar)."""
    keys = ("file", "key_prefix", "samples", "tokens", "pad_tokens", "bytes", "data_offset", "stride")
    return {k: record[k] for k in keys if k in record}


def sidecar_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def read_sidecar(shard: Path) -> dict | None:
    """The sidecar of a finished shard, or None when the shard is missing or unfinished."""
    side = sidecar_path(shard)
    if not side.is_file() or not shard.is_file():
        return None
    try:
        record = json.loads(side.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("bytes") == shard.stat().st_size else None


# --- the index ----------------------------------------------------------------------------------


@dataclass
class ShardIndex:
    root: Path
    layout: SodaLayout
    seq_len: int
    dtype: np.dtype
    shards: list[dict]
    meta: dict

    @property
    def width(self) -> int:
        return self.seq_len + 1

    @property
    def rows(self) -> int:
        """2 when samples carry a loss-mask row (fine-tuning sets), else 1."""
        return 2 if self.meta.get("loss_mask") else 1

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def npy_header(self) -> bytes:
        return npy_header(self.width, self.dtype, self.rows)

    def check_compatible(self, layout: SodaLayout, seq_len: int | None = None) -> None:
        layout.check_same(self.layout, f"shard set {self.root}")
        if seq_len is not None and seq_len != self.seq_len:
            raise LayoutMismatchError(f"shard set {self.root} holds seq_len {self.seq_len} samples, expected {seq_len}")


def write_index(root: Path, layout: SodaLayout, seq_len: int, shards: list[dict], meta: dict) -> Path:
    index = {
        "version": INDEX_VERSION,
        "layout": layout.to_dict(),
        "layout_fingerprint": layout.fingerprint(),
        "seq_len": seq_len,
        "dtype": layout.storage_dtype.name,
        "pad_sentinel": layout.pad_sentinel,
        "num_samples": sum(s["samples"] for s in shards),
        "num_tokens": sum(s["tokens"] for s in shards),
        **meta,
        "shards": shards,
    }
    path = root / INDEX_NAME
    atomic_write_text(path, json.dumps(index, indent=1))
    return path


def read_index(root: str | Path) -> ShardIndex:
    root = Path(root)
    path = root / INDEX_NAME if root.is_dir() else root
    if not path.is_file():
        raise ShardFormatError(f"{path}: no shard index (expected the output directory of `soda prepare`)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e})") from None
    for key in ("version", "layout", "seq_len", "dtype", "shards"):
        if key not in raw:
            raise ShardFormatError(f"{path}: missing field '{key}'")
    if raw["version"] != INDEX_VERSION:
        raise ShardFormatError(f"{path}: index version {raw['version']}, this reader knows {INDEX_VERSION}")
    layout = SodaLayout.from_dict(raw["layout"])
    if raw.get("layout_fingerprint", layout.fingerprint()) != layout.fingerprint():
        raise ShardFormatError(f"{path}: layout_fingerprint does not match its layout")
    dtype = np.dtype(raw["dtype"])
    if dtype != layout.storage_dtype:
        raise ShardFormatError(f"{path}: dtype {dtype} but the layout stores {layout.storage_dtype}")
    meta = {k: v for k, v in raw.items() if k not in ("shards",)}
    return ShardIndex(path.parent, layout, int(raw["seq_len"]), dtype, raw["shards"], meta)
