"""`soda launch slurm` / `soda launch prepare`: sbatch scripts rendered from a training config.

Training: one `srun` task per node runs torchrun, which rendezvous (c10d) on the first node of the
allocation and starts one rank per GPU, each running `soda train --config FILE` on the run config
resolved at submission (preset + overrides), which the script carries and writes at every start,
so a requeued job trains exactly what was submitted. Preemption: `--signal=B:USR1@<grace>` makes SLURM warn the
batch shell; it forwards USR1 through srun and torchrun to every rank, which finishes its step,
saves a checkpoint and exits; the batch shell then `scontrol requeue`s the job, and the requeued job
resumes from `latest` (same run directory) with no lost steps.

Tokenization: a job array; task i of n runs `soda prepare --rank i --world-size n`, so tasks take
disjoint slices, and re-submitting redoes only what is missing.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from megatron_soda.config import ConfigError, SodaConfig, UserError, load_config, validate
from megatron_soda.parallel.processes import SIGNAL_ENV

# Network knobs a user may need to set for their fabric; rendered commented-out with their meaning.
NCCL_KNOBS = [
    ("NCCL_DEBUG", "WARN", "INFO prints the transport NCCL picked (IB / socket): the first thing to check"),
    ("NCCL_IB_HCA", "mlx5", "InfiniBand adapters to use (ibstat lists them)"),
    ("NCCL_SOCKET_IFNAME", "ib0", "interface for bootstrap / socket traffic (avoid docker0, lo)"),
    ("NCCL_IB_GID_INDEX", "3", "RoCE clusters: the GID index of the RoCE v2 address"),
    ("NCCL_NET_GDR_LEVEL", "PHB", "GPUDirect RDMA distance"),
    ("NCCL_ASYNC_ERROR_HANDLING", "1", "turn a hung collective into an error after the timeout"),
]


class LaunchError(UserError, ValueError):
    """A job that cannot be launched as asked (layout, arguments, sbatch refused it)."""


@dataclass
class SlurmJob:
    config: str = field(metadata={"help": "the training preset (YAML); --section.key value flags override it"})
    run_dir: str = field(metadata={"help": "checkpoints and logs; a requeued job resumes from here"})
    overrides: dict = field(default_factory=dict, metadata={"cli": False})  # the --section.key flags
    nodes: int = 1
    gpus_per_node: int = field(default=8, metadata={"help": "0 for CPU nodes (CPU backend)"})
    tasks_per_node: int = field(default=0, metadata={"help": "ranks per CPU node (with --gpus-per-node 0)"})
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    job_name: str = "soda"
    log_dir: str = field(default="", metadata={"help": "SLURM output files (default: RUN_DIR/slurm)"})
    venv: str = field(default=".venv", metadata={"help": "python environment on the nodes ('' for the PATH's python)"})
    container: str = field(default="", metadata={"help": "pyxis/enroot image instead of the venv"})
    signal_grace_s: int = field(
        default=120, metadata={"flag": "--signal-grace", "help": "seconds of warning before the time limit"}
    )
    port: int = 29500
    shutdown_timeout_s: int = field(
        default=900, metadata={"help": "how long torchrun lets ranks save after the signal"}
    )
    max_restarts: int = field(
        default=1, metadata={"help": "restarts of the job step when a rank crashes or hangs (it resumes from latest)"}
    )
    workdir: str = field(default="", metadata={"help": "directory the job runs in (default: this one)"})
    dry_run: bool = field(default=False, metadata={"help": "print the script instead of submitting it"})

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node or self.tasks_per_node or 1

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def check_plain_text(job) -> None:
    """A newline or other control character in a value would end its `#SBATCH` or shell line early
    and let the rest run as a command: refused, naming the option."""
    for f in dataclasses.fields(job):
        for v in _strings(getattr(job, f.name)):
            if any(ord(c) < 32 or ord(c) == 127 for c in v):
                raise LaunchError(f"--{f.name.replace('_', '-')}: control characters (newline, tab, ...) in {v!r}")


def check_layout(job: SlurmJob) -> tuple[SodaConfig, int]:
    """TP within a node, world = TP x PP x DP, and the config's own checks; returns the resolved run
    config (run directory and device set) and its DP degree."""
    check_plain_text(job)
    if job.nodes < 1 or job.ranks_per_node < 1:
        raise LaunchError("nodes and GPUs (or tasks) per node must be >= 1")
    cfg = load_config(job.config, job.overrides)
    cfg.run_dir = job.run_dir
    cfg.train.device = "cuda" if job.gpus_per_node else "cpu"
    tp = cfg.parallel.tp
    if tp > job.ranks_per_node:
        raise LaunchError(
            f"parallel.tp {tp} > {job.ranks_per_node} GPUs per node: tensor parallelism must stay inside a node"
        )
    if job.ranks_per_node % tp:
        raise LaunchError(f"{job.ranks_per_node} GPUs per node is not a multiple of parallel.tp {tp}")
    try:
        dp = validate(cfg, job.world)
    except ConfigError as e:
        raise LaunchError(f"{job.nodes} node(s) x {job.ranks_per_node} = {job.world} ranks: {e}") from None
    return cfg, dp


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _config_block(cfg: SodaConfig, indent: str = "") -> str:
    """Shell lines writing the resolved run config to $CONFIG (a quoted heredoc: nothing in it is
    expanded or run)."""
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip("\n")
    if "\nSODA_CONFIG\n" in f"\n{body}\n":
        raise LaunchError("the run config contains a line 'SODA_CONFIG', which ends the script's config block")
    return f'{indent}mkdir -p "$(dirname "$CONFIG")"\n{indent}cat > "$CONFIG" <<\'SODA_CONFIG\'\n{body}\nSODA_CONFIG\n'


def render_train(job: SlurmJob, array: list[tuple[str, dict]] | None = None, after: list[str] | None = None) -> str:
    """The sbatch script of one training run or, with `array` ((run dir, overrides) per task), of a
    job array with one training run per task (each preemption-safe and resumable on its own);
    `after` is a `soda` command line the job runs once its training has finished."""
    if array:
        tasks = [
            check_layout(replace(job, run_dir=d, overrides=_merge(job.overrides, task_overrides)))
            for d, task_overrides in array
        ]
        cfg, dp = tasks[0]
    else:
        cfg, dp = check_layout(job)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    logs = job.log_dir or f"{job.run_dir}/slurm"
    workdir = job.workdir or str(Path.cwd())
    sb = [
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={job.time}",
        f"#SBATCH --output={logs}/%x-{'%A_%a' if array else '%j'}.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{job.signal_grace_s}",
    ]
    if array:
        sb.append(f"#SBATCH --array=0-{len(array) - 1}")
    if job.gpus_per_node:
        sb += [f"#SBATCH --gpus-per-node={job.gpus_per_node}", "#SBATCH --exclusive"]
    if job.partition:
        sb.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        sb.append(f"#SBATCH --account={job.account}")
    if array:
        cases = "\n".join(
            f"  {i})\n    CONFIG={shlex.quote(str(Path(d) / 'slurm' / 'config.yaml'))}\n"
            f"{_config_block(task_cfg, '    ')}    ;;"
            for i, ((d, _), (task_cfg, _)) in enumerate(zip(array, tasks, strict=True))
        )
        task_args = f'case "$SLURM_ARRAY_TASK_ID" in\n{cases}\nesac\n'
    else:
        task_args = f"CONFIG={shlex.quote(str(Path(job.run_dir) / 'slurm' / 'config.yaml'))}\n{_config_block(cfg)}"
    train_args = '--config "$CONFIG"'
    knobs = "\n".join(f"# export {k}={v}    # {why}" for k, v, why in NCCL_KNOBS)
    signals = "\n".join(f"export {k}={v}" for k, v in SIGNAL_ENV.items())
    if job.container:
        runner = (
            f"srun --container-image={shlex.quote(job.container)} --container-workdir={shlex.quote(workdir)} "
            f"--container-mounts={shlex.quote(workdir)}:{shlex.quote(workdir)}"
        )
        python = "python"
    else:
        runner = "srun"
        python = f"{shlex.quote(job.venv)}/bin/python" if job.venv else "python"
    tasks, finish = f" ({len(array)} array tasks, one run each)" if array else "", ""
    # array tasks may share a node: each rendezvous on its own port
    port = f"$(({job.port} + SLURM_ARRAY_TASK_ID % 1000))" if array else str(job.port)
    if after:
        cmd = f"{runner} --nodes=1 --ntasks=1 {python} -m megatron_soda.cli {' '.join(shlex.quote(a) for a in after)}"
        finish = f'if [ "$RC" = 0 ]; then\n  {cmd}\n  RC=$?\nfi'
    return f"""#!/bin/bash
# Rendered by `soda launch` for {job.config}{tasks}: {job.nodes} node(s) x {job.ranks_per_node} ranks =
# {job.world} = TP {tp} x PP {pp} x DP {dp}. Preemption-safe: USR1 -> checkpoint -> requeue -> resume.
{chr(10).join(sb)}
set -uo pipefail
cd {shlex.quote(workdir)}
mkdir -p {shlex.quote(logs)}

# --- network: NCCL picks sensible defaults; set these when it does not (see docs/LAUNCH.md) ---
{knobs}
export NCCL_ASYNC_ERROR_HANDLING=${{NCCL_ASYNC_ERROR_HANDLING:-1}}
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{1 if job.gpus_per_node else 1}}}
# torchrun forwards USR1 to the ranks and gives them this long to save before it kills them
# (torch >= 2.8 reads PET_SIGNALS_TO_HANDLE and overwrites the older TORCHELASTIC_ variable)
{signals}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={job.shutdown_timeout_s}

HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
HEAD_ADDR=${{HEAD_ADDR:-$HEAD}}
PORT={port}
echo "[soda] job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}}: rendezvous on $HEAD_ADDR:$PORT"

{task_args}PREEMPTED=0
on_usr1() {{
  PREEMPTED=1
  echo "[soda] USR1: asking the ranks to save and stop"
  kill -USR1 "$SRUN_PID" 2>/dev/null
}}
trap on_usr1 USR1

# a rank that crashed or hung (exit code 1; the hang watchdog's stacks are in RUN_DIR/hang/) restarts
# the job step in place, resuming from latest, up to {job.max_restarts} time(s); a user error (2) does not
ATTEMPT=0
while true; do
  SODA_ATTEMPT=$ATTEMPT {runner} --kill-on-bad-exit=1 {python} -m megatron_soda.training.torchrun \\
    --nnodes={job.nodes} --nproc-per-node={job.ranks_per_node} \\
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$PORT" --rdzv-id="$SLURM_JOB_ID-$ATTEMPT" \\
    -m megatron_soda.cli train {train_args} &
  SRUN_PID=$!
  while true; do
    wait "$SRUN_PID"
    RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break  # wait returns early when the trap runs
  done
  if [ "$PREEMPTED" = 1 ] || [ "$RC" != 1 ] || [ "$ATTEMPT" -ge {job.max_restarts} ]; then
    break
  fi
  ATTEMPT=$((ATTEMPT + 1))
  echo "[soda] a rank crashed or hung (exit 1): restarting the job step ($ATTEMPT of {job.max_restarts})"
done
if [ "$PREEMPTED" = 1 ]; then
  echo "[soda] requeueing job $SLURM_JOB_ID to resume from the last checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
{finish}
exit "$RC"
"""


@dataclass
class PrepareArray:
    prepare_args: list[str] = field(default_factory=list, metadata={"cli": False})  # `soda prepare` flags
    tasks: int = 8
    time: str = "12:00:00"
    partition: str = ""
    account: str = ""
    cpus_per_task: int = 8
    gpus_per_task: int = 0
    job_name: str = "soda-prepare"
    log_dir: str = "logs"
    venv: str = ".venv"
    workdir: str = field(default="", metadata={"help": "directory the job runs in (default: this one)"})
    dry_run: bool = field(default=False, metadata={"help": "print the script instead of submitting it"})


def render_prepare(arr: PrepareArray) -> str:
    check_plain_text(arr)
    if arr.tasks < 1:
        raise LaunchError("--tasks must be >= 1")
    if any(a.startswith(("--rank", "--world-size")) for a in arr.prepare_args):
        raise LaunchError("the array sets --rank and --world-size itself")
    sb = [
        f"#SBATCH --job-name={arr.job_name}",
        f"#SBATCH --array=0-{arr.tasks - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={arr.cpus_per_task}",
        f"#SBATCH --time={arr.time}",
        f"#SBATCH --output={arr.log_dir}/%x-%A_%a.out",
        "#SBATCH --requeue",
    ]
    if arr.gpus_per_task:
        sb.append(f"#SBATCH --gpus-per-task={arr.gpus_per_task}")
    if arr.partition:
        sb.append(f"#SBATCH --partition={arr.partition}")
    if arr.account:
        sb.append(f"#SBATCH --account={arr.account}")
    device = ["--device", "cuda"] if arr.gpus_per_task else []
    args = " ".join(shlex.quote(a) for a in [*arr.prepare_args, *device])
    soda = f"{shlex.quote(arr.venv)}/bin/soda" if arr.venv else "soda"
    workdir = arr.workdir or str(Path.cwd())
    return f"""#!/bin/bash
# Rendered by `soda launch prepare`: {arr.tasks} array tasks, each a disjoint slice of the shards;
# finished shards are skipped, so resubmitting the same script only redoes what is missing.
{chr(10).join(sb)}
set -euo pipefail
cd {shlex.quote(workdir)}
mkdir -p {shlex.quote(arr.log_dir)}
{soda} prepare {args} --rank "$SLURM_ARRAY_TASK_ID" --world-size {arr.tasks} \\
  --num-workers {max(1, arr.cpus_per_task // 2) if not arr.gpus_per_task else 1} --no-progress
"""


def submit(script: str, path: Path) -> str:
    """Write the script and sbatch it; returns the job id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    r = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise LaunchError(f"sbatch {path} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip().split(";")[0]


def slurm_job(job: SlurmJob, overrides: dict) -> None:
    """`soda launch slurm`: sbatch a training run (srun + torchrun; USR1 -> checkpoint -> requeue)."""
    job.overrides = overrides
    script, path = render_train(job), Path(job.run_dir) / "slurm" / "train.sbatch"
    _submit_or_print(script, path, job.dry_run)


def prepare_array_job(arr: PrepareArray, prepare_args: list[str]) -> None:
    """`soda launch prepare`: sbatch a job array of `soda prepare` over disjoint slices."""
    arr.prepare_args = list(prepare_args)
    script, path = render_prepare(arr), Path(arr.log_dir) / "prepare.sbatch"
    _submit_or_print(script, path, arr.dry_run)


def _submit_or_print(script: str, path: Path, dry_run: bool) -> None:
    if dry_run:
        print(script)
        return
    print(f"submitted {path} as job {submit(script, path)}")
