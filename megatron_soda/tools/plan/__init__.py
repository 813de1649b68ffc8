"""`soda plan`: which parallel layouts of a preset fit N GPUs and how fast, before the job is queued.

Light at import (`soda plan --help` loads no torch): the job's work is in the submodules, imported
by `plan_job`. The model behind the numbers is docs/PLAN.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

GpuName = Literal["h100-80gb", "h200", "a100-80gb", "b200"]


@dataclass
class PlanConfig:
    config: str = field(metadata={"help": "the training preset (YAML); --section.key value flags override it"})
    gpus: int = field(metadata={"help": "GPUs the job gets (a multiple of --gpus-per-node above one node)"})
    gpus_per_node: int = field(default=8, metadata={"help": "GPUs per node (TP stays inside one)"})
    gpu: GpuName = field(default="h100-80gb", metadata={"help": "GPU type: its memory, peak FLOP/s, links, rows"})
    top: int = field(default=10, metadata={"help": "layouts listed"})
    json: bool = field(default=False, metadata={"help": "print the plan as JSON (for tools)"})
    intra_node_gbs: float = field(default=0.0, metadata={"help": "GB/s per GPU inside a node (0: the GPU table's)"})
    inter_node_gbs: float = field(default=0.0, metadata={"help": "GB/s per GPU between nodes (0: the GPU table's)"})
    memory_gib: float = field(default=0.0, metadata={"help": "memory per GPU, GiB (0: the GPU table's)"})
    bench_dir: str = field(default="", metadata={"help": "the soda bench train rows (default: docs/bench here)"})
    run_dir: str = field(default="", metadata={"help": "run directory in the launch line (default: runs/<model name>)"})


def plan_job(cfg: PlanConfig, overrides: dict) -> int:
    """`soda plan`: the ranked layouts (text or --json) and the launch line of the best; exit code 1
    when no layout fits with the memory model's margin."""
    from megatron_soda.tools.plan.report import run_plan

    return run_plan(cfg, overrides)
