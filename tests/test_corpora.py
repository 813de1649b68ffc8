"""Corpora as they ship: compressed JSONL and Parquet streamed into shards, and the released
pre-tokenized SODA documents tokenized as they are; each checked against the manifest route."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import zstandard

from megatron_soda.data.shard_set import ShardSet
from megatron_soda.tokenization.inputs import discover
from megatron_soda.tokenization.prepare import prepare
from megatron_soda.tokenization.readers import read_records
from megatron_soda.tokenization.shard_format import read_sidecar
from megatron_soda.tokenization.text_tokenizer import load_soda_tokenizer
from tests.conftest import prepare_config, shard_tokens


def _tokens(root) -> np.ndarray:
    """Every shard's token stream in order, the one-token overlaps undone and the padding dropped."""
    shards = ShardSet(root)
    return np.concatenate([shard_tokens(shards, k) for k in range(len(shards.shards))])


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
    import io
    import tarfile

    with tarfile.open(tmp_path / "w.tar", "w") as tf:  # WebDataset: a broken json, then a txt-only sample
        for name, data in (("x/a.json", b"{oops"), ("x/a.flac", b"fLaC"), ("x/b.txt", "hé".encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (bad, b) = list(read_records(tmp_path / "w.tar"))
    assert bad[0] == 1 and bad[1].startswith("x/a.json: ") and b == (2, {"text": "hé", "id": "b"})


@pytest.mark.slow
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


@pytest.mark.slow  # its fixture trains (or runs the codec)
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


def _flac(wav) -> bytes:
    """A corpus clip as FLAC bytes: lossless, so it decodes to the WAV's samples exactly."""
    import io

    import soundfile as sf

    x, rate = sf.read(str(wav), dtype="int16")
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _emilia_tar(path, corpus, records, ext="flac") -> None:
    """Emilia / Emilia-YODAS style: per utterance <id>.<audio> + <id>.json, ids
    EN_B00000_S<source>_W<utterance>, no `doc` field (the reader derives it from the id)."""
    import io
    import tarfile

    import soundfile as sf

    with tarfile.open(path, "w") as tf:
        for i, r in enumerate(records):
            uid = f"EN_B00000_S{int(r['doc'][3:]):05d}_W{i:06d}"
            if ext == "flac":
                audio = _flac(r["audio"])
            else:
                x, rate = sf.read(r["audio"])
                buf = io.BytesIO()
                sf.write(buf, x, rate, format="MP3")
                audio = buf.getvalue()
            meta = json.dumps({"id": uid, "text": r["text"], "speaker": r["speaker"], "language": "en"}).encode()
            for name, data in ((f"{uid}.json", meta), (f"{uid}.{ext}", audio)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _recordings(records) -> list[dict]:
    """YODAS2 style: one row per source recording (its utterances' clips end to end, as FLAC) with
    the utterances' transcripts and start/end times."""
    import io

    import soundfile as sf

    rows, by_doc = [], {}
    for r in records:
        by_doc.setdefault(r["doc"], []).append(r)
    for doc, utts in by_doc.items():
        clips, times, t = [], [], 0
        for u in utts:
            x, rate = sf.read(u["audio"], dtype="int16")
            clips.append(x)
            times.append({"text": u["text"], "start": t / rate, "end": (t + len(x)) / rate})
            t += len(x)
        buf = io.BytesIO()
        sf.write(buf, np.concatenate(clips), rate, format="FLAC", subtype="PCM_16")
        rows.append({"id": doc, "audio": {"bytes": buf.getvalue(), "path": f"{doc}.flac"}, "utterances": times[::-1]})
    return rows


@pytest.mark.slow
def test_audio_archives_and_tables_give_the_manifest_routes_shards_bit_for_bit(
    corpus, tokenizer_dir, tmp_path, monkeypatch
):
    """The corpus as Emilia tars (FLAC and MP3), a Parquet audio column, a `datasets` folder reached
    through hf:// (offline, from the local Hub cache) and YODAS2-style long recordings cut by
    utterance times: each streamed file is one shard, and the lossless ones hold exactly the token
    stream of the same utterances read from WAV files through a manifest."""
    records = _manifest_records(corpus)[:4]  # a few utterances: each format costs a Mimi encoding of them
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    (tmp_path / "speech.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    _emilia_tar(tmp_path / "emilia-000000.tar", corpus, records)
    _emilia_tar(tmp_path / "emilia-mp3.tar", corpus, records[:3], ext="mp3")
    table = [{**r, "audio": {"bytes": _flac(r["audio"]), "path": r["id"] + ".flac"}} for r in records]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "hf-audio.parquet")
    pq.write_table(pa.Table.from_pylist(_recordings(records)), tmp_path / "yodas2.parquet")
    snapshot = tmp_path / "hub" / "datasets--soda-test--tiny" / "snapshots" / "0123abcd"
    (snapshot / "train").mkdir(parents=True)
    with pa.OSFile(str(snapshot / "train" / "data-00000-of-00001.arrow"), "wb") as sink:
        t = pa.Table.from_pylist(table)
        with pa.ipc.new_stream(sink, t.schema) as writer:  # what datasets.save_to_disk writes
            writer.write_table(t)
    (snapshot / "train" / "state.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    inputs = ["speech.jsonl.zst", "emilia-000000.tar", "hf-audio.parquet", "yodas2.parquet", "emilia-mp3.tar"]
    out = tmp_path / "set"
    cfg = prepare_config([*(tmp_path / i for i in inputs), "hf://datasets/soda-test/tiny/train"], out, tokenizer_dir)
    summary = prepare(cfg, progress=False)
    assert summary["skipped"] == {} and summary["files"] == 4 * 5 + 3
    shards = ShardSet(out)
    streams = [shard_tokens(shards, k) for k in range(len(inputs) + 1)]
    for k in (1, 2, 3, 5):  # lossless: the manifest route's tokens exactly
        np.testing.assert_array_equal(streams[k], streams[0], err_msg=(inputs + ["hf://"])[k])
    mp3 = read_sidecar(out / "shard-000004.tar")["stats"]
    docs = 1 + sum(a["doc"] != b["doc"] for a, b in zip(records[:2], records[1:3], strict=True))
    assert mp3["docs_text_first"] == mp3["docs_audio_first"] == docs  # one per source recording
    tok, _ = load_soda_tokenizer(str(tokenizer_dir))
    transcripts = sum(len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in records[:3])
    assert mp3["text_tokens"] == 2 * (transcripts + 2 * docs)  # both orders; a BOS and an EOS per document
    seconds = sum(sf.info(r["audio"]).duration for r in records[:3])  # MP3 adds encoder padding
    assert seconds * 0.98 < mp3["audio_seconds_x1000"] / 1000 < seconds * 1.15, (seconds, mp3)
