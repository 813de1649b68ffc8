"""A real SLURM cluster of two nodes on one host for the launch tests: Debian's slurm-wlm + munge, one
controller and one `slurmd -N <node>` per node, each with its own name, port, spool and log, all from a
generated slurm.conf in a temp dir, stopped by pid afterwards. Jobs see two nodes (SLURM_NODEID,
SLURMD_NODENAME, srun placing one task per node) exactly as on a real cluster; only the host is shared."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = """ClusterName=sodatest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# how long a requeued job waits before it may start again (SLURM's default, 120 s, is for real nodes)
AuthInfo=cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
JobRequeue=1
KillWait=30
{nodes}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> str | None:
    """None when SLURM is usable, else why not (the reason the tests are skipped with)."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm is not installed and this is not a root Debian machine that could install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode:
            return f"installing slurm-wlm failed: {r.stderr.strip()[-300:]}"
    return None


def _start_munge() -> None:
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "munged --force"], check=False, capture_output=True)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            subprocess.run(["munged", "--force"], check=True, capture_output=True)


class Cluster:
    def __init__(self, root: Path, nodes: int = 2) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        host = socket.gethostname().split(".")[0]
        (root / "state").mkdir(parents=True)
        (root / "spool").mkdir()
        self.nodes = [f"soda{i + 1}" for i in range(nodes)]
        lines = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={os.cpu_count() or 2} "
            "State=UNKNOWN"
            for n in self.nodes
        )
        self.conf.write_text(
            CONF.format(host=host, root=root, ctld_port=_free_port(), nodes=lines, names=",".join(self.nodes))
        )
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> None:
        _start_munge()
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env, capture_output=True)
        for n in self.nodes:
            subprocess.run(["slurmd", "-f", str(self.conf), "-N", n], check=True, env=self.env, capture_output=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            r = self.run("sinfo", "-h", "-N", "-o", "%t")
            states = r.stdout.split()
            if r.returncode == 0 and len(states) == len(self.nodes) and set(states) <= {"idle", "mix", "alloc"}:
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM did not come up: {self.run('sinfo').stdout} {self.log('slurmctld')[-800:]}")

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env)

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def finish(self, job_id: str, logs, timeout: float, tasks: int = 0) -> list[dict]:
        """Wait for a job (or each of its `tasks` array tasks) to end; assert each COMPLETED, showing
        the job's output files (`logs`: a folder of SLURM .out files) otherwise."""
        infos = []
        for job in [f"{job_id}_{i}" for i in range(tasks)] if tasks else [job_id]:
            info = self.wait(job, ENDED, timeout)
            text = "".join(p.read_text() for p in Path(logs).glob("*.out"))
            assert info["JobState"] == "COMPLETED", text[-3000:]
            infos.append(info)
        return infos

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {self.job(job_id)}")

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text() if p.is_file() else ""

    def stop(self) -> None:
        for name in [*(f"slurmd-{n}" for n in self.nodes), "slurmctld"]:
            pid = self.root / f"{name}.pid"
            if pid.is_file():
                try:
                    os.kill(int(pid.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass
