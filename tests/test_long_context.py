"""Long-form audio: context parallelism (CP) without Transformer Engine, composed with TP, PP and DP.

Every CP layout trains 6 steps on 2,048-token sequences from the same initial weights as one process
and must give its losses and gradient norms (1e-5 absolute; weight norms 1e-4 relative) step by step;
a checkpoint saved at CP=2 resumes at CP=1 and at CP=4 on the same curve; the export of a CP run
matches transformers at positions past 4,096; validation reports the loss by position bucket.
"""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_soda.config import ConfigError, load_config, validate
from megatron_soda.model.gpt import cp_chunk_order
from tests.launch import ROOT, metrics, run_train, runs_on_first_use, soda
from tests.test_train import _curves, assert_same_curves

pytestmark = pytest.mark.slow
LONG = ("--train.seq_length", "2048", "--train.global_batch_size", "2", "--train.micro_batch_size", "1")
STEPS = ("--train.steps", "6")


def _train(run, shards, nproc: int = 1, *extra: str, check: bool = True):
    return run_train(run, shards, nproc, *LONG, *extra, check=check)


@pytest.fixture(scope="module")
def reference(long_shards, tmp_path_factory):
    """One process; it validates at its end with the loss per 1,024 positions."""
    run = tmp_path_factory.mktemp("long_ref") / "run"
    val = ("--data.val_paths", f"[{long_shards}]", "--train.eval_interval", "6", "--train.eval_batches", "1")
    _train(run, long_shards, 1, *STEPS, *val, "--train.position_bucket", "1024")
    return run


CP_LAYOUTS = {
    "cp2": (2, ["--parallel.cp", "2", "--checkpoint.save_interval", "3", "--checkpoint.keep_last", "2"]),
    "cp4": (4, ["--parallel.cp", "4"]),
    "cp2_tp2_sp": (4, ["--parallel.cp", "2", "--parallel.tp", "2", "--parallel.sequence_parallel", "true"]),
    "cp2_pp2_vpp2": (4, ["--parallel.cp", "2", "--parallel.pp", "2", "--parallel.vpp", "2"]),
    "cp2_dp2_distributed_optimizer": (4, ["--parallel.cp", "2", "--parallel.distributed_optimizer", "true"]),
}


@pytest.fixture(scope="module")
def cp_runs(long_shards, tmp_path_factory):
    return runs_on_first_use(tmp_path_factory, CP_LAYOUTS, long_shards, *LONG, *STEPS)


@pytest.mark.parametrize("layout", list(CP_LAYOUTS))
def test_context_parallel_layout_matches_single_process(layout, cp_runs, reference):
    run = cp_runs(layout)
    nproc, extra = CP_LAYOUTS[layout]
    cp = int(extra[extra.index("--parallel.cp") + 1])
    ranks = json.loads((run / "layout.json").read_text())  # CP really split the sequence: cp coordinates
    assert len(ranks) == nproc and sorted({r["cp_rank"] for r in ranks}) == list(range(cp)), ranks
    assert_same_curves(_curves(run), _curves(reference), layout, grad_abs=1e-5)


@pytest.mark.parametrize("nproc", [1, 4])
def test_a_cp2_checkpoint_resumes_at_cp1_and_cp4_on_the_same_curve(nproc, cp_runs, reference, long_shards, tmp_path):
    """The CP=2 run's step-3 checkpoint, resumed at CP=1 or CP=4 for steps 4-6."""
    run = tmp_path / "run"
    shutil.copytree(cp_runs("cp2"), run)
    shutil.rmtree(run / "checkpoints" / "iter_0000006")
    (run / "checkpoints" / "latest").write_text("iter_0000003")
    r = _train(run, long_shards, nproc, *STEPS, "--parallel.cp", str(nproc))
    assert "resumed from" in r.stderr and "at step 3" in r.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert_same_curves(_curves(run), _curves(reference), f"cp2 -> cp{nproc}", grad_abs=1e-5)


def test_validation_reports_the_loss_by_position(reference):
    (last,) = [m for m in metrics(reference) if "val_loss" in m]
    buckets = {k: v for k, v in last.items() if k.startswith("val_loss_pos_")}
    assert set(buckets) == {"val_loss_pos_0k_1k", "val_loss_pos_1k_2k"}, last
    # the buckets hold the same tokens as the whole: their mean (equal token counts) is the validation loss
    assert abs(sum(buckets.values()) / 2 - last["val_loss"]) < 1e-6
    r = soda("plot", str(reference))
    assert (reference / "loss.png").stat().st_size > 10_000, r.stdout


def test_export_of_a_cp_run_matches_transformers_past_4096_positions(cp_runs, tmp_path):
    out = tmp_path / "hf"
    soda("export-hf", str(cp_runs("cp2")), str(out), "--verify", "--verify-positions", "4160")
    v = json.loads((out / "export_verify.json").read_text())
    assert v["long_positions"] == 4160 and v["max_abs_logit_diff_long"] <= 1e-5 and v["greedy_identical"], v
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] >= 4160


def test_sequence_chunks_go_back_into_sequence_order():
    """Rank r holds chunks r and 2cp - 1 - r; the all-gather concatenates them rank by rank."""
    for cp in (1, 2, 3, 4, 8):
        gathered = [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]
        assert [gathered[i] for i in cp_chunk_order(cp)] == list(range(2 * cp)), cp


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        (["--parallel.cp", "3"], 4, "world size 4 is not divisible by tp 1 x pp 1 x cp 3"),
        (["--parallel.cp", "4", "--train.seq_length", "260"], 4, "not divisible by 2 x parallel.cp 4"),
        (
            ["--parallel.cp", "2", "--parallel.tp", "4", "--parallel.sequence_parallel", "true"]
            + ["--model.num_attention_heads", "8", "--model.num_query_groups", "4", "--train.seq_length", "12"],
            8,
            "train.seq_length 12 / parallel.cp 2 is not divisible by parallel.tp 4",
        ),
        (["--parallel.cp", "2", "--model.transformer_impl", "transformer_engine"], 2, "has its own, untested here"),
        (["--parallel.cp", "2", "--parallel.cuda_graph", "full_iteration"], 2, "is untested: use none or auto"),
    ],
)
def test_impossible_context_parallel_settings_are_refused(overrides, world, message):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [*overrides, "--data.paths", "[x]"])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        validate(cfg, world)


def test_auto_layers_stay_ours_under_context_parallelism_where_te_is_installed(monkeypatch):
    """TE's attention would take a CP split that our seam does not see: `auto` picks local layers."""
    from megatron_soda.config import ModelConfig
    from megatron_soda.model import gpt

    monkeypatch.setattr(gpt, "_have_te", lambda: True)  # a GPU machine with Transformer Engine installed
    assert gpt.layer_impl(ModelConfig(), cuda=True, cp=1) == "transformer_engine"
    assert gpt.layer_impl(ModelConfig(), cuda=True, cp=2) == "local"


def test_a_context_longer_than_the_shards_samples_is_one_line(small_shards, tmp_path):
    r = run_train(tmp_path / "run", small_shards, 2, "--parallel.cp", "2", "--train.seq_length", "2048", check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "train.seq_length 2048 but the shards of" in r.stderr and "hold 128-token samples" in r.stderr
