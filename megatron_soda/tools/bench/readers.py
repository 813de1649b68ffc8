"""`soda bench readers`: records/s of each corpus-file reader; audio-hours/s of audio archives read and
decoded, and of the pre-tokenized route.

`soda prepare` streams corpus files record by record; on a cluster the readers feed GPU Mimi
encoders (or, for the released pre-tokenized documents, the tokenizer alone), so a reader must
never be the bottleneck: the goal is >= 1,000x real time of audio per node. This writes synthetic
files of each format (text documents of Nemotron-like length; SODA documents of `--doc-seconds` of
audio as private-use characters plus their transcripts; Emilia-like 5 s utterances as FLAC / MP3 in
WebDataset tars and FLAC in a Parquet audio column) and times reading them, decoding the audio to
Mimi's 24 kHz, and the whole pre-tokenized route (read + tokenize + layout check), on one core.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_soda.tokenization.readers import RECORD_SUFFIXES, read_records
from megatron_soda.tools.bench import write_json

if TYPE_CHECKING:
    import numpy as np

WORDS = "the a of speech model audio token text codec frame sound voice data train scale open".split()


def _text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, words).tolist()) + "."


def _soda_document(rng: np.random.Generator, layout, seconds: float, utterance_s: float = 5.0) -> str:
    """A released-style document: BOS, utterances of transcript + audio characters, EOS."""
    parts = ["<|begin_of_text|>"]
    frames_per_utt = int(utterance_s * 12.5)
    for _ in range(max(1, int(seconds / utterance_s))):
        codes = rng.integers(0, layout.codebook_size, (frames_per_utt, layout.codebooks))
        parts += ["<|text_start|>", _text(rng, 15), "<|text_end|>", "<|audio_start|>"]
        parts += [layout.codes_to_str(codes), "<|audio_end|>"]
    return "".join(parts) + "<|end_of_text|>"


def _write_jsonl(records: list[dict], path: Path) -> None:
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw)
    elif path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)


def _write_parquet(records: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


def _write_arrow(records: list[dict], path: Path) -> None:
    """An Arrow IPC stream, as `datasets.save_to_disk` writes its shards."""
    import pyarrow as pa

    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _audio_records(rng: np.random.Generator, n: int, seconds: float, fmt: str) -> list[dict]:
    """Emilia-like utterances: `seconds` of noisy tones at 24 kHz as FLAC or MP3 bytes + transcript."""
    import io

    import numpy as np
    import soundfile as sf

    rate = 24_000
    t = np.arange(int(seconds * rate)) / rate
    out = []
    for i in range(n):
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(t.size)
        buf = io.BytesIO()
        subtype = {"subtype": "PCM_16"} if fmt == "flac" else {}
        sf.write(buf, x.astype(np.float32), rate, format=fmt.upper(), **subtype)
        key = f"EN_B00000_S{i // 8:05d}_W{i:06d}"
        out.append({"id": key, "text": _text(rng, 12), "audio": {"bytes": buf.getvalue(), "path": f"{key}.{fmt}"}})
    return out


def _write_tar(records: list[dict], path: Path) -> None:
    """One WebDataset sample per record: its fields as the json member, its audio (if any) beside it."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tf:
        for i, r in enumerate(records):
            key = r.get("id", f"{i:08d}")
            fields = {k: v for k, v in r.items() if k != "audio"} | {"id": key}
            members = [(f"{key}.json", json.dumps(fields, ensure_ascii=False).encode())]
            if "audio" in r:
                members.append((r["audio"]["path"], r["audio"]["bytes"]))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


# a writer for every suffix of the reader registry (tokenization/readers.py), so every format is timed
WRITERS = {
    ".jsonl": _write_jsonl,
    ".jsonl.gz": _write_jsonl,
    ".jsonl.zst": _write_jsonl,
    ".parquet": _write_parquet,
    ".arrow": _write_arrow,
    ".tar": _write_tar,
}


def _audio_rows(rng: np.random.Generator, utterances: int, seconds: float, reps: int, tmp: Path) -> list[dict]:
    """Audio archives: records/s read, and audio-hours/s read + decoded + resampled for Mimi."""
    from megatron_soda.tokenization.audio_io import load_audio
    from megatron_soda.tokenization.inputs import record_entries

    rows = []
    for fmt, container in (("flac", ".tar"), ("mp3", ".tar"), ("flac", ".parquet")):
        recs = _audio_records(rng, utterances, seconds, fmt)
        path = tmp / f"audio-{fmt}{container}"
        WRITERS[container](recs, path)

        def decode(p=path) -> None:
            for n, rec in read_records(p):
                e = record_entries(rec, p.parent, str(n), str(n), True, False)
                load_audio(e.audio, 24_000, data=e.audio_bytes, segment=e.segment)

        read = min(_timed(lambda p=path: sum(1 for _ in read_records(p))) for _ in range(reps))
        full = min(_timed(decode) for _ in range(reps))
        hours = utterances * seconds / 3600
        rows.append(
            {
                "corpus": f"speech ({fmt})",
                "format": container,
                "records": utterances,
                "mb": path.stat().st_size / 1e6,
                "records_per_s": utterances / read,
                "mb_per_s": path.stat().st_size / 1e6 / read,
                "audio_hours_per_s": hours / read,
                "decoded_audio_hours_per_s": hours / full,
                "decoded_real_time_factor": hours * 3600 / full,
            }
        )
    return rows


def run(records: int, doc_seconds: float, reps: int) -> list[dict]:
    import numpy as np

    from megatron_soda.tokenization.prepare import _tokenize
    from megatron_soda.tokenization.text_tokenizer import extend_tokenizer, train_tiny_bpe

    rng = np.random.default_rng(0)
    tok, layout = extend_tokenizer(train_tiny_bpe([_text(rng, 40) for _ in range(200)], vocab_size=400))
    corpora = {
        "text": [{"text": _text(rng, 400)} for _ in range(records)],  # ~2.6 KB, a Common Crawl page
        "soda": [{"text": _soda_document(rng, layout, doc_seconds)} for _ in range(max(1, records // 10))],
    }
    rows = []
    print(f"corpus readers, one core; {records} text records, {len(corpora['soda'])} SODA documents of {doc_seconds} s")
    print(f"{'corpus':>6} {'format':>11} {'MB':>8} {'records/s':>12} {'MB/s':>8} {'audio-h/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for corpus, recs in corpora.items():
            for fmt in RECORD_SUFFIXES:  # every format soda prepare reads
                path = Path(tmp) / f"{corpus}{fmt}"
                WRITERS[fmt](recs, path)
                mb = sum(len(r["text"].encode()) for r in recs) / 1e6
                best = min(_timed(lambda p=path: sum(1 for _ in read_records(p))) for _ in range(reps))
                row = {"corpus": corpus, "format": fmt, "records": len(recs), "mb": mb, "seconds": best}
                row |= {"records_per_s": len(recs) / best, "mb_per_s": mb / best}
                if corpus == "soda":
                    row["audio_hours_per_s"] = len(recs) * doc_seconds / 3600 / best
                rows.append(row)
                print(
                    f"{corpus:>6} {fmt:>11} {mb:>8.1f} {row['records_per_s']:>12,.0f} {row['mb_per_s']:>8.1f} "
                    f"{row.get('audio_hours_per_s', 0):>10.2f}"
                )
        # the whole pre-tokenized route: read, tokenize (special tokens parsed), check against the layout
        path = Path(tmp) / "soda.parquet"

        def route() -> int:
            texts = [r["text"] for _, r in read_records(path)]
            ids = _tokenize(tok, texts, documents=True)
            assert all(layout.document_problem(x) is None for x in ids)
            return sum(len(x) for x in ids)

        tokens = route()
        best = min(_timed(route) for _ in range(reps))
        audio_h = len(corpora["soda"]) * doc_seconds / 3600
        rows.append(
            {
                "corpus": "soda",
                "format": "pretokenized route (.parquet)",
                "records_per_s": len(corpora["soda"]) / best,
                "tokens_per_s": tokens / best,
                "audio_hours_per_s": audio_h / best,
                "real_time_factor": audio_h * 3600 / best,
            }
        )
        r = rows[-1]
        print(
            f"pre-tokenized route (read + tokenize + check), .parquet: {r['records_per_s']:,.0f} docs/s, "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['audio_hours_per_s']:.2f} audio-h/s "
            f"= {r['real_time_factor']:,.0f}x real time per core (goal >= 1,000x per node)"
        )
        audio = _audio_rows(rng, max(8, records // 100), 5.0, reps, Path(tmp))
        head = ("audio archive", "MB", "records/s", "MB/s", "audio-h/s", "decoded", "x real")
        print("{:>20} {:>7} {:>10} {:>7} {:>10} {:>9} {:>8}".format(*head))
        for r in audio:
            name = r["corpus"] + " " + r["format"]
            print(
                f"{name:>20} {r['mb']:>7.1f} {r['records_per_s']:>10,.0f} {r['mb_per_s']:>7.1f} "
                f"{r['audio_hours_per_s']:>10.2f} {r['decoded_audio_hours_per_s']:>9.3f} "
                f"{r['decoded_real_time_factor']:>8,.0f}"
            )
        rows += audio
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class ReadersBenchConfig:
    records: int = field(default=20000, metadata={"help": "text records per file (SODA documents: a tenth)"})
    doc_seconds: float = field(default=60.0, metadata={"help": "audio per synthetic SODA document"})
    reps: int = 3
    json: str | None = field(default=None, metadata={"help": "also write the rows here"})


def bench_job(cfg: ReadersBenchConfig) -> list[dict]:
    """`soda bench readers`: corpus-file readers' records/s and the pre-tokenized route's audio-hours/s."""
    rows = run(cfg.records, cfg.doc_seconds, cfg.reps)
    write_json(rows, cfg.json)
    return rows
