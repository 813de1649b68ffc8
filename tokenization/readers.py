"""Records out of corpus files as they ship: JSONL (plain, gzip, zstd) and Parquet, streamed.

Web-scale corpora (Nemotron-CC's `.jsonl.zst`, the Parquet tables of Hugging Face datasets, the
released pre-tokenized SODA documents) come as thousands of large files. Nothing here reads a whole
file into memory: JSONL is decompressed line by line, Parquet read a row batch at a time, and a
record that cannot be parsed comes out as an error string (counted as a skip by the caller) instead
of stopping the file.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
RECORD_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
PARQUET_BATCH_ROWS = 1024


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
    if path.name.lower().endswith(PARQUET_SUFFIXES):
        yield from _parquet_records(path)
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
