"""Corpora as they ship: compressed JSONL and Parquet streamed into shards, and the released
pre-tokenized SODA documents tokenized as they are; each checked against the manifest route."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from megatron_soda.data.shard_set import ShardSet
from megatron_soda.tokenization.inputs import discover
from megatron_soda.tokenization.prepare import prepare
from megatron_soda.tokenization.readers import read_records
from megatron_soda.tokenization.text_tokenizer import load_soda_tokenizer
from tests.conftest import prepare_config


def _tokens(root) -> np.ndarray:
    """Every shard's token stream in order, the one-token overlaps undone and the padding dropped."""
    shards = ShardSet(root)
    out, start = [], 0
    for end in shards.cumulative.tolist():
        samples = [shards.read(k)[0] for k in range(start, int(end))]
        stream = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]]).astype(np.int64)
        out.append(stream[stream != shards.sentinel])
        start = int(end)
    return np.concatenate(out)


def _manifest_records(corpus) -> list[dict]:
    recs = [json.loads(x) for x in (corpus / "manifest.jsonl").read_text().splitlines()]
    return [{**r, "audio": str(corpus / r["audio"])} for r in recs]


def _text_records(corpus) -> list[dict]:
    return [{"id": p.name, "text": p.read_text()} for p in sorted((corpus / "text").glob("*.txt"))]


def test_readers_stream_every_format_alike(tmp_path):
    recs = [{"text": f"doc {i} é"} for i in range(5)]
    lines = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in recs) + b"\xff\xfe\n[1]\n"
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    want = [*enumerate(recs, 1), (6, "not UTF-8 (invalid start byte at byte 0)"), (7, "not a JSON object")]
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst"):
        assert list(read_records(tmp_path / name)) == want, name
    assert list(read_records(tmp_path / "a.parquet")) == want[:5]
    got = discover([str(tmp_path)], paired_needed=True)
    assert sorted(p.name for p in got.streams) == ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"]


def test_corpus_files_give_the_manifest_routes_shards_bit_for_bit(corpus, tokenizer_dir, prepared, tmp_path):
    """The corpus' paired utterances as .jsonl.zst and its text documents as Parquet (Nemotron-style
    `text` column), streamed: the same token stream as the manifest + folder route."""
    lines = "".join(json.dumps(r) + "\n" for r in _manifest_records(corpus)).encode()
    (tmp_path / "speech.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.Table.from_pylist(_text_records(corpus)), tmp_path / "text.parquet")
    out = tmp_path / "set"
    summary = prepare(
        prepare_config([tmp_path / "speech.jsonl.zst", tmp_path / "text.parquet"], out, tokenizer_dir),
        progress=False,
    )
    assert summary["files"] == 12 + 3 and summary["skipped"] == {}
    assert len(ShardSet(out).shards) == 2  # one shard per corpus file
    np.testing.assert_array_equal(_tokens(out), _tokens(prepared))


def test_pretokenized_documents_go_in_as_they_are_and_bad_ones_are_counted(prepared, tokenizer_dir, tmp_path):
    """Documents as the released sets hold them (audio as private-use characters, their own
    <|begin_of_text|> / <|end_of_text|>), in a Parquet `text` column: tokenized with no codec and no
    BOS/EOS added, they give the manifest route's token stream; a broken one is skipped by name."""
    tok, layout = load_soda_tokenizer(str(tokenizer_dir))
    stream = _tokens(prepared)
    docs = np.split(stream, np.flatnonzero(stream == layout.eos_id)[:-1] + 1)
    texts = [tok.decode(d.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False) for d in docs]
    first_audio = next(i for i, ch in enumerate(texts[0]) if 0xE000 <= ord(ch) < 0xE000 + 8 * 2048)
    cut = texts[0][:first_audio] + texts[0][first_audio + 1 :]  # one audio code lost: frames shifted
    records = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)] + [{"id": "broken", "text": cut}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "released.parquet")
    out = tmp_path / "set"
    cfg = prepare_config([tmp_path / "released.parquet"], out, tokenizer_dir, codec="no/such/codec", pretokenized=True)
    summary = prepare(cfg, progress=False)  # an unloadable codec: none is loaded
    assert summary["counts"]["docs_document"] == len(docs) and summary["skipped"] == {"bad_document": 1}
    np.testing.assert_array_equal(_tokens(out), stream)
    (skip,) = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert skip["item"] == "broken" and "audio" in skip["detail"]
