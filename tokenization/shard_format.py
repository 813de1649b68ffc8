"""The on-disk format of a shard set, described once: what the writer (tokenization/shards.py)
produces and the reader (megatron_soda/data/shard_set.py) relies on.

A sample is one packed training sequence of seq_len + 1 tokens (inputs and shifted labels, as
Megatron's GPT dataset), stored as `<key>.tokens.npy` in an uncompressed tar: any WebDataset reader
can stream it. Every member has the same size, so sample k of a shard sits at a fixed byte offset
(`data_offset + k * stride`, recorded per shard in the index), which lets the training loader read
any sample directly (global shuffle, exact resume, any DP degree) instead of streaming.

Fine-tuning shard sets (index field `loss_mask: true`) store each sample as a [2, seq_len + 1]
array: the ids, then a 0/1 row saying which tokens are targets (the loss skips the rest).

A shard's `.json` sidecar appears only after the shard is complete: a shard without its sidecar is
unfinished. Beside each shard, `<shard>.crc32` holds one CRC-32 per sample (little-endian uint32,
over the sample's array bytes): a flipped byte that still decodes to valid ids is caught on read.
Sets written before checksums existed have none and are read unchecked.

A set may also live on object storage (`s3://`, `gs://`, `hf://`: tokenization/object_store.py):
`read_index` reads its index from there and keeps a copy in the set's local mirror, which becomes
the index's `root` (where the small files are: index, checksum sidecars, tokenizer); `source` is
the URL the messages name. The shards themselves are read in byte ranges (megatron_soda/data/remote.py).
"""

from __future__ import annotations

import io
import json
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_soda.config import UserError
from megatron_soda.tokenization.vocab import LayoutMismatchError, SodaLayout

INDEX_NAME = "index.json"
INDEX_VERSION = 1
SAMPLE_FIELD = "tokens.npy"
TAR_BLOCK = 512


class ShardFormatError(UserError, ValueError):
    """A shard or index that is not what the index says it is."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def member_key(key_prefix: str, k: int) -> str:
    """The WebDataset key of sample k of a shard (its tar member is `<key>.tokens.npy`)."""
    return f"{key_prefix}_{k:07d}"


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def npy_header(width: int, dtype: np.dtype, rows: int = 1) -> bytes:
    """The .npy header every sample of a shard set carries (checked on every read)."""
    shape = (width,) if rows == 1 else (rows, width)
    return npy_bytes(np.zeros(shape, dtype=dtype))[: -rows * width * dtype.itemsize]


@dataclass(frozen=True)
class SampleSpan:
    """Where sample k of a shard lies: its 512-byte tar member header, the .npy header, the data."""

    start: int  # file offset of the tar member header
    length: int  # bytes from there to the end of the sample's data
    data_at: int  # offset of the data within those bytes
    name: bytes  # what the tar header's name field starts with

    def matches(self, raw: bytes, npy_header: bytes) -> bool:
        """The bytes read at `start` carry this sample's member name and the set's .npy header."""
        return raw[: len(self.name)] == self.name and raw[TAR_BLOCK : self.data_at] == npy_header


def sample_span(record: dict, k: int, header_bytes: int, data_bytes: int) -> SampleSpan:
    """Sample k of the shard whose index record is `record` (header_bytes: the .npy header's size)."""
    data_offset = record["data_offset"] + k * record["stride"]
    head = TAR_BLOCK + header_bytes
    name = (member_key(record["key_prefix"], k) + ".").encode()
    return SampleSpan(data_offset - head, head + data_bytes, head, name)


def checksum(data: bytes | memoryview) -> int:
    """A sample's CRC-32 (zlib's: ~1 GB/s, so every read can afford it)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def checksums_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".crc32")


def write_checksums(shard: Path, samples: list[np.ndarray]) -> str:
    values = np.array([checksum(np.ascontiguousarray(s).tobytes()) for s in samples], dtype="<u4")
    path = checksums_path(shard)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    values.tofile(tmp)
    os.replace(tmp, path)
    return path.name


def read_checksums(root: Path, record: dict) -> np.ndarray | None:
    """A shard's per-sample checksums (None: written before checksums; an error: file missing or short)."""
    name = record.get("checksums")
    if not name:
        return None
    path = root / name
    if not path.is_file() or path.stat().st_size != 4 * record["samples"]:
        raise ShardFormatError(f"{path}: missing or not {record['samples']} checksums")
    return np.fromfile(path, dtype="<u4")


def fetch_checksums(index: ShardIndex, records: list[dict]) -> dict[str, str]:
    """A set on object storage: the checksum sidecars of `records`, read from the store (all at
    once, concurrently) into the set's mirror, where `read_checksums` and the data fingerprint find
    them; read at every open, so the mirror holds what the store holds now. Returns the problems
    (a sidecar missing or not one checksum per sample), one line each, by shard file."""
    from megatron_soda.tokenization import object_store

    wanted = [r for r in records if r.get("checksums")]

    def fetch(r: dict) -> str | None:
        url = object_store.join(index.source, r["checksums"])
        try:
            data = object_store.read_bytes(url)
        except object_store.ObjectMissing:
            return f"{url}: checksums missing"
        if len(data) != 4 * r["samples"]:
            return f"{url}: {len(data) // 4} checksums, the index says {r['samples']} samples"
        path = index.root / r["checksums"]
        if not path.is_file() or path.read_bytes() != data:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return None

    found = object_store.map_concurrently(fetch, wanted)
    return {r["file"]: p for r, p in zip(wanted, found, strict=True) if p}


def index_entry(record: dict) -> dict:
    """The part of a shard's sidecar that the index keeps (statistics stay in the sidecar)."""
    keys = ("file", "key_prefix", "samples", "tokens", "pad_tokens", "bytes", "data_offset", "stride", "checksums")
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
    root: Path  # the set's directory, or for a set on object storage its local mirror
    layout: SodaLayout
    seq_len: int
    dtype: np.dtype
    shards: list[dict]
    meta: dict
    source: str = ""  # the URL of a set on object storage ("" for a local set)

    @property
    def where(self) -> str:
        """The set as its user named it: the URL, or the directory."""
        return self.source or str(self.root)

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
        layout.check_same(self.layout, f"shard set {self.where}")
        if seq_len is not None and seq_len != self.seq_len:
            raise LayoutMismatchError(
                f"shard set {self.where} holds seq_len {self.seq_len} samples, expected {seq_len}"
            )


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


def read_index(root: str | Path, cache_dir: str = "") -> ShardIndex:
    """The index of a set: a directory (or its index.json), or a URL on object storage, whose
    index is fetched and copied into its mirror under `cache_dir` (data.cache_dir)."""
    if isinstance(root, str) and "://" in root:
        return _read_remote_index(root, cache_dir)
    root = Path(root)
    path = root / INDEX_NAME if root.is_dir() else root
    if not path.is_file():
        raise ShardFormatError(f"{path}: no shard index (expected the output directory of `soda prepare`)")
    return _parse_index(path.read_text(), str(path), path.parent)


def _read_remote_index(url: str, cache_dir: str) -> ShardIndex:
    from megatron_soda.tokenization import object_store

    url = url.rstrip("/")
    if url.endswith("/" + INDEX_NAME):
        url = url[: -len(INDEX_NAME) - 1]
    where = object_store.join(url, INDEX_NAME)
    try:
        raw = object_store.read_bytes(where)
    except object_store.ObjectMissing:
        raise ShardFormatError(f"{where}: no shard index (expected the output of `soda prepare`)") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ShardFormatError(f"{where}: not valid JSON (not UTF-8)") from None
    mirror = object_store.mirror_dir(url, raw, cache_dir)
    index = _parse_index(text, where, mirror, source=url)
    mirror.mkdir(parents=True, exist_ok=True)
    if not (mirror / INDEX_NAME).is_file():
        atomic_write_text(mirror / INDEX_NAME, text)
    return index


def _parse_index(text: str, path: str, root: Path, source: str = "") -> ShardIndex:
    try:
        raw = json.loads(text)
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
    return ShardIndex(root, layout, int(raw["seq_len"]), dtype, raw["shards"], meta, source)
