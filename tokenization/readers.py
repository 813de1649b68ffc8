"""Records out of corpus files as they ship, streamed: JSONL (plain, gzip, zstd), Parquet, the Arrow
files of a `datasets` folder, and WebDataset tars of audio + json members.

Web-scale corpora (Nemotron-CC's `.jsonl.zst`, the Parquet tables of Hugging Face datasets, Emilia's
tars, the released pre-tokenized SODA documents) come as thousands of large files. Nothing here reads
a whole file into memory: JSONL is decompressed line by line, Parquet and Arrow read a row batch at a
time, a tar one sample's members at a time; audio stays encoded bytes (`{"bytes", "path"}`, the
layout of Hugging Face's Audio feature) until the worker that encodes it decodes it. A record that
cannot be parsed comes out as an error string (counted as a skip by the caller) instead of stopping
the file.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)  # `datasets.save_to_disk` folders: Arrow IPC streams
TAR_SUFFIXES = (".tar",)  # WebDataset: the members of one sample share a key (name up to its first dot)
RECORD_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES + TAR_SUFFIXES
PARQUET_BATCH_ROWS = 1024
TAR_AUDIO = ("flac", "wav", "mp3", "ogg", "opus")  # a sample's audio member, in this order of preference


def is_record_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(RECORD_SUFFIXES)


def _jsonl_bytes(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def read_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(n, record) for every record of a JSONL or Parquet file, or (n, why) for one that is not a
    JSON object / not valid UTF-8; n is the line number (JSONL) or the 1-based row (Parquet)."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        yield from _parquet_records(path)
        return
    if name.endswith(ARROW_SUFFIXES):
        yield from _arrow_records(path)
        return
    if name.endswith(TAR_SUFFIXES):
        yield from _tar_records(path)
        return
    with _jsonl_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")  # strictly: a mangled transcript must not reach the shards
            except UnicodeDecodeError as e:
                yield lineno, f"not UTF-8 ({e.reason} at byte {e.start})"
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                yield lineno, str(e)
                continue
            yield lineno, rec if isinstance(rec, dict) else "not a JSON object"


def _parquet_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def _arrow_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    import pyarrow as pa

    row = 0
    with pa.memory_map(str(path)) as source:
        for batch in pa.ipc.open_stream(source):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec


def _tar_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """One record per WebDataset sample: its json member's fields, `audio` as {"bytes", "path"}, a
    `txt` member as `text` where the json has none. Emilia-style ids (`EN_B00000_S00000_W000000`,
    utterance W of source recording S) get `doc` = the source prefix, so a recording's utterances,
    stored consecutively and in time order, form one document (a `doc` in the json, or
    `--doc-key`, takes precedence)."""
    import tarfile

    n, key, parts = 0, None, {}
    with tarfile.open(path, "r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            k = f"{folder}/{stem}" if folder else stem
            if key is not None and k != key:
                n += 1
                yield n, _tar_record(key, parts)
                parts = {}
            key = k
            parts[ext.lower()] = tf.extractfile(member).read()
    if key is not None:
        yield n + 1, _tar_record(key, parts)


def _tar_record(key: str, parts: dict[str, bytes]) -> dict | str:
    rec: dict = {}
    if "json" in parts:
        try:
            rec = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return f"{key}.json: {e}"
        if not isinstance(rec, dict):
            return f"{key}.json: not a JSON object"
    ext = next((e for e in TAR_AUDIO if e in parts), None)
    if ext is not None:
        rec["audio"] = {"bytes": parts[ext], "path": f"{key}.{ext}"}
    if "text" not in rec and "txt" in parts:
        try:
            rec["text"] = parts["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            return f"{key}.txt: not UTF-8 ({e.reason})"
    rec.setdefault("id", key.rpartition("/")[2])
    source, sep, last = str(rec["id"]).rpartition("_")
    if "doc" not in rec and sep and last[:1] == "W" and last[1:].isdigit():
        rec["doc"] = source
    return rec
