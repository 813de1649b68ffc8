"""Faults a months-long run on a shared cluster meets, made real: a full disk (a small tmpfs), Ctrl-C,
a second run in the same directory, a lost `latest`, data replaced under a run, a poisoned update,
a frozen rank (SIGSTOP) and a slow one. Each ends in one line and a clean exit, or in the job
restarting itself and resuming exactly. Runs use the small-vocabulary shards (conftest.small_shards)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_soda.tokenization.shard_format import read_index
from tests.conftest import SMALL_LAYOUT, synthetic_set
from tests.launch import ROOT, SMALL, env, metrics, run_train, train_cmd

pytestmark = pytest.mark.slow


def _train(run, shards, nproc: int = 1, *extra: str, check: bool = True):
    return run_train(run, shards, nproc, *SMALL, *extra, check=check)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "error:" in ln]


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries SODA_TEST_MARK=marker (every process of one job)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("SODA_TEST_MARK") == marker:
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("a full disk needs a small tmpfs: mount needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_at_a_save_is_one_line_per_rank_and_resumes_exactly_when_space_is_back(
    small_shards, small_disk, tmp_path
):
    """TP=2 on a 6 MB disk: the step-2 checkpoint fits, the step-4 one does not. Both ranks stop
    within seconds with one line saying so, nothing partial is left, `latest` names step 2; once
    there is space the run resumes and redoes steps 3 and 4 bit for bit as they ran the first time."""
    run = small_disk / "run"
    args = ("--train.steps", "4", "--checkpoint.save_interval", "2", "--parallel.tp", "2")
    t0 = time.time()
    r = subprocess.run(
        train_cmd(run, small_shards, 2, *SMALL, *args, "--train.tensorboard", "false"),
        capture_output=True,
        text=True,
        env=dict(env(), SODA_TEST_MARK=str(run)),
        cwd=ROOT,
        timeout=300,
    )
    assert time.time() - t0 < 120 and r.returncode == 2, r.stderr[-3000:]
    errors = _error_lines(r.stderr)
    assert "Traceback" not in r.stderr and len(errors) == 2, r.stderr[-3000:]
    assert all("no space left on device" in ln for ln in errors), errors
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002" and not list(ckpts.glob(".iter_*"))
    assert not _marked(str(run)), "a process of the job outlived it"
    first = metrics(run)  # steps 1-4 were logged before the step-4 save failed
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    _train(run, small_shards, 2, *args, "--train.tensorboard", "false")
    again = metrics(run)
    assert [m["step"] for m in first] == [m["step"] for m in again] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "param_norm"):
        assert [m[key] for m in first] == [m[key] for m in again], key
    # the run's export onto a disk it does not fit: one line, nothing partial left there
    out_disk = tmp_path / "out_disk"
    out_disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(out_disk)], check=True)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "megatron_soda.cli", "export-hf", str(run), str(out_disk / "hf")],
            capture_output=True,
            text=True,
            env=env(),
            cwd=ROOT,
        )
        assert r.returncode == 2 and "no space left on device" in r.stderr.lower(), r.stderr[-3000:]
        assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr[-3000:]
        assert list(out_disk.iterdir()) == [], list(out_disk.iterdir())
    finally:
        subprocess.run(["umount", "-l", str(out_disk)], capture_output=True)


def test_a_full_disk_during_an_async_save_is_one_line_too(small_shards, small_disk):
    """The step-4 save writes in the background and fails there: it is reported when the loop
    collects it, as a synchronous save's failure is (one line, partial save removed, latest kept)."""
    run = small_disk / "run"
    args = ("--train.steps", "4", "--checkpoint.save_interval", "2", "--checkpoint.async_save", "true")
    r = _train(run, small_shards, 1, *args, "--train.tensorboard", "false", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    (error,) = _error_lines(r.stderr)
    assert "saving iter_0000004" in error and "no space left on device" in error, error
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002" and not list(ckpts.glob(".iter_*"))


def test_ctrl_c_saves_and_a_second_run_in_the_same_directory_is_refused(small_shards, tmp_path):
    run = tmp_path / "run"
    slow = ("--train.steps", "200", "--train.debug_slow_rank", "[0, 0.2]", "--data.num_workers", "1")
    first = subprocess.Popen(
        train_cmd(run, small_shards, 1, *SMALL, *slow),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        cwd=ROOT,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").is_file() and metrics(run)) and time.time() < deadline:
        time.sleep(0.1)
    second = _train(run, small_shards, 1, "--train.steps", "200", "--optim.lr", "1e-3", check=False)
    assert second.returncode == 2 and len(_error_lines(second.stderr)) == 1, second.stderr[-2000:]
    assert f"is in use by host {os.uname().nodename} pid {first.pid}" in second.stderr
    os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole foreground group
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and "Traceback" not in err and '"preempted": true' in out, err[-2000:]
    done = len(metrics(run))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{done:07d}"
    assert "lr: 0.003" in (run / "config.yaml").read_text()  # the refused run wrote nothing
    _train(run, small_shards, 1, "--train.steps", str(done + 2))
    assert [m["step"] for m in metrics(run)] == list(range(1, done + 3))


@pytest.fixture(scope="module")
def two_saves(small_shards, tmp_path_factory):
    """A run with checkpoints at steps 2 and 4, on its own copy of the shards (the tests replace them)."""
    root = tmp_path_factory.mktemp("two_saves")
    shards = root / "shards"
    shutil.copytree(small_shards, shards)
    _train(root / "run", shards, 1, "--train.steps", "4", "--checkpoint.save_interval", "2")
    return root / "run", shards


def _tree(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_run_directory_whose_checkpoints_latest_does_not_lead_to_is_refused_and_left_alone(two_saves, tmp_path):
    src, shards = two_saves
    for case, damage, message in (
        ("deleted", lambda p: p.unlink(), "holds checkpoints (iter_0000002, iter_0000004) but no `latest`"),
        ("older", lambda p: p.write_text("iter_0000002"), "names iter_0000002 but iter_0000004 is newer"),
        ("directory", lambda p: (p.unlink(), p.mkdir()), "latest is not a file"),
        ("dangling", lambda p: p.write_text("iter_0000009"), "names 'iter_0000009', which is not a complete"),
    ):
        run = tmp_path / case
        shutil.copytree(src, run)
        damage(run / "checkpoints" / "latest")
        before = _tree(run)
        r = _train(run, shards, 1, "--train.steps", "6", check=False)
        assert r.returncode == 2 and len(_error_lines(r.stderr)) == 1 and message in r.stderr, (case, r.stderr)
        assert _tree(run) == before, case  # nothing overwritten, metrics.jsonl not cut
    run = tmp_path / "fresh"
    shutil.copytree(src, run)
    r = _train(run, shards, 1, "--checkpoint.resume", "false", check=False)
    assert r.returncode == 2 and "checkpoint.resume is false but" in r.stderr


def test_data_replaced_under_a_run_is_refused_at_resume(two_saves, tmp_path):
    """Same shard names, counts and sizes, other content (re-prepared in place); then the same samples
    with another codec recorded: both are other data, so the resume stops in one line."""
    src, shards = two_saves
    for case in ("content", "codec"):
        run, data = tmp_path / case / "run", tmp_path / case / "shards"
        shutil.copytree(src, run)
        shutil.copytree(shards, data)
        if case == "content":
            sizes = [r["samples"] for r in read_index(data).shards]
            shutil.rmtree(data)
            synthetic_set(data, sizes, seq_len=128, layout=SMALL_LAYOUT, seed=99)
        else:
            index = json.loads((data / "index.json").read_text())
            index["codec"] = {"name": "kyutai/mimi", "weights_sha": "other"}
            (data / "index.json").write_text(json.dumps(index))
        r = _train(run, data, 1, "--train.steps", "6", check=False)
        assert r.returncode == 2 and "saved for other data" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _train(tmp_path / "same", shards, 1, "--train.steps", "6", check=False)  # the real data still resumes
    assert r.returncode == 0


def test_a_non_finite_update_stops_the_run_and_is_never_saved(small_shards, tmp_path):
    """Adam with eps 0: the padding rows of the vocabulary get no gradient, so their update is 0/0
    while loss and gradient are finite. The run stops at that step; no checkpoint holds the NaNs."""
    run = tmp_path / "run"
    r = _train(run, small_shards, 1, "--optim.eps", "0", "--train.steps", "3", "--checkpoint.save_interval", "1",
               check=False)  # fmt: skip
    lines = _error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "step 1: the update made weights non-finite" in lines[0], r.stderr
    assert "last good checkpoint: none" in lines[0] and not list((run / "checkpoints").glob("iter_*"))


def test_a_frozen_rank_restarts_the_job_which_resumes_and_the_slow_rank_is_named(small_shards, tmp_path):
    """DP=2, rank 1 made slow (0.2 s per step) and then frozen with SIGSTOP after 3 steps: rank 0's
    watchdog dumps its stacks to RUN_DIR/hang/ and exits, `--max-restarts 1` starts the job again,
    it resumes from latest and finishes with every step logged once; the straggler report names rank 1."""
    run = tmp_path / "run"
    args = [*SMALL, "--train.steps", "8", "--checkpoint.save_interval", "2", "--train.hang_timeout_s", "8"]
    args += ["--train.straggler_interval", "4", "--train.debug_slow_rank", "[1, 0.2]"]
    cmd = train_cmd(run, small_shards, 2, *args)
    cmd.insert(cmd.index("--nproc"), "--max-restarts")
    cmd.insert(cmd.index("--max-restarts") + 1, "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    frozen, deadline = None, time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if frozen is None and (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3:
            ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
            if ranks:
                frozen = ranks[0]
                frozen.send_signal(signal.SIGSTOP)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=60)
    assert frozen is not None and proc.returncode == 0, err[-3000:]
    assert "restarting the job (1 of 1), resuming from latest" in err
    assert [m["step"] for m in metrics(run)] == list(range(1, 9))
    (dump,) = [p for p in (run / "hang").iterdir() if p.stat().st_size]
    assert dump.name == "rank00000-attempt0.txt"
    text = dump.read_text()
    assert "Timeout (0:00:08)!" in text and "megatron_soda/training" in text, text[:2000]
    reports = [m for m in metrics(run) if "straggler_rank" in m]
    assert reports and all(m["straggler_rank"] == 1 and m["straggler_ratio"] > 1.3 for m in reports), reports
