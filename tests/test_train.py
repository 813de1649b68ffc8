"""megatron-core training on the CPU backend: every parallel layout against the single process,
exact resume, resharding, crash safety, bad configs, non-finite steps.

Layouts are compared trained from scratch with the same seed on the same data: the initial weights
are a function of (seed, parameter, element) only (model/init.py), so the curves must agree.
Tolerance on the per-step loss: 1e-5 absolute (fp32; the observed differences are ~1e-6, from the
order of reductions across TP/DP ranks).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from megatron_soda.config import ConfigError, load_config, validate
from tests.launch import FUSED, ROOT, losses, metrics, run_train, run_until_signal

pytestmark = pytest.mark.slow
TOL = 1e-5
STEPS = ("--train.steps", "3")


@pytest.fixture(scope="module")
def reference(prepared, tmp_path_factory):
    """One process, from scratch: every layout below starts from the same weights (model/init.py)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    run_train(run, prepared, 1, *STEPS)
    return losses(run)


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
def layout_runs(prepared, tmp_path_factory):
    """Each layout's run directory, trained from scratch with the same seed, made on first use (the
    reshard test reuses TP=2 x PP=2's)."""
    made = {}

    def get(layout: str):
        if layout not in made:
            nproc, extra = LAYOUTS[layout]
            run = tmp_path_factory.mktemp(layout) / "run"
            run_train(run, prepared, nproc, *STEPS, *extra)
            made[layout] = run
        return made[layout]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_matches_single_process(layout, layout_runs, reference):
    got = losses(layout_runs(layout))
    assert len(got) == len(reference) == 3
    assert max(abs(a - b) for a, b in zip(got, reference, strict=True)) < TOL, (got, reference)


def test_single_process_loss_decreases(prepared, tmp_path):
    run = tmp_path / "run"
    run_train(
        run,
        prepared,
        1,
        "--train.steps",
        "20",
        "--optim.lr",
        "1e-2",
        "--train.eval_interval",
        "20",
        "--data.val_paths",
        f"[{prepared}]",
    )
    rows = metrics(run)
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "loss_text", "loss_audio_cb0"):
        assert key in rows[0], key
    assert "val_loss" in rows[-1] and rows[-1]["val_loss"] < rows[0]["loss"]
    assert (run / "config.yaml").is_file() and list((run / "tensorboard").glob("events.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000020"


# The GPU's optimizer path (fused AdamW, weight gradients accumulated into main_grad) must resume
# exactly too; the DP-change test below runs the CPU default (megatron's foreach AdamW) against it.


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    run_train(run, prepared, 1, "--train.steps", "6", *FUSED)
    return run


def test_resume_is_bitwise_identical(prepared, straight, tmp_path):
    run = tmp_path / "run"
    first = run_train(run, prepared, 1, "--train.steps", "6", "--train.exit_interval", "3", *FUSED)
    assert '"preempted": true' in first.stdout and len(losses(run)) == 3
    run_train(run, prepared, 1, "--train.steps", "6", "--train.exit_interval", "3", *FUSED)
    a, b = metrics(straight), metrics(run)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bitwise on CPU
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    assert [r["consumed_samples"] for r in a] == [r["consumed_samples"] for r in b]


def test_resume_under_another_dp_degree_with_distributed_optimizer_and_async_save(prepared, straight, tmp_path):
    """DP=2 (ZeRO-1, async checkpoint) for 3 steps, then DP=1 for the rest: same samples in the same
    order, and the losses of the uninterrupted single-process run within fp32 tolerance."""
    run = tmp_path / "run"
    common = ("--train.steps", "6", "--parallel.distributed_optimizer", "true", "--checkpoint.async_save", "true")
    run_train(run, prepared, 2, *common, "--train.exit_interval", "3")
    run_train(run, prepared, 1, *common)
    a, b = metrics(straight), metrics(run)
    assert [r["consumed_samples"] for r in a] == [r["consumed_samples"] for r in b]
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) < TOL


def test_sigterm_saves_and_resume_continues_exactly(prepared, straight, tmp_path):
    run = tmp_path / "run"
    rc, out, err = run_until_signal(run, prepared, 2, "--train.steps", "6", *FUSED)
    assert rc == 0, err[-2000:]
    done = len(losses(run))
    assert 2 <= done < 6 and (run / "checkpoints" / "latest").read_text().strip() == f"iter_{done:07d}"
    run_train(run, prepared, 1, "--train.steps", "6", *FUSED)
    assert losses(run) == losses(straight)


def test_crash_during_save_leaves_the_last_checkpoint_loadable(prepared, straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    ckpts = run / "checkpoints"
    # what a crash mid-save leaves: a hidden, half-written directory; `latest` still names step 6
    partial = ckpts / ".iter_0000007.tmp"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"half a shard")
    r = run_train(run, prepared, 1, "--train.steps", "8")
    assert "resumed from" in r.stderr and "iter_0000006" in r.stderr
    assert len(losses(run)) == 8 and not partial.exists()
    assert (ckpts / "latest").read_text().strip() == "iter_0000008"


def test_checkpoint_reshards_between_tp2_pp2_and_tp1(prepared, layout_runs, tmp_path):
    """A checkpoint written at TP=2 x PP=2 (trained 3 steps) evaluates identically loaded at TP=1 and
    at TP=2 x PP=2; the reverse direction (TP=1 weights into TP=2 x PP=2) is every layout test above."""
    src = layout_runs("tp2_pp2") / "checkpoints"
    evals = []
    for nproc, extra in ((1, []), (4, ["--parallel.tp", "2", "--parallel.pp", "2"])):
        run = tmp_path / f"eval{nproc}"
        run_train(
            run,
            prepared,
            nproc,
            "--train.steps",
            "1",
            "--optim.lr",
            "0",
            "--checkpoint.init_from",
            str(src),
            "--train.eval_interval",
            "1",
            "--data.val_paths",
            f"[{prepared}]",
            *extra,
        )
        evals.append(metrics(run)[0]["val_loss"])
    assert abs(evals[0] - evals[1]) < TOL, evals


def test_non_finite_steps_are_skipped_then_stop(prepared, tmp_path):
    run = tmp_path / "skip"
    run_train(run, prepared, 1, "--train.steps", "4", "--train.debug_nan_steps", "[2]")
    rows = metrics(run)
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert rows[2]["loss"] == rows[2]["loss"]  # finite again after the skipped step
    run = tmp_path / "stop"
    r = run_train(
        run,
        prepared,
        1,
        "--train.steps",
        "5",
        "--checkpoint.save_interval",
        "1",
        "--train.debug_nan_steps",
        "[3, 4]",
        "--train.max_skipped_steps",
        "2",
        check=False,
    )
    assert r.returncode == 1
    line = [ln for ln in r.stderr.splitlines() if "soda train: error" in ln]
    assert len(line) == 1 and "step 4" in line[0] and "iter_0000003" in line[0], r.stderr[-2000:]


def test_vocab_layout_mismatch_is_one_clear_error(prepared, tmp_path):
    r = run_train(tmp_path / "run", prepared, 1, "--model.vocab_size", "144644", check=False)
    assert r.returncode == 1
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("soda train: error: model.vocab_size 144644")]


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
        ({"optim__lr": -1.0}, 1, "optim.lr and optim.min_lr must be >= 0"),
    ],
)
def test_bad_configs_fail_before_any_work(overrides, world, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(_cfg(**overrides), world)


def test_bad_config_on_the_command_line_is_one_line(prepared, tmp_path):
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


def test_a_rank_error_under_torchrun_stays_one_line(tmp_path):
    """`--nproc 2`: the rank's one-line error, then one line from the launcher, no ChildFailedError."""
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml")]
        + ["--device", "cpu", "--nproc", "2", "--run-dir", str(tmp_path / "run"), "--data.paths", "[/nonexistent]"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 2, r.stderr
    assert "/nonexistent: no shard index" in lines[0]  # printed by rank 0; every rank stops on it
    assert re.fullmatch(r"soda train: rank [01] exited with code 1 \(its message is above\)", lines[1]), lines


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
    prepared, straight, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = (run / "config.yaml").read_text()
    r = run_train(run, prepared, 1, "--train.steps", "7", "--model.hidden_size", "32", check=False)
    assert r.returncode != 0 and "holds another model than this run asks for: model.hidden_size 32" in r.stderr
    assert "Traceback" not in r.stderr and (run / "config.yaml").read_text() == before
    # the same shards through another spelling of their path (a symlink, a relative path) resume
    (tmp_path / "alias").symlink_to(prepared)
    r = run_train(run, tmp_path / "alias", 1, "--train.steps", "7", *FUSED)
    assert "resumed from" in r.stderr and [m["step"] for m in metrics(run)] == list(range(1, 8))
