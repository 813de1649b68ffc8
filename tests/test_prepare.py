import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from megatron_soda.data.shard_set import ShardSet
from megatron_soda.tokenization.audio_io import load_audio
from megatron_soda.tokenization.inputs import discover
from megatron_soda.tokenization.prepare import _units, prepare
from megatron_soda.tokenization.shard_format import read_index
from megatron_soda.tokenization.text_tokenizer import load_soda_tokenizer
from tests.conftest import prepare_config, read_json, shard_tokens


def test_prepare_summary_and_index(prepared, corpus):
    idx = read_index(prepared)
    meta = idx.meta
    assert meta["summary"]["files"] == 12 + 3 and meta["summary"]["skipped"] == {}
    assert meta["summary"]["fixed"]["resampled"] == 12
    assert meta["summary"]["counts"]["docs_text_first"] == meta["summary"]["counts"]["docs_audio_first"]
    assert meta["summary"]["counts"]["docs_text_only"] == 3
    assert meta["codec"]["name"] == "random:0" and meta["num_codebooks"] == 8 and idx.seq_len == 256
    assert idx.layout.vocab_size == idx.layout.text_vocab_size + 4 + 16384
    assert sum(s["samples"] for s in idx.shards) == idx.num_samples > 0
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()


def test_documents_are_interleaved_exactly_as_the_spec_says(prepared, corpus, tokenizer_dir, codec):
    """Rebuild shard 0's documents by hand from the corpus and compare token for token."""
    tok, L = load_soda_tokenizer(str(tokenizer_dir))
    docs = discover([str(corpus / "manifest.jsonl"), str(corpus / "text")], paired_needed=True).docs
    unit0 = _units(docs, 4)[0]
    expected = []
    for doc in unit0:
        texts = [tok(e.text, add_special_tokens=False)["input_ids"] for e in doc]
        audios = [L.codes_to_ids(codec.encode([load_audio(e.audio).samples])[0]).tolist() for e in doc]
        text_first = [L.bos_id]
        audio_first = [L.bos_id]
        for t, a in zip(texts, audios, strict=True):
            text_first += [L.text_start, *t, L.text_end, L.audio_start, *a, L.audio_end]
            audio_first += [L.audio_start, *a, L.audio_end, L.text_start, *t, L.text_end]
        expected += text_first + [L.eos_id] + audio_first + [L.eos_id]
    got = shard_tokens(ShardSet(prepared), 0)
    np.testing.assert_array_equal(got, np.array(expected))


def test_text_only_documents_are_plain_text(prepared, corpus, tokenizer_dir):
    tok, L = load_soda_tokenizer(str(tokenizer_dir))
    shards = ShardSet(prepared)
    last = shard_tokens(shards, len(shards.shards) - 1)
    text = (corpus / "text" / "doc002.txt").read_text().strip()
    want = [L.bos_id, *tok(text, add_special_tokens=False)["input_ids"], L.eos_id]
    assert last[-len(want) :].tolist() == want


@pytest.mark.slow
def test_num_codebooks_knob(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "semantic"
    cfg = prepare_config([corpus / "manifest.jsonl"], out, tokenizer_dir, num_codebooks=1, formats=["audio_only"])
    prepare(cfg, progress=False)
    shards = ShardSet(out)
    ids = np.concatenate([shards.read(k)[0] for k in range(len(shards))]).astype(np.int64)
    audio = ids[shards.index.layout.is_audio(ids)]
    assert len(audio) and (shards.index.layout.codebook_of(audio) == 0).all()
    assert read_index(out).meta["num_codebooks"] == 1


def _wav(path, seconds=1.0, rate=24000, channels=1, value=None):
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    if value is not None:
        x[:] = value
    subtype = "FLOAT" if str(path).endswith(".wav") else None  # FLAC stores integers
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, rate, subtype=subtype)


def test_bad_inputs_are_counted_and_good_files_all_make_it(tokenizer_dir, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    good = [d / f"good{i}.wav" for i in range(3)]
    for p in good:
        _wav(p, seconds=1.0, rate=22050)
    (d / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage garbage garbage")
    _wav(d / "empty.wav", seconds=0)
    _wav(d / "stereo48k.wav", seconds=1.0, rate=48000, channels=2)
    _wav(d / "long.wav", seconds=5.0)
    _wav(d / "nan.wav", seconds=1.0, value=np.nan)
    _wav(d / "tiny.wav", seconds=0.01)
    lines = [json.dumps({"id": f"good{i}", "audio": str(p), "text": f"good number {i}"}) for i, p in enumerate(good)]
    lines += [
        json.dumps({"id": "corrupt", "audio": "corrupt.wav", "text": "x"}),
        json.dumps({"id": "empty", "audio": "empty.wav", "text": "x"}),
        json.dumps({"id": "missing", "audio": "nope.wav", "text": "x"}),
        json.dumps({"id": "notext", "audio": str(good[0])}),
        json.dumps({"id": "stereo", "audio": "stereo48k.wav", "text": "a fixed file"}),
        json.dumps({"id": "long", "audio": "long.wav", "text": "too long"}),
        json.dumps({"id": "nan", "audio": "nan.wav", "text": "x"}),
        json.dumps({"id": "tiny", "audio": "tiny.wav", "text": "x"}),
        "{not json",
    ]
    latin1 = '{"id": "latin1", "audio": "good0.wav", "text": "caf\xe9"}'.encode("latin-1")  # not UTF-8
    (d / "manifest.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + latin1 + b"\n")
    cfg = prepare_config([d / "manifest.jsonl"], tmp_path / "out", tokenizer_dir, max_seconds=3.0)
    summary = prepare(cfg, progress=False)
    assert summary["skipped"] == {
        "bad_manifest_line": 2,
        "empty": 1,
        "missing_file": 1,
        "missing_transcript": 1,
        "non_finite": 1,
        "too_long": 1,
        "too_short": 1,
        "unreadable": 1,
    }
    assert summary["fixed"]["downmixed"] == 1 and summary["fixed"]["resampled"] >= 4
    assert summary["files"] == 4  # the three good files and the repaired stereo one
    assert summary["counts"]["docs_text_first"] == 4
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert sorted({s["reason"] for s in skipped}) == sorted(summary["skipped"])
    assert any("nope.wav" in s["item"] for s in skipped)
    assert any("not UTF-8" in s.get("detail", "") for s in skipped), skipped


def test_audio_only_directory_chunks_long_files(tokenizer_dir, tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    _wav(d / "a.wav", seconds=5.0)
    _wav(d / "b.flac", seconds=1.0)
    summary = prepare(
        prepare_config([d], tmp_path / "out", tokenizer_dir, max_seconds=2.0, formats=["audio_only"]), progress=False
    )
    assert summary["files"] == 2 and summary["fixed"]["chunked"] == 1 and summary["counts"]["docs_audio_only"] == 2
    # chunking (2 s + 2 s + 1 s) must not lose audio: 25 + 25 + 13 frames, and 13 for the 1 s file
    assert summary["counts"]["audio_tokens"] == (25 + 25 + 13 + 13) * 8


@pytest.mark.slow
def test_resume_redoes_only_missing_shards(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    cfg = lambda: prepare_config([corpus / "manifest.jsonl"], out, tokenizer_dir)  # noqa: E731
    prepare(cfg(), progress=False)
    index1 = read_json(out / "index.json")
    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) >= 3
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # lost shard
    shards[2].with_suffix(".json").unlink()  # shard written but never marked finished (killed mid-way)
    (out / f".{shards[0].name}.tmp-999").write_bytes(b"half")  # a crashed writer's temporary
    prepare(cfg(), progress=False)
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("shard-*.tar"))}
    redone = {n for n in after if after[n] != before[n]}
    assert redone == {shards[1].name, shards[2].name}
    index2 = read_json(out / "index.json")
    assert index2["shards"] == index1["shards"]  # the same bytes as the uninterrupted run


def test_other_settings_into_the_same_output_are_refused(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    prepare(prepare_config([corpus / "text"], out, tokenizer_dir), progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        prepare(prepare_config([corpus / "text"], out, tokenizer_dir, seq_len=128), progress=False)


@pytest.mark.slow
def test_ranks_split_the_work_and_equal_a_single_run(corpus, tokenizer_dir, tmp_path, prepared):
    out = tmp_path / "ranks"
    inputs = [corpus / "manifest.jsonl", corpus / "text"]
    s0 = prepare(prepare_config(inputs, out, tokenizer_dir, rank=0, world_size=2), progress=False)
    assert s0["pending_shards"] > 0 and not (out / "index.json").exists()
    prepare(prepare_config(inputs, out, tokenizer_dir, rank=1, world_size=2), progress=False)
    a, b = read_json(out / "index.json"), read_json(prepared / "index.json")
    assert a["shards"] == b["shards"]
    for rec in a["shards"]:
        assert (out / rec["file"]).read_bytes() == (prepared / rec["file"]).read_bytes()


@pytest.mark.slow
def test_worker_processes_give_the_same_shards(corpus, tokenizer_dir, tmp_path, prepared):
    out = tmp_path / "workers"
    prepare(
        prepare_config([corpus / "manifest.jsonl", corpus / "text"], out, tokenizer_dir, num_workers=2), progress=False
    )
    assert read_json(out / "index.json")["shards"] == read_json(prepared / "index.json")["shards"]


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_soda.cli",
            "prepare",
            "--input",
            str(tmp_path / "nope.jsonl"),
            "--output",
            str(tmp_path / "o"),
            "--tokenizer",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.jsonl" in lines[0], r.stderr


@pytest.mark.slow
def test_nothing_usable_is_an_error_not_an_empty_set(tokenizer_dir, tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a", "audio": "missing.wav", "text": "x"}\n{broken\n')
    args = ["--input", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "o"), "--tokenizer", str(tokenizer_dir)]
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", "prepare", *args, "--codec", "random:0", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no samples were written" in r.stderr and "missing_file 1" in r.stderr, r.stderr
