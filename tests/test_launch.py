"""Launchers: rendered scripts for many layouts, and a real two-node SLURM cluster (on one host) running them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from megatron_soda.launch.slurm import LaunchError, PrepareArray, SlurmJob, render_prepare, render_train
from tests.launch import ROOT, metrics
from tests.slurm_cluster import Cluster, ensure_installed

PRESET = str(ROOT / "configs" / "soda-1.7b.yaml")


@pytest.mark.parametrize("nodes,tp,pp,dp", [(1, 1, 1, 8), (1, 8, 1, 1), (2, 2, 2, 4), (16, 8, 4, 4), (16, 4, 1, 32)])
def test_rendered_training_script(nodes, tp, pp, dp):
    job = SlurmJob(
        config=PRESET,
        overrides=["--parallel.tp", str(tp), "--parallel.pp", str(pp), "--data.paths", "[x]"],
        nodes=nodes,
        gpus_per_node=8,
        run_dir="runs/r",
        partition="gpu",
        account="proj",
    )
    s = render_train(job)
    assert f"#SBATCH --nodes={nodes}" in s and "#SBATCH --gpus-per-node=8" in s
    assert f"= TP {tp} x PP {pp} x DP {dp}" in s
    assert f"--nnodes={nodes} --nproc-per-node=8" in s and "--rdzv-backend=c10d" in s
    assert "#SBATCH --signal=B:USR1@120" in s and "scontrol requeue" in s and "#SBATCH --requeue" in s
    assert "#SBATCH --partition=gpu" in s and "#SBATCH --account=proj" in s
    assert "  device: cuda" in s and "scontrol show hostnames" in s and "-m megatron_soda.cli train --config" in s
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0  # valid bash


@pytest.mark.parametrize(
    "nodes,gpus,extra,message",
    [
        (1, 8, ["--parallel.tp", "16"], "tensor parallelism must stay inside a node"),
        (1, 6, ["--parallel.tp", "4"], "not a multiple of parallel.tp 4"),
        (2, 8, ["--parallel.pp", "3"], "16 ranks: world size 16 is not divisible by tp 1 x pp 3"),
        (1, 8, ["--train.global_batch_size", "12"], "global_batch_size 12 is not divisible"),
    ],
)
def test_impossible_layouts_are_refused(nodes, gpus, extra, message):
    job = SlurmJob(
        config=PRESET, overrides=[*extra, "--data.paths", "[x]"], nodes=nodes, gpus_per_node=gpus, run_dir="r"
    )
    with pytest.raises(LaunchError, match=message.replace(".", r"\.")):
        render_train(job)


@pytest.mark.parametrize("field", ["job_name", "run_dir", "config", "overrides"])
def test_control_characters_cannot_escape_the_sbatch_lines(field):
    job = SlurmJob(config=PRESET, overrides=["--data.paths", "[x]"], run_dir="r")
    value = getattr(job, field)
    setattr(job, field, [*value, "x\n#SBATCH --uid=0"] if isinstance(value, list) else value + "\nrm -rf ~")
    with pytest.raises(LaunchError, match="control characters"):
        render_train(job)


def test_rendered_prepare_array():
    s = render_prepare(
        PrepareArray(prepare_args=["--input", "m.jsonl", "--output", "out", "--tokenizer", "tok"], tasks=32)
    )
    assert "#SBATCH --array=0-31" in s and '--rank "$SLURM_ARRAY_TASK_ID" --world-size 32' in s
    with pytest.raises(LaunchError, match="sets --rank"):
        render_prepare(PrepareArray(prepare_args=["--rank", "1"]))


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = ensure_installed()
    if why:
        pytest.skip(why)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def _submit(cluster, prepared, run, steps: int, *extra: str) -> str:
    """`soda launch slurm` of the tiny model on both nodes, two CPU ranks per node."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", "launch", "slurm", "--config", str(ROOT / "configs" / "tiny.yaml")]
        + ["--nodes", str(len(cluster.nodes)), "--gpus-per-node", "0", "--tasks-per-node", "2"]
        + ["--run-dir", str(run), "--venv", str(ROOT / ".venv"), "--time", "00:10:00", "--port", str(port)]
        + ["--signal-grace", "30", "--data.paths", f"[{prepared}]", "--data.num_workers", "0"]
        + ["--train.steps", str(steps), *extra],
        capture_output=True,
        text=True,
        env=cluster.env,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[-1]


@pytest.mark.slow
def test_two_node_job_trains_is_preempted_requeued_and_resumes(cluster, prepared, tmp_path):
    """2 nodes x 2 ranks, TP=2 inside each node and DP=2 across them: USR1 to the batch shell (what
    `--signal=B:USR1@grace` sends before the time limit) -> every rank saves -> requeue -> resume,
    with every step logged once and each tensor-parallel group on one node."""
    from megatron_soda.parallel.setup import tp_groups_across_nodes

    run = tmp_path / "run"
    steps = 12
    job = _submit(cluster, prepared, run, steps, "--parallel.tp", "2")
    deadline = time.time() + 240
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3):
        time.sleep(0.5)
    assert cluster.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    (info,) = cluster.finish(job, run / "slurm", 280)
    log = "".join(p.read_text() for p in (run / "slurm").glob("*.out"))
    assert int(info.get("Restarts", 0)) == 1, info
    assert "requeueing job" in log and "resumed from" in log
    stepped = [m["step"] for m in metrics(run)]
    assert stepped == list(range(1, steps + 1)), stepped  # no step lost, none repeated
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{steps:07d}"
    ranks = json.loads((run / "layout.json").read_text())  # written by the resumed job
    assert sorted(r["node"] for r in ranks) == sorted(cluster.nodes * 2), ranks
    assert tp_groups_across_nodes(ranks) == [], ranks
    assert {r["dp_rank"] for r in ranks} == {0, 1} and {r["tp_rank"] for r in ranks} == {0, 1}


@pytest.mark.slow
def test_prepare_array_spreads_over_both_nodes(cluster, corpus, tokenizer_dir, tmp_path):
    """`soda launch prepare` with two tasks of a whole node each: one per node, disjoint shards,
    and the last task to finish writes the index."""
    lines = (corpus / "manifest.jsonl").read_text().splitlines()[:4]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps({**json.loads(x), "audio": str(corpus / json.loads(x)["audio"])}) + "\n" for x in lines)
    )
    out = tmp_path / "shards"
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", "launch", "prepare", "--tasks", "2"]
        + ["--cpus-per-task", str(os.cpu_count() or 2), "--venv", str(ROOT / ".venv"), "--time", "00:10:00"]
        + ["--log-dir", str(tmp_path / "logs"), "--input", str(manifest), "--output", str(out)]
        + ["--tokenizer", str(tokenizer_dir), "--codec", "random:0", "--seq-len", "256", "--files-per-shard", "2"],
        capture_output=True,
        text=True,
        env=cluster.env,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[-1]
    hosts = [info["BatchHost"] for info in cluster.finish(job, tmp_path / "logs", 240, tasks=2)]
    assert sorted(hosts) == sorted(cluster.nodes), hosts
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) == 2 and not (out / "skipped.jsonl").read_text().strip()


def _isoflop_plan(out, budgets: str = "3e10", widths: str = "8,16") -> None:
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", "isoflop", "plan", "--budgets", budgets, "--widths", widths]
        + ["--head-dim", "8", "--seq-len", "256", "--global-batch", "2", "--vocab", "1000", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr


def test_rendered_isoflop_array(tmp_path):
    _isoflop_plan(tmp_path / "plan")
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", "launch", "isoflop", "--plan", str(tmp_path / "plan")]
        + ["--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(tmp_path / "study"), "--dry-run"]
        + ["--gpus-per-node", "2", "--data.paths", "[x]"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    s = r.stdout
    assert "#SBATCH --array=0-1" in s and "%x-%A_%a.out" in s and '--config "$CONFIG"' in s
    # each task writes its run's resolved config: the plan's width, its run directory, validation at its end
    task0 = s[s.index("  0)") : s.index("  1)")]
    assert f"CONFIG={tmp_path}/study/runs/C3.0e10_d8/slurm/config.yaml" in task0
    assert "  hidden_size: 8\n" in task0 and f"run_dir: {tmp_path}/study/runs/C3.0e10_d8" in task0
    assert "  eval_interval: " in task0 and "isoflop run --plan" in s and "--gather" in s
    assert "PORT=$((29500 + SLURM_ARRAY_TASK_ID % 1000))" in s
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0


@pytest.mark.slow
def test_slurm_isoflop_array_trains_each_run_and_gathers(cluster, prepared, tmp_path):
    """Two planned runs (2 and 3 steps of width 8) as a real job array: each task trains its run,
    and runs.csv ends up with both."""
    _isoflop_plan(tmp_path / "plan", budgets="82968576,124452864", widths="8")
    study = tmp_path / "study"
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", "launch", "isoflop", "--plan", str(tmp_path / "plan")]
        + ["--config", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(study), "--venv", str(ROOT / ".venv")]
        + ["--gpus-per-node", "0", "--tasks-per-node", "1", "--time", "00:10:00", "--port", "29611"]
        + ["--data.paths", f"[{prepared}]", "--data.val_paths", f"[{prepared}]", "--data.num_workers", "0"]
        + ["--train.eval_batches", "1"],
        capture_output=True,
        text=True,
        env=cluster.env,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[-1]
    cluster.finish(job, study / "slurm", 240, tasks=2)
    rows = (study / "runs.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("compute,params,non_embedding_params"), rows
    assert [m["step"] for m in metrics(study / "runs" / "C1.2e08_d8")] == [1, 2, 3]
