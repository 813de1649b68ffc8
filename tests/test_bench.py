"""`soda bench`: the MFU formula against a hand count and torch's FLOP counter, and the train /
tokenize benchmarks producing well-formed numbers on CPU (ours and the transformers baseline)."""

import json
import math

import pytest
import torch

from megatron_soda.config import ModelConfig, UserError
from megatron_soda.model.flops import flops_per_token, mfu
from megatron_soda.tools.bench.train import bench_layout
from tests.conftest import SMALL_LAYOUT
from tests.launch import soda

SMALL = dict(
    hidden_size=8,
    num_layers=1,
    num_attention_heads=2,
    num_query_groups=1,
    head_dim=4,
    ffn_hidden_size=16,
    vocab_size=10,
)


def test_flops_and_mfu_hand_count():
    m = ModelConfig(**SMALL)
    # per layer: Q 8x8, K 8x4, V 8x4, O 8x8 = 192 weights; SwiGLU 3 x 8 x 16 = 384; LM head 8 x 10 = 80
    # forward = 2 x 656 matmul + attention 2 x 2 x seq(4) x heads(2) x head_dim(4) = 1312 + 128
    assert flops_per_token(m, 4) == 3 * (2 * 656 + 128) == 4320
    # 1000 tokens/s per GPU of 4320 FLOPs on a 1e-6 TFLOP/s (1e6 FLOP/s) device = 4.32
    assert mfu(4320, 1000, 1e-6) == pytest.approx(4.32)
    assert mfu(4320, 1000, None) is None


def test_flops_formula_equals_torch_flop_counter_on_the_hf_model():
    """Counted independently: torch's FlopCounterMode over a forward+backward of transformers'
    Qwen3 (eager attention, so the score matmuls are visible) of the same config."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen3ForCausalLM

    from megatron_soda.checkpoints_tools.qwen3_mapping import hf_config

    m = ModelConfig(
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=8,
        ffn_hidden_size=64,
        vocab_size=96,
    )
    hc = hf_config(m, None, None)
    hc._attn_implementation = "eager"
    model = Qwen3ForCausalLM(hc)
    batch, seq = 3, 16
    ids = torch.randint(0, 96, (batch, seq))
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids).logits.float().sum().backward()
    assert fc.get_total_flops() == flops_per_token(m, seq) * batch * seq


def test_bench_layout_matches_the_vocabulary():
    assert bench_layout(0).vocab_size == 144_644
    assert bench_layout(16_974).vocab_size == 16_974
    with pytest.raises(UserError, match="model.vocab_size 1000"):
        bench_layout(1000)


# The tiny preset's training FLOPs per token at seq 256 and 16,974 ids, counted by hand: 3 x (2 x matmul
# weights (QKV 64 x 16 x (4 + 2 x 2), attention out 4 x 16 x 64, SwiGLU 3 x 64 x 128 per layer, 4 layers,
# the LM head 64 x 16,974) + 4 layers x 2 x 2 x 256 keys x 4 heads x 16)
TINY_FLOPS_PER_TOKEN = 3 * (2 * (4 * (64 * 16 * 8 + 4 * 16 * 64 + 3 * 64 * 128) + 64 * 16_974) + 4 * 4 * 256 * 4 * 16)


def _check_row(r):
    for k in ("tokens_per_s_per_gpu", "tflops_per_gpu", "step_time_s", "peak_memory_gb", "loss_first", "loss_last"):
        assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
    assert abs(r["loss_first"] - math.log(16_974)) < 1.0  # random ids, fresh init: about log V
    assert (
        r["flops_per_token"]
        == TINY_FLOPS_PER_TOKEN
        == flops_per_token(ModelConfig(**{**_TINY, "vocab_size": 16_974}), 256)
    )
    # throughput from the measured step time and the batch (8 x 256 tokens), per GPU; a CPU does 1e2-1e6 of them
    assert r["tokens_per_s_per_gpu"] == pytest.approx(8 * 256 / r["step_time_s"] / r["world"])
    assert 1e2 < r["tokens_per_s_per_gpu"] < 1e6
    assert r["tflops_per_gpu"] == pytest.approx(TINY_FLOPS_PER_TOKEN * r["tokens_per_s_per_gpu"] / 1e12)
    # the parts are timed in passes of their own (medians): on a loaded 2-core machine a part's median
    # can pass the step's by a little (forward 0.928 s vs step 0.926 s seen at TP=2), never twice it
    step = r["step_time_s"]
    assert 0 < r["split_s"]["forward"] < 2 * step and 0 < r["split_s"]["optimizer"] < 2 * step


_TINY = dict(hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2, head_dim=16, ffn_hidden_size=128)


@pytest.mark.slow
def test_bench_train_ours_and_transformers_on_cpu(small_shards, tmp_path):
    res = tmp_path / "train.jsonl"
    common = ["--config", "configs/tiny.yaml", "--device", "cpu", "--steps", "2", "--warmup", "1"]
    common += ["--results", str(res), "--plot", str(tmp_path / "train.png"), "--model.vocab_size", "16974"]
    p = soda("bench", "train", *common, "--variants", "ours,hf", "--train.peak_tflops", "1.0")  # raises on failure
    rows = [json.loads(x) for x in res.read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["ours", "hf"]
    # which attention ran: our layer path and the kernel SDPA's dispatcher picks at this shape
    assert rows[0]["layers"] == "local spec, torch SDPA attention" and rows[0]["sdpa_backend"] in (
        "flash_attention",
        "math",
    )
    for r in rows:
        _check_row(r)
        assert r["mfu"] == pytest.approx(TINY_FLOPS_PER_TOKEN * r["tokens_per_s_per_gpu"] / 1e12)  # peak 1 TFLOP/s
    assert rows[1]["ours_over_this"] == pytest.approx(rows[0]["tokens_per_s_per_gpu"] / rows[1]["tokens_per_s_per_gpu"])
    assert "ours/this" in p.stdout and "hf" in p.stdout and (tmp_path / "train.png").stat().st_size > 10_000
    assert rows[0]["data"] == "synthetic" and rows[0]["losses"][0] == pytest.approx(math.log(16974), rel=0.05)
    # a TP=2 layout on two ranks appends to the same file and plot; the bench feeds its own batches,
    # so a config without data (the suite presets) is fine
    tp2 = ["--nproc", "2", "--parallel.tp", "2", "--data.paths", "[]"]
    soda("bench", "train", *common, "--variants", "ours", *tp2)
    rows = [json.loads(x) for x in res.read_text().splitlines()]
    assert len(rows) == 3 and rows[2]["tp"] == 2 and rows[2]["world"] == 2
    _check_row(rows[2])
    # --real-data: each step its own global batch of the config's shards (their layout's vocabulary),
    # the blockwise output layer opt-in by variant
    real = ["--config", "configs/tiny.yaml", "--device", "cpu", "--steps", "1", "--warmup", "1", "--real-data"]
    real += ["--data.paths", f"[{small_shards}]", "--train.seq_length", "128", "--results", str(res), "--plot", ""]
    soda("bench", "train", *real, "--variants", "ours+blockwise")
    row = json.loads(res.read_text().splitlines()[-1])
    assert row["data"] == f"real: {small_shards}" and row["fast_paths"]["output"] == "blockwise"
    assert row["vocab"] == SMALL_LAYOUT.vocab_size
    assert row["losses"][0] == pytest.approx(math.log(row["vocab"]), rel=0.05)  # random ids: ~uniform at the start


@pytest.mark.slow
def test_bench_train_bad_input_is_one_line(tmp_path):
    p = soda("bench", "train", "--config", "configs/tiny.yaml", "--variants", "ours,megatron-lm", check=False)
    assert p.returncode == 2 and "unknown variant 'megatron-lm'" in p.stderr and "Traceback" not in p.stderr
    p = soda("bench", "train", "--config", "configs/tiny.yaml", "--model.hiden_size", "8", check=False)
    assert p.returncode == 2 and "hiden_size" in p.stderr and "Traceback" not in p.stderr
    # one variant failing (here: CUDA graphs asked for on the CPU) costs only its own row; the exit says which
    res = tmp_path / "train.jsonl"
    common = ["--config", "configs/tiny.yaml", "--device", "cpu", "--steps", "1", "--warmup", "1", "--data.paths", "[]"]
    common += ["--results", str(res), "--plot", str(tmp_path / "train.png")]
    p = soda("bench", "train", *common, "--variants", "ours,hf", "--parallel.cuda_graph", "full_iteration", check=False)
    assert p.returncode == 2 and "variant ours failed" in p.stderr and "Traceback" not in p.stderr
    assert [json.loads(x)["variant"] for x in res.read_text().splitlines()] == ["hf"]
    p = soda("bench", "train", *common, "--variants", "ours,hf", "--real-data", check=False)
    assert p.returncode == 2 and "--real-data: the transformers baselines" in p.stderr and "Traceback" not in p.stderr
    p = soda("bench", "train", *common, "--variants", "ours", "--real-data", check=False)
    assert p.returncode == 2 and "data.paths: no training shard sets given" in p.stderr and "Traceback" not in p.stderr
    p = soda("bench", "loader", "--parallel.tp", "2", check=False)
    assert p.returncode == 2 and "unrecognized" in p.stderr


@pytest.mark.slow
def test_bench_tokenize_random_mimi(tmp_path):
    out = tmp_path / "tok.json"
    soda(
        "bench",
        "tokenize",
        "--codec",
        "random:0",
        "--device",
        "cpu",
        "--batch",
        "1,2",
        "--seconds",
        "1",
        "--reps",
        "1",
        "--json",
        str(out),
    )
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["realtime_factor"] > 0
        # 1 s at 12.5 frames/s x 8 codebooks = 100 tokens per clip (rounded up to whole frames)
        assert r["tokens_per_s"] * r["wall_s"] == pytest.approx(r["batch"] * 13 * 8)
