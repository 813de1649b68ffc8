"""megatron-core training on the CPU backend: every parallel layout against the single process,
exact resume, resharding, crash safety, bad configs, non-finite steps.

Layouts are compared trained from scratch with the same seed on the same data: the initial weights
are a function of (seed, parameter, element) only (model/init.py), so the curves must agree, step by
step, in loss (1e-5 absolute: fp32, the observed differences are ~1e-6 from the order of reductions
across TP/DP ranks), gradient norm and weight norm (1e-4 relative): a loss alone would not see a
gradient scaled by a constant (a DP sum instead of a mean), which Adam normalises away. Runs use the
small-vocabulary shards (conftest.small_shards); the loss-decrease test uses the tiny corpus.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys

import pytest

from megatron_soda.config import ConfigError, load_config, validate
from tests.launch import FUSED, ROOT, SMALL, losses, metrics, run_train, run_until_signal, runs_on_first_use

pytestmark = pytest.mark.slow
TOL = 1e-5
REL = 1e-4
STEPS = ("--train.steps", "3")


def _train(run, shards, nproc: int = 1, *extra: str, check: bool = True):
    return run_train(run, shards, nproc, *SMALL, *extra, check=check)


def _curves(run) -> dict[str, list[float]]:
    rows = metrics(run)
    return {k: [r[k] for r in rows] for k in ("loss", "grad_norm", "param_norm")}


def assert_same_curves(got: dict, want: dict, what: str, grad_abs: float | None = None) -> None:
    """Losses within TOL; gradient and weight norms within REL of the reference, or the gradient norm
    within `grad_abs` absolute where a test holds it to that (the CP layouts: 1e-5)."""
    assert len(got["loss"]) == len(want["loss"]), (what, got, want)
    assert max(abs(a - b) for a, b in zip(got["loss"], want["loss"], strict=True)) < TOL, (what, got, want)
    for key in ("grad_norm", "param_norm"):
        for a, b in zip(got[key], want[key], strict=True):
            assert abs(a - b) <= REL * abs(b), (what, key, got[key], want[key])
            if key == "grad_norm" and grad_abs is not None:
                assert abs(a - b) <= grad_abs, (what, key, got[key], want[key])


@pytest.fixture(scope="module")
def reference(small_shards, tmp_path_factory):
    """One process, from scratch: every layout below starts from the same weights (model/init.py).
    It also validates (its first global batch, before the first step and after the last)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    r = _train(run, small_shards, 1, *STEPS, "--data.val_paths", f"[{small_shards}]", "--train.eval_interval", "3")
    return run, _summary(r.stdout)


def _summary(stdout: str) -> dict:
    import json

    return json.loads([ln for ln in stdout.splitlines() if ln.startswith('{"summary"')][-1])["summary"]


LAYOUTS = {
    "tp2": (2, ["--parallel.tp", "2"]),
    "pp2": (2, ["--parallel.pp", "2"]),
    "dp2": (2, []),
    "dp2_distributed_optimizer_overlap": (
        2,
        ["--parallel.distributed_optimizer", "true", "--parallel.overlap_grad_reduce", "true"],
    ),
    "tp2_recompute_selective": (2, ["--parallel.tp", "2", "--parallel.recompute", "selective"]),
    "tp2_pp2": (4, ["--parallel.tp", "2", "--parallel.pp", "2"]),
    "tp2_pp2_interleaved_sp": (
        4,
        ["--parallel.tp", "2", "--parallel.pp", "2", "--parallel.vpp", "2", "--parallel.sequence_parallel", "true"],
    ),
}


@pytest.fixture(scope="module")
def layout_runs(small_shards, tmp_path_factory):
    """Each layout's run directory, trained from scratch with the same seed, made on first use (the
    reshard test reuses TP=2 x PP=2's)."""
    return runs_on_first_use(tmp_path_factory, LAYOUTS, small_shards, *SMALL, *STEPS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_matches_single_process(layout, layout_runs, reference):
    assert_same_curves(_curves(layout_runs(layout)), _curves(reference[0]), layout)


def _counting_set(out, samples: int = 48, seq_len: int = 128) -> None:
    """Samples that count up (t, t+1, ... mod 256 over the text ids): learnable in a few steps."""
    import numpy as np

    from megatron_soda.tokenization.shard_format import index_entry, write_index
    from megatron_soda.tokenization.shards import write_shard
    from tests.conftest import SMALL_LAYOUT

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [((rng.integers(0, 256) + np.arange(seq_len + 1)) % 256).astype(SMALL_LAYOUT.storage_dtype)]
    rows += [((rng.integers(0, 256) + np.arange(seq_len + 1)) % 256).astype(rows[0].dtype) for _ in range(samples - 1)]
    rec = write_shard(out / "shard-000000.tar", rows, 0, {"tokens": samples * seq_len, "pad_tokens": 0})
    write_index(out, SMALL_LAYOUT, seq_len, [index_entry(rec)], {})


def test_single_process_loss_decreases(tmp_path):
    data = tmp_path / "counting"
    _counting_set(data)
    run = tmp_path / "run"
    args = ("--train.steps", "20", "--optim.lr", "1e-2", "--train.eval_interval", "20", "--data.val_paths", f"[{data}]")
    _train(run, data, 1, *args)
    rows = metrics(run)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    for key in ("step", "loss", "lr", "grad_norm", "param_norm", "tokens_per_s", "tflops_per_device", "loss_text"):
        assert key in rows[0], key
    assert "val_loss" in rows[-1] and rows[-1]["val_loss"] < rows[0]["loss"]
    assert (run / "config.yaml").is_file() and list((run / "tensorboard").glob("events.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000020"


# The GPU's optimizer path (fused AdamW, weight gradients accumulated into main_grad) must resume
# exactly too; the DP-change test below runs the CPU default (megatron's foreach AdamW) against it.


@pytest.fixture(scope="module")
def straight(small_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    _train(run, small_shards, 1, "--train.steps", "6", *FUSED)
    return run


def test_resume_is_bitwise_identical(small_shards, straight, tmp_path):
    run = tmp_path / "run"
    first = _train(run, small_shards, 1, "--train.steps", "6", "--train.exit_interval", "3", *FUSED)
    assert '"preempted": true' in first.stdout and len(losses(run)) == 3
    _train(run, small_shards, 1, "--train.steps", "6", "--train.exit_interval", "3", *FUSED)
    a, b = metrics(straight), metrics(run)
    for key in ("loss", "grad_norm", "param_norm", "consumed_samples"):
        assert [r[key] for r in a] == [r[key] for r in b], key  # bitwise on CPU


def test_resume_under_another_dp_degree_with_distributed_optimizer_and_async_save(small_shards, straight, tmp_path):
    """DP=2 (ZeRO-1, async checkpoint) for 3 steps, then DP=1 for the rest: same samples in the same
    order, and the curves of the uninterrupted single-process run within fp32 tolerance."""
    run = tmp_path / "run"
    common = ("--train.steps", "6", "--parallel.distributed_optimizer", "true", "--checkpoint.async_save", "true")
    _train(run, small_shards, 2, *common, "--train.exit_interval", "3")
    _train(run, small_shards, 1, *common)
    a, b = metrics(straight), metrics(run)
    assert [r["consumed_samples"] for r in a] == [r["consumed_samples"] for r in b]
    assert_same_curves(_curves(run), _curves(straight), "dp2 -> dp1")


def test_sigterm_saves_and_resume_continues_exactly(small_shards, straight, tmp_path):
    run = tmp_path / "run"
    rc, out, err = run_until_signal(run, small_shards, 2, *SMALL, "--train.steps", "6", *FUSED)
    assert rc == 0, err[-2000:]
    done = len(losses(run))
    assert 2 <= done < 6 and (run / "checkpoints" / "latest").read_text().strip() == f"iter_{done:07d}"
    _train(run, small_shards, 1, "--train.steps", "6", *FUSED)
    assert losses(run) == losses(straight)


def test_crash_during_save_leaves_the_last_checkpoint_loadable(small_shards, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    ckpts = run / "checkpoints"
    # what a crash mid-save leaves: a hidden, half-written directory; `latest` still names step 6
    partial = ckpts / ".iter_0000007.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a shard")
    r = _train(run, small_shards, 1, "--train.steps", "8")
    assert "resumed from" in r.stderr and "iter_0000006" in r.stderr
    assert len(losses(run)) == 8 and not partial.exists()
    assert (ckpts / "latest").read_text().strip() == "iter_0000008"


def test_checkpoint_reshards_between_tp2_pp2_and_tp1(small_shards, layout_runs, reference, tmp_path):
    """A checkpoint written at TP=2 x PP=2 (trained 3 steps) loads as `init_from` at TP=1 and at
    TP=2 x PP=2 with the same validation loss, which is the single-process run's after its 3 steps
    (the same weights) and not the loss of the initial weights: the weights were loaded. The reverse
    direction (TP=1 weights into TP=2 x PP=2) is every layout test above."""
    src = layout_runs("tp2_pp2") / "checkpoints"
    ref_run, ref_summary = reference
    evals = []
    for nproc, extra in ((1, []), (4, ["--parallel.tp", "2", "--parallel.pp", "2"])):
        run = tmp_path / f"eval{nproc}"
        args = ("--train.steps", "1", "--optim.lr", "0", "--checkpoint.init_from", str(src), *extra)
        r = _train(
            run, small_shards, nproc, *args, "--data.val_paths", f"[{small_shards}]", "--train.eval_interval", "1"
        )
        evals.append(_summary(r.stdout)["val_loss_start"])
    after_3_steps, initial = ref_summary["val_loss_last"], ref_summary["val_loss_start"]
    assert abs(evals[0] - evals[1]) < TOL and abs(evals[0] - after_3_steps) < TOL, (evals, after_3_steps)
    assert abs(evals[0] - initial) > 1e-3, (evals, initial)


def test_non_finite_steps_are_skipped_then_stop(small_shards, tmp_path):
    run = tmp_path / "skip"
    _train(run, small_shards, 1, "--train.steps", "4", "--train.debug_nan_steps", "[2]")
    rows = metrics(run)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert rows[1]["param_norm"] == rows[0]["param_norm"] != rows[2]["param_norm"]  # step 2 changed no weight
    assert math.isnan(rows[1]["grad_norm"]) and all(math.isfinite(r["loss"]) for r in rows[2:])
    run = tmp_path / "stop"
    r = _train(
        run,
        small_shards,
        1,
        *("--train.steps", "5", "--checkpoint.save_interval", "1"),
        *("--train.debug_nan_steps", "[3, 4]", "--train.max_skipped_steps", "2"),
        check=False,
    )
    assert r.returncode == 2
    line = [ln for ln in r.stderr.splitlines() if "soda train: error" in ln]
    assert len(line) == 1 and "step 4" in line[0] and "iter_0000003" in line[0], r.stderr[-2000:]


def test_vocab_layout_mismatch_is_one_clear_error_before_any_rank_starts(small_shards, tmp_path):
    r = _train(tmp_path / "run", small_shards, 2, "--model.vocab_size", "144644", check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "model.vocab_size 144644 but" in r.stderr and "use a 388-id layout" in r.stderr


def _cfg(**overrides):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"))
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.mark.parametrize(
    "overrides,world,message",
    [
        ({"parallel__tp": 3}, 3, "num_attention_heads 4 and num_query_groups 2 must be divisible by parallel.tp 3"),
        ({"parallel__pp": 3}, 3, "num_layers 4 is not divisible by parallel.pp 3"),
        (
            {"train__global_batch_size": 6},
            4,
            "global_batch_size 6 is not divisible by micro_batch_size 2 x data-parallel size 4",
        ),
        ({"parallel__tp": 2}, 3, "world size 3 is not divisible by tp 2 x pp 1"),
        ({"parallel__sequence_parallel": True}, 1, "sequence_parallel needs parallel.tp > 1"),
        ({"parallel__recompute": "some"}, 1, "parallel.recompute"),
        ({"checkpoint__keep_last": 0}, 1, "checkpoint.keep_last must be >= 1"),
        ({"train__seq_length": 0}, 1, "train.seq_length must be >= 1, got 0"),
        ({"train__micro_batch_size": 0}, 1, "train.micro_batch_size must be >= 1"),
        ({"model__num_query_groups": 0}, 1, "model.num_query_groups must be >= 1"),
        ({"model__num_attention_heads": 0}, 1, "model.num_attention_heads must be >= 1"),
        ({"model__hidden_size": 0}, 1, "model.hidden_size must be >= 1"),
        ({"model__hidden_size": 10**9}, 1, "not a model any machine holds"),
        ({"train__global_batch_size": 2**40}, 1, "micro-batches per rank and step"),
        ({"optim__lr": -1.0}, 1, "optim.lr and optim.min_lr must be finite and >= 0"),
        ({"optim__lr": float("inf")}, 1, "optim.lr and optim.min_lr must be finite and >= 0"),
        ({"optim__warmup_fraction": 1.5}, 1, "optim.warmup_fraction must be in [0, 1], got 1.5"),
        ({"optim__decay_fraction": 0.99}, 1, "exceed the run (their sum must be <= 1)"),
        ({"model__ce_filter_eps": 1e-4}, 1, "model.ce_filter_eps 0.0001 filters the blockwise kernel's backward"),
        (
            {"model__ce_filter_eps": 1.5, "model__output_impl": "blockwise"},
            1,
            "model.ce_filter_eps must be in [0, 1), got 1.5",
        ),
    ],
)
def test_bad_configs_fail_before_any_work(overrides, world, message):
    cfg = _cfg(**overrides)
    cfg.data.paths = ["x"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, world)


def test_bad_config_on_the_command_line_is_one_line(tmp_path):
    for args, message in (
        (["--model.hiden_size", "8"], "unknown config key 'model.hiden_size'"),
        (["--train.steps", "many"], "train.steps: expected int"),
    ):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "megatron_soda.cli",
                "train",
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr


def test_a_rank_error_under_torchrun_is_one_line_per_rank(small_shards, tmp_path):
    """`--nproc 2`: each rank's error in one line prefixed with its rank, then one line from the
    launcher; no traceback, no ChildFailedError."""
    args = ("--train.steps", "2", "--train.debug_nan_steps", "[1]", "--train.max_skipped_steps", "1")
    r = _train(tmp_path / "run", small_shards, 2, *args, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = re.findall(r"^\[rank (\d)\] soda train: error: (.*)$", r.stderr, flags=re.M)
    assert sorted(rank for rank, _ in errors) == ["0", "1"], r.stderr[-3000:]
    assert all(msg.startswith("1 consecutive non-finite steps, the last at step 1") for _, msg in errors), errors
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"soda train: rank [01] exited with code 2 \(its message is above\)", last), last


def test_torchrun_exit_line_names_a_killed_rank():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from megatron_soda.training.torchrun import exit_line

    failure = ProcessFailure(local_rank=0, pid=1, exitcode=-9, error_file="")
    line, code = exit_line(ChildFailedError("soda", {3: failure}))
    assert line == "soda train: rank 3 was killed by SIGKILL" and code == 137


def test_pruning_keeps_what_latest_names(tmp_path):
    from megatron_soda.training.checkpoint import Checkpointer

    c = Checkpointer(tmp_path, keep_last=1, async_save=False)
    for step in (1, 2, 3):
        (c.root / f"iter_{step:07d}").mkdir(parents=True)
    (c.root / "latest").write_text("iter_0000002")
    c._prune()
    assert sorted(p.name for p in c.root.glob("iter_*")) == ["iter_0000002", "iter_0000003"]


def test_resume_refusals_are_one_line_and_keep_the_config_and_the_path_spelling_does_not_matter(
    small_shards, straight, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = (run / "config.yaml").read_text()
    r = _train(run, small_shards, 1, "--train.steps", "7", "--model.hidden_size", "32", check=False)
    assert r.returncode == 2 and "holds another model than this run asks for: model.hidden_size 32" in r.stderr
    assert "Traceback" not in r.stderr and (run / "config.yaml").read_text() == before
    # the same shards through another spelling of their path (a symlink, a relative path) resume
    (tmp_path / "alias").symlink_to(small_shards)
    r = _train(run, tmp_path / "alias", 1, "--train.steps", "7", *FUSED)
    assert "resumed from" in r.stderr and [m["step"] for m in metrics(run)] == list(range(1, 8))
