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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PARQUET_BATCH_ROWS = 1024
TAR_AUDIO = ("flac", "wav", "mp3", "ogg", "opus")  # a sample's audio member, in this order of preference


def _jsonl_bytes(path: Path) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict | str]]:
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


# The most a tar member may declare, by what it is: a sample's audio (2 GiB: ~6 hours of 16-bit
# 48 kHz mono WAV, far past any usable clip) and its json / txt (64 MiB: a transcript or metadata;
# even an hour-long pre-tokenized document is ~1 MB). A member over its limit, or whose data ends
# before its declared size, makes its sample a bad record; other members (.npy, .mp4, ...) are
# never read. Passing over a member means reading past its declared size, so one that declares
# more than the file can hold (uncompressed) or than TAR_SKIP_LIMIT (compressed: the real size is
# unknown) ends the archive with a bad record instead: its header cannot be trusted.
TAR_MEMBER_LIMITS = {**{ext: 2 * 2**30 for ext in TAR_AUDIO}, "json": 64 * 2**20, "txt": 64 * 2**20}
TAR_SKIP_LIMIT = 64 * 2**30
TAR_READ_CHUNK = 2**20  # members are read (and passed over) this much at a time: memory follows the data
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def _tar_member(tf, member, ext: str) -> bytes | str:
    """A member's bytes, or why not: over its limit, or shorter than its header declares."""
    limit = TAR_MEMBER_LIMITS[ext]
    if member.size > limit:
        return f"{member.name}: declares {member.size:,} bytes, more than the {limit:,} a .{ext} member may hold"
    import tarfile

    f, data = tf.extractfile(member), bytearray()
    try:
        while len(data) < member.size:
            chunk = f.read(min(TAR_READ_CHUNK, member.size - len(data)))
            if not chunk:
                break
            data += chunk
    except (tarfile.ReadError, EOFError, OSError):
        pass  # the archive ends inside this member: counted short below
    if len(data) < member.size:
        return f"{member.name}: declares {member.size:,} bytes, the archive ends before its data does"
    return bytes(data)


def _untrusted_size(member, disk_size: int | None) -> str | None:
    """Why passing over `member` cannot be trusted to end (its declared size), or None."""
    if disk_size is not None and member.offset_data + member.size > disk_size:
        return f"{member.name}: declares {member.size:,} bytes, past the end of the {disk_size:,}-byte file"
    if disk_size is None and member.size > TAR_SKIP_LIMIT:
        return f"{member.name}: declares {member.size:,} bytes, more than the {TAR_SKIP_LIMIT:,} read past"
    return None


def _tar_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """One record per WebDataset sample: its json member's fields, `audio` as {"bytes", "path"}, a
    `txt` member as `text` where the json has none. Emilia-style ids (`EN_B00000_S00000_W000000`,
    utterance W of source recording S) get `doc` = the source prefix, so a recording's utterances,
    stored consecutively and in time order, form one document (a `doc` in the json, or
    `--doc-key`, takes precedence). Members are bounded as TAR_MEMBER_LIMITS says."""
    import tarfile

    with open(path, "rb") as f:
        compressed = f.read(6).startswith(COMPRESSED_MAGIC)
    disk_size = None if compressed else path.stat().st_size
    n, key, parts, problem = 0, None, {}, None
    with tarfile.open(path, "r|*", bufsize=TAR_READ_CHUNK) as tf:
        while True:
            try:
                member = tf.next()
            except (tarfile.ReadError, EOFError, OSError) as e:  # the data of the member before ends early
                cut = f"{path.name} ends inside sample {n + 1}'s data ({e})"
                problem = problem or cut if key is not None else cut
                break
            if member is None:
                break
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            k = f"{folder}/{stem}" if folder else stem
            untrusted = _untrusted_size(member, disk_size)
            if untrusted:  # the rest of the archive is not read: where it would continue is unknown
                if key is not None and k != key:
                    yield n + 1, problem or _tar_record(key, parts)  # the sample before is whole
                    n += 1
                yield n + 1, f"{untrusted}; the rest of {path.name} is not read"
                return
            if not member.isfile():
                continue
            if key is not None and k != key:
                n += 1
                yield n, problem or _tar_record(key, parts)
                parts, problem = {}, None
            key, ext = k, ext.lower()
            if ext in TAR_MEMBER_LIMITS and problem is None:
                data = _tar_member(tf, member, ext)
                if isinstance(data, str):
                    problem = data
                else:
                    parts[ext] = data
    if key is not None or problem:
        yield n + 1, problem or _tar_record(key, parts)


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


@dataclass(frozen=True)
class Reader:
    name: str  # the format, as --help and messages name it
    read: Callable[[Path], Iterator[tuple[int, dict | str]]]


# Every corpus-file format, by file suffix: which files are corpus files (RECORD_SUFFIXES), how
# each is read, and what `soda prepare --help`, its messages and `soda bench readers` list.
READERS: dict[str, Reader] = {
    ".jsonl": Reader("JSONL", _jsonl_records),
    ".jsonl.gz": Reader("gzip JSONL", _jsonl_records),
    ".jsonl.zst": Reader("zstd JSONL", _jsonl_records),
    ".parquet": Reader("Parquet", _parquet_records),
    ".arrow": Reader("Arrow", _arrow_records),  # `datasets.save_to_disk` folders: Arrow IPC streams
    ".tar": Reader("WebDataset tar", _tar_records),  # a sample's members share a key (the name up to its first dot)
}
RECORD_SUFFIXES = tuple(READERS)


def reader_of(path: Path) -> Reader | None:
    name = path.name.lower()
    return next((r for suffix, r in READERS.items() if name.endswith(suffix)), None)


def is_record_file(path: Path) -> bool:
    return path.is_file() and reader_of(path) is not None


def read_records(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(n, record) for every record of a corpus file, or (n, why) for one that is not a JSON object /
    not valid UTF-8; n is the line number (JSONL) or the 1-based row / sample (the others). A file
    of no registered suffix is a JSONL manifest (whatever its name, given directly as --input)."""
    return (reader_of(path) or READERS[".jsonl"]).read(path)
