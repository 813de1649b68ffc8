"""Refusals and clean-ups at the edges of the offline tools (import-hf, export-hf, inspect, eval,
generate, prepare and its corpus readers): what a user can get wrong, or a cluster can do to a
job, is one line naming what and where, and leaves no partial output behind."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_soda.cli import main
from megatron_soda.tokenization.vocab import SodaLayout
from tests.conftest import prepare_config, synthetic_set
from tests.launch import ROOT, env, soda


def one_line(text: str) -> str:
    """The error output, asserted to be one line without a traceback."""
    text = text.strip()
    assert text and "\n" not in text and "Traceback" not in text, text[-3000:]
    return text


def run_soda(*args: str, extra_env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`soda ARGS` in its own process, offline, with `extra_env` on top."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", *args],
        capture_output=True,
        text=True,
        env={**env(), "HF_HUB_OFFLINE": "1", **(extra_env or {})},
        cwd=ROOT,
        timeout=timeout,
    )


def empty_hub(tmp_path: Path) -> dict:
    """An environment offline with an empty Hugging Face cache: nothing can come from the Hub."""
    home = tmp_path / "hf_home"
    home.mkdir(exist_ok=True)
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --- soda import-hf ---------------------------------------------------------------------------


def qwen3_folder(folder: Path, dtype=None, **config) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    shape = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
    )
    model = Qwen3ForCausalLM(Qwen3Config(**(shape | config)))
    (model.to(dtype) if dtype is not None else model).save_pretrained(str(folder))
    return folder


def replace_tensor(folder: Path, name: str, tensor) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(str(path))
    state[name] = tensor
    save_file(state, str(path), metadata={"format": "pt"})


def test_import_hf_checks_every_weight_against_the_config_before_building(tmp_path, capsys):
    import torch

    base = qwen3_folder(tmp_path / "base")
    layer = "model.layers.0."
    cases = {  # name -> (tensor or None for a config edit, what the refusal must say)
        "norm_one": (layer + "self_attn.q_norm.weight", torch.ones(1), "shape [1], config.json implies [8]"),
        "broadcast_row": (
            layer + "self_attn.k_proj.weight",
            torch.zeros(1, 16),
            "shape [1, 16], config.json implies [8, 16]",
        ),
        "rmsnorm_length": (layer + "input_layernorm.weight", torch.ones(15), "shape [15], config.json implies [16]"),
        "int64": (
            "model.embed_tokens.weight",
            torch.zeros(64, 16, dtype=torch.int64),
            "is I64, expected floating-point",
        ),
        "bool": ("model.norm.weight", torch.ones(16, dtype=torch.bool), "is BOOL, expected floating-point"),
    }
    capsys.readouterr()  # transformers' saving bar
    for case, (name, tensor, said) in cases.items():
        src = tmp_path / case
        shutil.copytree(base, src)
        replace_tensor(src, name, tensor)
        assert main(["import-hf", str(src), str(tmp_path / "out" / case)]) == 2, case
        err = one_line(capsys.readouterr().err)
        assert f"tensor {name} " in err and said in err, err
    # a config.json that claims a far larger model than its weights: refused from the headers,
    # before a model of that size is built
    big = tmp_path / "big"
    shutil.copytree(base, big)
    cfg = json.loads((big / "config.json").read_text())
    (big / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 200_000}))
    t0 = time.time()
    assert main(["import-hf", str(big), str(tmp_path / "out" / "big")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "mlp.gate_proj.weight has shape [32, 16], config.json implies [200000, 16]" in err, err
    assert time.time() - t0 < 30
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_import_hf_takes_bf16_and_tied_weights(tmp_path):
    """The checks refuse nothing a transformers Qwen3 writes: bf16 weights, tied (no lm_head)."""
    import torch

    src = qwen3_folder(tmp_path / "tied", dtype=torch.bfloat16, tie_word_embeddings=True)
    r = run_soda("import-hf", str(src), str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()


# --- a real checkpoint, damaged in copies ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """The tiny model after one step on a small synthetic shard set (every checkpoint test copies it)."""
    root = tmp_path_factory.mktemp("refusal_ckpt")
    layout = SodaLayout(text_vocab_size=256, bos_id=0, eos_id=1, codebooks=2, codebook_size=64)
    synthetic_set(root / "shards", [8, 8], seq_len=64, layout=layout)
    run = root / "run"
    soda(
        "train",
        "--config",
        "configs/tiny.yaml",
        "--device",
        "cpu",
        "--run-dir",
        str(run),
        "--data.paths",
        f"[{root / 'shards'}]",
        "--data.num_workers",
        "0",
        "--train.steps",
        "1",
        "--train.seq_length",
        "64",
    )
    return run


def checkpoint_copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip(), dest)
    return dest


@pytest.mark.slow
def test_damaged_checkpoints_are_one_line_for_inspect_and_export(trained_run, tmp_path, capsys):
    assert main(["inspect", str(trained_run)]) == 0  # the intact one is inspected
    assert "optimizer state: yes" in capsys.readouterr().out

    missing = checkpoint_copy(trained_run, tmp_path / "missing")
    lost = sorted(missing.glob("*.distcp"))[-1]
    lost.unlink()
    assert main(["inspect", str(missing)]) == 2
    assert f"shard file {lost.name} is missing" in one_line(capsys.readouterr().err)
    assert main(["export-hf", str(missing), str(tmp_path / "out")]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("soda export-hf: error: ") and f"shard file {lost.name} is missing" in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))

    for case, content in (("garbage", b"this is not a pickle"), ("empty", b"")):
        bad = checkpoint_copy(trained_run, tmp_path / case)
        (bad / "common.pt").write_bytes(content)
        for cmd in (["inspect", str(bad)], ["export-hf", str(bad), str(tmp_path / f"out_{case}")]):
            assert main(cmd) == 2, (case, cmd)
            err = one_line(capsys.readouterr().err)
            assert "common state" in err and "weights_only" not in err, err
        assert not (tmp_path / f"out_{case}").exists()

    run = tmp_path / "latest_dir"
    shutil.copytree(trained_run, run)
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "latest").mkdir()
    assert main(["inspect", str(run)]) == 2
    one_line(capsys.readouterr().err)

    cut = checkpoint_copy(trained_run, tmp_path / "cut")  # a copy that stopped half-way through a file
    shard = sorted(cut.glob("*.distcp"))[-1]
    os.truncate(shard, shard.stat().st_size // 2)
    for cmd in (["inspect", str(cut)], ["export-hf", str(cut), str(tmp_path / "out_cut")]):
        assert main(cmd) == 2, cmd
        assert f"shard file {shard.name} is truncated" in one_line(capsys.readouterr().err)

    newer = checkpoint_copy(trained_run, tmp_path / "newer")  # written by a later checkpoint format
    meta = json.loads((newer / "metadata.json").read_text())
    (newer / "metadata.json").write_text(json.dumps({**meta, "sharded_backend_version": 99}))
    assert main(["export-hf", str(newer), str(tmp_path / "out_newer")]) == 2
    err = one_line(capsys.readouterr().err)
    assert str(newer) in err and "99" in err, err
    assert not (tmp_path / "out_newer").exists()


# --- soda export-hf ---------------------------------------------------------------------------


@pytest.mark.slow
def test_export_hf_force_onto_a_file_is_one_line_and_keeps_the_file(trained_run, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    assert main(["export-hf", str(trained_run), str(target), "--force"]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{target} is a file" in err, err
    assert target.read_text() == "keep me"


@pytest.mark.slow
def test_sigterm_during_export_removes_its_partial_folder_and_stale_ones_go_next_time(trained_run, tmp_path):
    stale = tmp_path / f".hf.tmp-{dead_pid()}"  # what an export killed by SIGKILL leaves: a whole model
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    live = subprocess.Popen(["sleep", "120"])  # an export of that pid may still be writing: kept
    running = tmp_path / f".hf.tmp-{live.pid}"
    running.mkdir()
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megatron_soda.cli",
                "export-hf",
                str(trained_run),
                str(tmp_path / "hf"),
                "--verify",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env(), HF_HUB_OFFLINE="1"),
            cwd=ROOT,
        )
        partial = tmp_path / f".hf.tmp-{proc.pid}"
        deadline = time.time() + 240
        while not partial.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert partial.exists(), "the export never began writing"
        assert not stale.exists() and running.is_dir()  # a dead pid's partial is gone, a live one's kept
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err[-3000:]
        assert "stopped by SIGTERM" in one_line(err)
        assert not partial.exists() and not (tmp_path / "hf").exists()
    finally:
        live.kill()
        live.wait()


# --- soda eval --------------------------------------------------------------------------------

GOOD_ITEMS = {
    "storycloze": {"prompt": "My father opened", "endings": [" the door.", " door the."], "label": 0},
    "multiple_choice": {"context": "The cat", "endings": [{"text": " sat."}, " sat sat.", " the."], "label": 2},
    "minimal_pairs": {"positive": {"audio": "a.wav"}, "negative": "a dog"},
    "salmon": {"positive": {"audio": "a.wav"}, "negative": {"audio": "b.wav"}, "task": "speaker"},
    "asr": {"audio": "a.wav", "text": "hello"},
    "tts": {"text": "hello", "prompt_audio": "ref.wav", "prompt_text": "a reference"},
    "s2st": {"source_audio": "a.wav", "target_text": "bonjour"},
}


def test_eval_items_of_the_wrong_shape_are_refused_naming_file_line_and_field(tmp_path, capsys):
    from megatron_soda import evals

    bad = [
        ("storycloze", {"prompt": "a", "endings": "notalist", "label": 0}, "field 'endings' must be a list"),
        ("storycloze", {"prompt": "a", "endings": ["only one"], "label": 0}, "at least 2"),
        ("multiple_choice", {"context": "a", "endings": ["x", 3], "label": 0}, "field 'endings[1]'"),
        ("multiple_choice", {"context": "a", "endings": ["x", "y"], "label": "0"}, "field 'label'"),
        ("multiple_choice", {"context": "a", "endings": ["x", "y"], "label": 2}, "field 'label'"),
        ("multiple_choice", {"context": "a", "endings": ["x", "y"]}, "missing field 'label'"),
        ("storycloze", {"prompt": {"text": ""}, "endings": ["x", "y"], "label": 0}, "field 'prompt'"),
        ("minimal_pairs", {"positive": "a"}, "missing field 'negative'"),
        ("tblimp", {"positive": ["a"], "negative": "b"}, "field 'positive'"),
        ("salmon", {"positive": {"audio": 3}, "negative": {"audio": "b.wav"}}, "field 'positive'"),
        ("asr", {"audio": 5, "text": "x"}, "field 'audio' must be a non-empty string"),
        ("tts", {"text": "x", "prompt_audio": "a.wav"}, "'prompt_text'"),
        ("s2st", {"source_audio": "a.wav"}, "missing field 'target_text'"),
        ("asr", ["a.wav", "x"], "not a JSON object"),
    ]
    for n, (kind, item, said) in enumerate(bad):
        path = tmp_path / f"{n}_{kind}.jsonl"
        base = GOOD_ITEMS.get(kind, GOOD_ITEMS["minimal_pairs"])
        path.write_text(json.dumps(base) + "\n\n" + json.dumps(item) + "\n")  # the bad item on line 3
        assert main(["eval", "--task", f"{kind}:{path}", str(tmp_path / "no_model")]) == 2, item
        err = one_line(capsys.readouterr().err)
        assert err.startswith(f"soda eval: error: {path}:3: ") and said in err, (item, err)
    for kind, item in GOOD_ITEMS.items():  # what the scorers read passes
        path = tmp_path / f"good_{kind}.jsonl"
        path.write_text(json.dumps(item) + "\n")
        assert evals.read_items(path, kind) == [item]
    assert main(["eval", "--task", f"asr:{path}", "--max-seconds", "0", str(tmp_path / "no_model")]) == 2
    assert "--max-seconds" in one_line(capsys.readouterr().err)


# --- corpus readers: tar members ---------------------------------------------------------------


def crafted_tar(path: Path, members: list[tuple[str, bytes, int | None]], compress: bool = False) -> Path:
    """A tar whose member headers may declare another size than the data that follows them."""
    buf = io.BytesIO()
    for name, data, declared in members:
        info = tarfile.TarInfo(name)
        info.size = len(data) if declared is None else declared
        buf.write(info.tobuf(format=tarfile.GNU_FORMAT))
        buf.write(data + b"\0" * (-len(data) % 512))
    raw = buf.getvalue() + b"\0" * 1024
    path.write_bytes(gzip.compress(raw, compresslevel=1) if compress else raw)
    return path


def test_tar_members_are_bounded_by_their_declared_size_and_the_data_there(tmp_path):
    from megatron_soda.tokenization.inputs import Skip, entries_of_file
    from megatron_soda.tokenization.readers import read_records

    good = [("a.json", json.dumps({"text": "hello there"}).encode(), None), ("a.flac", b"\1" * 1000, None)]
    cases = {  # file -> (members after the good sample, compressed, what the bad record says)
        "past_the_end.tar": ([("b.flac", b"\2" * 200_000, 10**10)], False, "past the end of the"),
        "over_the_limit.tar": ([("b.flac", b"\2" * 2000, 3 * 2**30)], True, "more than the 2,147,483,648"),
        "short.tar": ([("b.json", b"{}", 2**20)], True, "the archive ends before its data does"),
        "absurd.tar": ([("b.bin", b"\2" * 2000, 8 * 10**18)], True, "the rest of absurd.tar is not read"),
        "big_json.tar": ([("b.json", b" " * (64 * 2**20 + 1), None)], True, "more than the 67,108,864"),
    }
    for name, (members, compress, said) in cases.items():
        path = crafted_tar(tmp_path / name, good + members, compress)
        records = list(read_records(path))
        assert [n for n, _ in records] == [1, 2], (name, records)
        assert records[0][1]["text"] == "hello there" and records[0][1]["audio"]["bytes"] == b"\1" * 1000
        assert isinstance(records[1][1], str) and said in records[1][1], (name, records[1][1])
        skips: list[Skip] = []
        entries = list(entries_of_file(path, paired_needed=False, documents=False, skips=skips))
        assert len(entries) == 1 and [s.reason for s in skips] == ["bad_manifest_line"], (name, skips)
        assert skips[0].item == f"{path}:2"


# --- soda generate ------------------------------------------------------------------------------


def test_generate_refuses_a_max_seconds_that_is_not_positive(tmp_path, capsys):
    for value in ("0", "-5"):
        cmd = ["generate", str(tmp_path / "no_model"), "--task", "tts", "--text", "hi", "--max-seconds", value]
        assert main(cmd) == 2
        assert f"--max-seconds: the longest audio segment generated must be > 0 s, got {value}" in one_line(
            capsys.readouterr().err
        )


@pytest.mark.slow
def test_long_prompt_audio_is_encoded_in_pieces(codec, tmp_path):
    import soundfile as sf

    from megatron_soda.generate import PROMPT_PIECE_SECONDS, audio_prompt_ids
    from megatron_soda.tokenization.audio_io import load_audio

    assert PROMPT_PIECE_SECONDS <= 60  # as soda prepare cuts long audio by default
    wav = tmp_path / "long.wav"
    sf.write(str(wav), np.random.default_rng(0).uniform(-0.3, 0.3, int(3.4 * 24_000)), 24_000)
    layout = SodaLayout()
    got = audio_prompt_ids([str(wav)], codec, layout, piece_seconds=1.5)[0]
    # 0-1.5 s and 1.5-3.4 s (the 0.4 s tail joins the piece before it), each encoded on its own
    pieces = [codec.encode([load_audio(wav, codec.sample_rate, segment=b).samples])[0] for b in ((0, 1.5), (1.5, 3.4))]
    assert np.array_equal(got, layout.codes_to_ids(np.concatenate(pieces)))
    whole = layout.codes_to_ids(codec.encode([load_audio(wav, codec.sample_rate).samples])[0])
    assert not np.array_equal(got, whole)  # the pieces are what was encoded, not the whole file


@pytest.mark.slow
def test_generate_refuses_a_prompt_longer_than_the_model_positions(tokenizer_dir, tmp_path, capsys):
    import soundfile as sf
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_soda.tokenization.text_tokenizer import load_soda_tokenizer

    tok, layout = load_soda_tokenizer(str(tokenizer_dir))
    model_dir = tmp_path / "model"
    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8)
    cfg = Qwen3Config(vocab_size=layout.vocab_size, num_key_value_heads=1, max_position_embeddings=256, **shape)
    Qwen3ForCausalLM(cfg).save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    wav = tmp_path / "thirty_seconds.wav"  # 30 s x 12.5 frames x 8 codebooks = 3,000 audio tokens
    sf.write(str(wav), np.zeros(30 * 8000, dtype=np.int16), 8000)
    out = ["--codec", "random:0", "--out", str(tmp_path / "gen")]
    capsys.readouterr()  # transformers' saving bar
    assert main(["generate", str(model_dir), "--task", "asr", "--audio", str(wav), *out]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--audio {wav} (30.0 s of audio, prompt 0) is 3,000 tokens, the model has 256 positions" in err, err
    assert main(["generate", str(model_dir), "--task", "tts", "--text", "the cat sat " * 200, *out]) == 2
    err = one_line(capsys.readouterr().err)
    assert "prompt 0 is " in err and "the model has 256 positions" in err, err
    assert not (tmp_path / "gen").exists()


# --- soda prepare -------------------------------------------------------------------------------


@pytest.mark.slow
def test_one_prepare_per_slice_of_an_output_directory(corpus, tokenizer_dir, tmp_path):
    from megatron_soda.parallel.locks import hold

    out = tmp_path / "out"
    held = hold(out / ".lock-rank0-of-2", "soda prepare")  # as a running `soda prepare --rank 0 --world-size 2`
    try:
        args = ["prepare", "--input", str(corpus / "text"), "--output", str(out), "--tokenizer", str(tokenizer_dir)]
        args += ["--files-per-shard", "1", "--world-size", "2", "--no-progress"]
        r = run_soda(*args, "--rank", "0")
        assert r.returncode == 2 and f"pid {os.getpid()}" in one_line(r.stderr), r.stderr
        assert not (out / "shard-000000.tar").exists()
        r = run_soda(*args, "--rank", "1")  # another slice of the same job array runs meanwhile
        assert r.returncode == 0, r.stderr[-3000:]
        assert (out / "shard-000001.tar").is_file()
    finally:
        held.close()


def test_prepare_removes_partial_shards_that_killed_runs_of_its_slice_left(corpus, tokenizer_dir, tmp_path):
    from megatron_soda.tokenization.prepare import prepare

    out = tmp_path / "out"
    out.mkdir()
    dead = dead_pid()
    live = subprocess.Popen(["sleep", "120"])
    try:
        gone = [out / f".shard-000000.tar.tmp-{dead}", out / f".shard-000000.tar.crc32.tmp-{dead}"]
        kept = [
            out / f".shard-000001.tar.tmp-{dead}",  # unit 1 is the other slice's (it may run on another node)
            out / f".shard-000002.json.tmp-{live.pid}",  # its writer still runs
        ]
        for p in gone + kept:
            p.write_bytes(b"\0" * 1024)
        cfg = prepare_config([corpus / "text"], out, tokenizer_dir, files_per_shard=1, rank=0, world_size=2)
        prepare(cfg, progress=False)
        assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)
        assert (out / "shard-000000.tar").is_file() and (out / "shard-000002.tar").is_file()
    finally:
        live.kill()
        live.wait()


@pytest.mark.slow
def test_sigterm_ends_prepare_and_its_workers_and_removes_their_partial_shards(corpus, tokenizer_dir, tmp_path):
    import psutil

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "megatron_soda.cli", "prepare", "--input", str(corpus / "manifest.jsonl")]
    cmd += ["--output", str(out), "--tokenizer", str(tokenizer_dir), "--codec", "random:0", "--num-workers", "2"]
    cmd += ["--files-per-shard", "2", "--seq-len", "256", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    parent = psutil.Process(proc.pid)

    def workers() -> list:
        found = []
        for child in parent.children(recursive=True):
            try:
                if "multiprocessing" in " ".join(child.cmdline()):  # the pool's workers, its resource tracker
                    found.append(child)
            except psutil.Error:
                pass
        return found

    deadline = time.time() + 240
    while proc.poll() is None and len(workers()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    helpers = workers()
    assert len(helpers) >= 3, "the workers never started"
    time.sleep(2)  # into their first units
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "stopped by SIGTERM" in one_line(err), err[-3000:]
    _, alive = psutil.wait_procs(helpers, timeout=5)
    assert not alive, f"still running after their parent: {[p.cmdline() for p in alive]}"
    assert not list(out.glob(".shard-*"))  # no partial shard of a worker is left
    for shard in out.glob("shard-*.tar"):  # what is there is finished
        assert shard.with_suffix(".json").is_file()


@pytest.mark.slow
def test_text_only_inputs_never_load_a_codec(corpus, tokenizer_dir, tmp_path):
    import zstandard

    corpus_zst = tmp_path / "web.jsonl.zst"
    lines = "".join(json.dumps({"text": f"document {i} of a web corpus."}) + "\n" for i in range(5))
    corpus_zst.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    out = tmp_path / "out"
    args = ["--input", str(corpus / "text"), "--input", str(corpus_zst), "--output", str(out)]
    r = run_soda("prepare", *args, "--tokenizer", str(tokenizer_dir), "--no-progress", extra_env=empty_hub(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]  # the default codec (kyutai/mimi) is not on this machine
    index = json.loads((out / "index.json").read_text())
    assert index["codec"]["name"] == "kyutai/mimi" and index["summary"]["counts"]["docs_text_only"] == 8


@pytest.mark.slow
def test_what_the_hub_cannot_give_offline_is_one_line_saying_how_to_give_it(corpus, tokenizer_dir, tmp_path):
    offline = empty_hub(tmp_path)
    args = ["prepare", "--input", str(corpus / "manifest.jsonl"), "--output", str(tmp_path / "out"), "--no-progress"]
    r = run_soda(*args, "--tokenizer", str(tokenizer_dir), "--codec", "kyutai/mimi", extra_env=offline)
    err = one_line(r.stderr)
    assert r.returncode == 2 and "codec kyutai/mimi: cannot load it" in err and "--codec /path/to/mimi" in err, err
    r = run_soda(*args, "--tokenizer", "nosuch-org/nosuch-tokenizer", "--codec", "random:0", extra_env=offline)
    err = one_line(r.stderr)
    assert r.returncode == 2 and "tokenizer nosuch-org/nosuch-tokenizer: cannot load it" in err, err
    assert "local tokenizer folder" in err and "HF_HUB_OFFLINE" in err


def test_a_manifest_path_with_a_nul_byte_is_a_skipped_line(tokenizer_dir, tmp_path):
    from megatron_soda.tokenization.prepare import prepare

    manifest = tmp_path / "m.jsonl"
    rows = [
        {"text": "a text document that is fine."},
        {"audio": "clip\u0000.wav", "text": "a transcript"},
        {"source_audio": "a\u0000.wav", "target_audio": "b.wav", "source_text": "x", "target_text": "y"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = prepare(prepare_config([manifest], tmp_path / "out", tokenizer_dir), progress=False)
    assert summary["skipped"] == {"bad_manifest_line": 2} and summary["counts"]["docs_text_only"] == 1
    skipped = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [s["item"] for s in skipped] == [f"{manifest}:2", f"{manifest}:3"]
    assert all("NUL byte" in s["detail"] for s in skipped)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(corpus, tokenizer_dir, tmp_path, capsys):
    """Writes that meet a full disk, made real with /dev/full under the name the writer opens."""
    out = tmp_path / "out"
    out.mkdir()
    args = ["prepare", "--input", str(corpus / "text"), "--output", str(out), "--tokenizer", str(tokenizer_dir)]
    args += ["--no-progress"]
    for target in (f".shard-000000.tar.tmp-{os.getpid()}", f".index.json.tmp-{os.getpid()}"):
        (out / target).symlink_to("/dev/full")
        assert main(args) == 2, target
        err = one_line(capsys.readouterr().err)
        assert err.startswith("soda prepare: error: no space left on device writing "), err
        assert not (out / target).exists() and not (out / target).is_symlink()
        assert not list(out.glob(".*.tmp-*")) and not (out / "index.json").exists()
    assert not (out / "shard-000000.tar").exists() or (out / "shard-000000.json").is_file()
    assert main(args) == 0  # space again: the run resumes and completes
    assert (out / "index.json").is_file()
