"""Writing shard sets: packing documents into samples, and the shards themselves.

The format (member layout, index, sidecars) is described in shard_format.py, which the training
reader shares. Shards appear atomically: written under a temporary name, checked, renamed, and only
then is the `.json` sidecar written; a shard without its sidecar is redone on re-run.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np

from megatron_soda.tokenization.shard_format import (
    SAMPLE_FIELD,
    ShardFormatError,
    atomic_write_text,
    member_key,
    npy_bytes,
    npy_header,
    sidecar_path,
    write_checksums,
)
from megatron_soda.tokenization.vocab import SodaLayout


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


def write_shard(path: Path, samples: list[np.ndarray], shard_id: int, stats: dict) -> dict:
    """Write a complete shard + sidecar atomically; returns the sidecar record."""
    import webdataset as wds

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, mtime=0) as sink:  # fixed mtime: the same input gives the same bytes
            for i, s in enumerate(samples):
                sink.write({"__key__": member_key(f"{shard_id:06d}", i), SAMPLE_FIELD: npy_bytes(s)})
        f.flush()
        os.fsync(f.fileno())
    record = dict(stats, file=path.name, key_prefix=f"{shard_id:06d}", samples=len(samples), bytes=tmp.stat().st_size)
    record["checksums"] = write_checksums(path, samples)
    if samples:
        data_offset, stride, n = _member_offsets(tmp, samples[0].shape, samples[0].dtype)
        if n != len(samples):
            raise ShardFormatError(f"{tmp}: wrote {len(samples)} samples, read back {n}")
        record.update(data_offset=data_offset, stride=stride)
    os.replace(tmp, path)
    atomic_write_text(sidecar_path(path), json.dumps(record, indent=1))
    return record
