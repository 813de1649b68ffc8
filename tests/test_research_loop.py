"""The SODA research loop inside one run: a staged mixture, a branch annealed on another mixture,
and HF snapshots during training, on the small-vocabulary shards (two sets: A and B)."""

from __future__ import annotations

import hashlib
import re
import shutil

import pytest

from megatron_soda.config import ConfigError, load_config, validate
from tests.conftest import SMALL_LAYOUT, synthetic_set
from tests.launch import ROOT, SMALL, metrics, run_train

pytestmark = pytest.mark.slow
ROW_KEYS = ("loss", "grad_norm", "param_norm", "lr", "consumed_samples")


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_sets")
    synthetic_set(root / "a", [16, 16], seq_len=128, layout=SMALL_LAYOUT, seed=21)
    synthetic_set(root / "b", [16, 16], seq_len=128, layout=SMALL_LAYOUT, seed=22)
    return root / "a", root / "b"


def _train(run, data: list, *extra: str, nproc: int = 1, check: bool = True):
    return run_train(run, f"{data[0]}, {data[1]}" if len(data) == 2 else data[0], nproc, *SMALL, *extra, check=check)


def _rows(run, steps, keys=ROW_KEYS) -> list[tuple]:
    return [tuple(m[k] for k in keys) for m in metrics(run) if m["step"] in steps]


def _tree(path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


STAGED = ("--data.stages", "[{until_step: 2, weights: [0.75, 0.25]}, {until_step: 4, weights: [0.25, 0.75]}]")


def test_a_two_stage_mixture_takes_its_weights_per_stage_and_resumes_in_the_second_exactly(two_sets, tmp_path):
    """Blocks of 8 samples = one global batch: every step's batch holds each stage's weights exactly."""
    args = (*STAGED, "--data.blend_block", "8", "--train.steps", "4")
    straight = tmp_path / "straight"
    _train(straight, two_sets, *args)
    rows = metrics(straight)
    assert [r["data_stage"] for r in rows] == [0, 0, 1, 1]
    assert [(r["data_a"], r["data_b"]) for r in rows] == [(0.75, 0.25)] * 2 + [(0.25, 0.75)] * 2
    resumed = tmp_path / "resumed"
    _train(resumed, two_sets, *args, "--train.exit_interval", "3")  # stops in the second stage
    r = _train(resumed, two_sets, *args)
    assert "resumed from" in r.stderr and "at step 3" in r.stderr
    assert _rows(resumed, range(1, 5)) == _rows(straight, range(1, 5))  # bitwise on CPU
    assert "mixture stage 1: a 25.0%, b 75.0%" in r.stderr


# The branch check: a run whose second stage draws only from B, from its first draw, is what a branch
# of its step-3 checkpoint onto B alone (the data position restarting at 0) must reproduce bit for bit:
# the same weights, optimizer state, step, LR schedule and samples.
ANNEAL = ("--train.steps", "7", "--optim.decay_steps", "4", "--optim.min_lr", "0")
A_THEN_B = ("--data.stages", "[{until_step: 3, weights: [1, 0]}, {until_step: 7, weights: [0, 1]}]")


@pytest.fixture(scope="module")
def stable_then_b(two_sets, tmp_path_factory):
    run = tmp_path_factory.mktemp("stable") / "run"
    _train(run, two_sets, *ANNEAL, *A_THEN_B, "--checkpoint.save_interval", "3", "--checkpoint.keep_last", "5")
    return run


def test_a_branch_takes_weights_optimizer_step_and_schedule_and_never_writes_its_source(
    two_sets, stable_then_b, tmp_path
):
    before = _tree(stable_then_b)
    branch = tmp_path / "branch"
    src = stable_then_b / "checkpoints" / "iter_0000003"
    r = _train(branch, two_sets, *ANNEAL, "--checkpoint.branch_from", str(src), "--data.weights", "[0, 1]")
    assert "branched from" in r.stderr and "at step 3" in r.stderr and "data position at 0" in r.stderr
    assert [m["step"] for m in metrics(branch)] == [4, 5, 6, 7]
    assert [m["consumed_samples"] for m in metrics(branch)] == [8, 16, 24, 32]  # its data position starts at 0
    same = ("loss", "grad_norm", "param_norm", "lr")
    assert _rows(branch, range(4, 8), same) == _rows(stable_then_b, range(4, 8), same)  # bitwise on CPU
    lrs = [m["lr"] for m in metrics(branch)]  # the anneal: a linear decay reaching 0 after its last step
    steps = [a - b for a, b in zip([*lrs, 0.0], [*lrs[1:], 0.0, 0.0], strict=True)][:4]
    assert lrs[0] > 0 and all(abs(s - lrs[0] / 4) < 1e-9 * lrs[0] for s in steps), lrs
    assert _tree(stable_then_b) == before  # the source run is only read
    # resumed in the middle of the branch: the same rows
    again = tmp_path / "again"
    branch_args = (*ANNEAL, "--checkpoint.branch_from", str(src), "--data.weights", "[0, 1]")
    _train(again, two_sets, *branch_args, "--train.exit_interval", "5")
    _train(again, two_sets, *branch_args)
    assert _rows(again, range(4, 8)) == _rows(branch, range(4, 8))
    # a branch that does not resume never lands on a run directory holding checkpoints
    r = _train(again, two_sets, *branch_args, "--checkpoint.resume", "false", check=False)
    assert r.returncode == 2 and "a branch there would overwrite them" in r.stderr, r.stderr


def test_hf_snapshots_are_written_during_training_and_never_overwritten(small_shards, tmp_path):
    run = tmp_path / "run"
    run_train(run, small_shards, 1, *SMALL, "--train.steps", "4", "--checkpoint.hf_interval", "2")
    snaps = sorted(p.name for p in (run / "hf").iterdir() if not p.name.startswith("."))
    assert snaps == ["step_0000002", "step_0000004"], snaps
    for s in snaps:
        assert {"config.json", "model.safetensors", "soda.json"} <= {p.name for p in (run / "hf" / s).iterdir()}
    first = (run / "hf" / "step_0000004" / "model.safetensors").stat().st_mtime_ns
    # resumed from step 2 (step 4's checkpoint gone), the run passes step 4 again: its snapshot stays
    shutil.rmtree(run / "checkpoints" / "iter_0000004")
    (run / "checkpoints" / "latest").write_text("iter_0000002")
    r = run_train(run, small_shards, 1, *SMALL, "--train.steps", "6", "--checkpoint.hf_interval", "2")
    assert "at step 2" in r.stderr and "step_0000004 exists already: kept, not overwritten" in r.stderr, r.stderr
    assert (run / "hf" / "step_0000006").is_dir()
    assert (run / "hf" / "step_0000004" / "model.safetensors").stat().st_mtime_ns == first


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--data.stages", "[{until_step: 3, weights: [1, 0]}, {until_step: 2, weights: [0, 1]}]"], "increasing"),
        (["--data.stages", "[{until_step: 3, weights: [1, 0, 1]}]"], "has 3 weights for 2 data.paths"),
        (["--checkpoint.branch_from", "x", "--checkpoint.init_from", "y"], "give one"),
        (["--optim.decay_steps", "9"], "optim.decay_steps 9: expected 0..train.steps"),
    ],
)
def test_bad_research_settings_are_refused_before_any_work(overrides, message):
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), [*overrides, "--data.paths", "[a, b]", "--train.steps", "8"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg, 1)


def test_a_branch_source_that_is_not_a_checkpoint_or_another_model_is_one_line(two_sets, stable_then_b, tmp_path):
    r = _train(tmp_path / "b1", two_sets, "--checkpoint.branch_from", str(tmp_path / "nothing"), check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not a megatron-core distributed" in r.stderr
    src = str(stable_then_b / "checkpoints" / "iter_0000003")
    r = _train(tmp_path / "b2", two_sets, "--checkpoint.branch_from", src, "--model.hidden_size", "32", check=False)
    assert (
        r.returncode == 2 and "holds another model than this run asks for" in r.stderr and "Traceback" not in r.stderr
    )
    shutil.rmtree(tmp_path / "b2", ignore_errors=True)
