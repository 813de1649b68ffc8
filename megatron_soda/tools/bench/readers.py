"""`soda bench readers`: records/s of each corpus-file reader, and audio-hours/s of the pre-tokenized route.

`soda prepare` streams corpus files record by record; on a cluster the readers feed GPU Mimi
encoders (or, for the released pre-tokenized documents, the tokenizer alone), so a reader must
never be the bottleneck: the goal is >= 1,000x real time of audio per node. This writes synthetic
files of each format (text documents of Nemotron-like length; SODA documents of `--doc-seconds` of
audio as private-use characters plus their transcripts) and times reading them, and the whole
pre-tokenized route (read + tokenize + layout check) on one core.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_soda.tools.bench import write_json

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


def _write(records: list[dict], path: Path) -> None:
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
        return
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if name.endswith(".gz"):
        raw = gzip.compress(raw)
    elif name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)


def run(records: int, doc_seconds: float, reps: int) -> list[dict]:
    from megatron_soda.tokenization.prepare import _tokenize
    from megatron_soda.tokenization.readers import read_records
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
            for fmt in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"):
                path = Path(tmp) / f"{corpus}{fmt}"
                _write(recs, path)
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
