"""Stopping and data faults as clusters deliver them: signals sent the way each launcher sends them
(every process, the `soda train` wrapper, torchrun), and corrupt samples counted and limited."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.launch import FUSED, ROOT, SMALL, env, losses, metrics, run_train, train_cmd

pytestmark = pytest.mark.slow


def _send_launcher_signal(how: str, proc: subprocess.Popen) -> None:
    """Signal a `soda train --nproc 2` (started in its own process group, as a job step is) the way a
    launcher does: `all` SIGTERM to every process (SLURM's preemption / time limit, `kill` of a
    group), `wrapper` SIGTERM to `soda train` only (a user, a scheduler that sees one process),
    `torchrun` SIGUSR1 to torchrun only (the rendered sbatch script's forwarding)."""
    import psutil

    if how == "all":
        os.killpg(proc.pid, signal.SIGTERM)
    elif how == "wrapper":
        proc.send_signal(signal.SIGTERM)
    else:
        children = psutil.Process(proc.pid).children()
        (torchrun,) = [c for c in children if "megatron_soda.training.torchrun" in c.cmdline()]
        torchrun.send_signal(signal.SIGUSR1)


TP2_RUN = (*SMALL, "--train.steps", "8", "--parallel.tp", "2", *FUSED)


@pytest.mark.slow
def test_signals_as_launchers_send_them_save_and_the_run_resumes(small_shards, tmp_path):
    import psutil

    runs = {how: tmp_path / how for how in ("all", "wrapper", "torchrun")}
    procs = {
        how: subprocess.Popen(
            train_cmd(run, small_shards, 2, *TP2_RUN, "--data.num_workers", "1"),  # a loader worker per rank
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(),
            cwd=ROOT,
            start_new_session=True,
        )
        for how, run in runs.items()
    }
    waiting, deadline = set(procs), time.time() + 300
    while waiting and time.time() < deadline:  # each is signalled once it has logged 2 steps
        for how in list(waiting):
            log = runs[how] / "metrics.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 2:
                _send_launcher_signal(how, procs[how])
                waiting.discard(how)
        time.sleep(0.1)
    for how, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        run = runs[how]
        done = len(losses(run))
        assert 2 <= done < 8 and "killed by signal" not in err, (how, err[-3000:])
        assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{done:07d}", (how, err[-3000:])
    time.sleep(1)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if any(str(tmp_path) in a for a in p.info["cmdline"] or [])]
    assert not left, f"processes left behind: {left}"
    # the saved checkpoint resumes (that a resume continues bitwise is test_train's SIGTERM test)
    run = runs["all"]
    run_train(run, small_shards, 2, *TP2_RUN)
    assert [m["step"] for m in metrics(run)] == list(range(1, 9))  # none lost, none repeated


def test_corrupt_samples_are_counted_and_too_many_stop_the_run(small_shards, tmp_path):
    """data.skip_corrupt: each corrupt sample read is counted (exactly: the test knows which samples
    it broke and which the run reads), and past data.max_corrupt_fraction the run stops with one line
    naming the count."""
    from megatron_soda.config import DataConfig
    from megatron_soda.data.mixture import MixtureDataset
    from megatron_soda.data.shard_set import ShardSet
    from megatron_soda.tokenization.shard_format import sample_span

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    s = ShardSet(shards)
    for rec in s.shards:  # break the .npy header of every other sample of each shard: half the data
        path = shards / rec["file"]
        raw = bytearray(path.read_bytes())
        for j in range(0, rec["samples"], 2):
            raw[sample_span(rec, j, len(s._header), s._data_bytes).start + 512 + 3] ^= 0xFF
        path.write_bytes(bytes(raw))
    ds = MixtureDataset(DataConfig(paths=[str(shards)]))
    starts = [0, *s.cumulative[:-1].tolist()]  # the shards' first samples in the set's numbering
    broken = {starts[i] + j for i, rec in enumerate(s.shards) for j in range(0, rec["samples"], 2)}
    steps, batch = 4, 8
    want = [sum(ds.locate(g)[1] in broken for g in range(batch * (k + 1))) for k in range(steps)]
    assert 0 < want[-1] < steps * batch  # the run reads some broken samples and some good ones
    args = (*SMALL, "--train.steps", str(steps), "--data.skip_corrupt", "true")
    r = run_train(tmp_path / "ok", shards, 1, *args, "--data.max_corrupt_fraction", "0.9")
    assert [m["corrupt_samples"] for m in metrics(tmp_path / "ok")] == want
    assert json.loads(r.stdout.strip().splitlines()[-1])["summary"]["corrupt_samples"] == want[-1]
    r = run_train(tmp_path / "stop", shards, 1, *args, "--data.max_corrupt_fraction", "0.05", check=False)
    assert r.returncode == 2 and "were corrupt (" in r.stderr and "> data.max_corrupt_fraction 5.0%" in r.stderr
