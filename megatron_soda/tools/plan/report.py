"""`soda plan`'s output: the ranked table, the best layout's memory and time, the launch line."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from megatron_soda.config import ConfigError, UserError
from megatron_soda.tools.plan.planner import GIB, Planner, Prediction

UNVALIDATED = "multi-GPU predictions are the model's own: unvalidated until a multi-GPU row exists in docs/bench"


class PlanError(UserError):
    """A plan that cannot be made as asked (GPU count, the bench rows)."""


def run_plan(cfg, overrides: dict) -> int:
    from megatron_soda.config import load_config
    from megatron_soda.tools.plan import timing

    if cfg.gpus < 1 or cfg.gpus_per_node < 1:
        raise PlanError("--gpus and --gpus-per-node must be >= 1")
    if cfg.gpus > cfg.gpus_per_node and cfg.gpus % cfg.gpus_per_node:
        raise PlanError(f"--gpus {cfg.gpus} is not a whole number of {cfg.gpus_per_node}-GPU nodes")
    run_cfg = load_config(cfg.config, overrides)
    bench = Path(cfg.bench_dir) if cfg.bench_dir else timing.repo_root() / "docs" / "bench"
    rows = timing.read_rows(bench) if bench.is_dir() else []
    if not rows:
        raise PlanError(f"no soda bench train rows in {bench} (train*.jsonl): --bench-dir names where they are")
    try:
        cal = timing.calibrate(cfg.gpu, rows, timing.repo_root() / "configs")
    except ValueError as e:
        raise PlanError(f"{bench}: {e}") from None
    gpu = timing.GPUS[cfg.gpu]
    fixed = fixed_settings(overrides)
    planner = Planner(
        run_cfg,
        gpu,
        cal,
        gpus_per_node=min(cfg.gpus_per_node, cfg.gpus),
        intra_gbs=cfg.intra_node_gbs,
        inter_gbs=cfg.inter_node_gbs,
        memory_gib=cfg.memory_gib,
        fixed=fixed,
    )
    preds = planner.plan(cfg.gpus, top=max(cfg.top, 1))
    if not preds:
        held = f" with {', '.join(f'{k} {v}' for k, v in fixed.items())}" if fixed else ""
        raise ConfigError(f"no layout of {run_cfg.model.name} is valid on {cfg.gpus} GPUs{held} (soda train's checks)")
    launch = launch_line(cfg, overrides, run_cfg, preds[0]) if preds[0].fits else ""
    if cfg.json:
        print(json.dumps(as_json(cfg, run_cfg, planner, preds, launch), indent=1))
    else:
        print(as_text(cfg, run_cfg, planner, preds, launch))
    return 0 if preds[0].fits else 1


# --section.key overrides that fix a layout dimension: the plan then only varies the others
FIXABLE = {
    ("parallel", "tp"): "tp",
    ("parallel", "pp"): "pp",
    ("parallel", "vpp"): "vpp",
    ("parallel", "cp"): "cp",
    ("parallel", "recompute"): "recompute",
    ("parallel", "distributed_optimizer"): "distributed_optimizer",
    ("parallel", "sequence_parallel"): "sequence_parallel",
    ("parallel", "overlap_grad_reduce"): "overlap_grad_reduce",
    ("train", "micro_batch_size"): "micro_batch",
}


def fixed_settings(overrides: dict) -> dict:
    """The layout settings given on the command line (Layout field -> value)."""
    return {
        field: overrides[section][key]
        for (section, key), field in FIXABLE.items()
        if isinstance(overrides.get(section), dict) and key in overrides[section]
    }


def _lay(p: Prediction) -> str:
    return p.layout.describe()


def as_text(cfg, run_cfg, planner: Planner, preds: list[Prediction], launch: str) -> str:
    g, t, m = planner.gpu, run_cfg.train, run_cfg.model
    lines = [
        f"soda plan: {m.name} on {cfg.gpus} x {g.name} ({planner.usable_gib:.1f} GiB usable of {g.memory_gib:.1f}; "
        f"{min(cfg.gpus_per_node, cfg.gpus)} per node), seq {t.seq_length:,}, global batch {t.global_batch_size:,}",
        f"compute: {planner.cal.source}; links {planner.intra:.0f} GB/s per GPU in a node, {planner.inter:.0f} "
        "between (table values); memory within 10% of every measured row (docs/PLAN.md)",
    ]
    if cfg.gpus > 1:
        lines.append(UNVALIDATED)
    head = (
        f"{'#':>2}  {'layout':<18} {'mb':>3} {'recompute':<9} {'dist-opt':<8} {'peak GiB':>8} {'fits':<5} "
        f"{'step s':>8} {'tok/s/GPU':>10} {'MFU':>6}  exposed comm s"
    )
    lines += ["", head, "-" * len(head)]
    for i, p in enumerate(preds, 1):
        lay = p.layout
        comm = ", ".join(
            f"{k} {v:.3f}" for k, v in sorted(p.time.comm_by_kind.items(), key=lambda x: -x[1]) if v > 5e-4
        )
        distopt = "yes" if lay.distributed_optimizer else "no"
        lines.append(
            f"{i:>2}  {_lay(p):<18} {lay.micro_batch:>3} {lay.recompute:<9} {distopt:<8} "
            f"{p.memory.peak / GIB:>8.1f} {p.verdict:<5} {p.time.step_s:>8.3f} {p.tokens_per_s_per_gpu:>10,.0f} "
            f"{100 * p.mfu:>5.1f}%  {p.time.exposed_comm_s:.3f}" + (f" ({comm})" if comm else "")
        )
    best = preds[0]
    mem = best.memory
    lines += [
        "",
        f"memory of #1 (GiB, pipeline rank {mem.stage}, {mem.in_flight} micro-batch chunk(s) in flight): "
        f"weights {mem.weights / GIB:.1f} + gradients {mem.gradients / GIB:.1f} + optimizer {mem.optimizer / GIB:.1f}"
        + (" (sharded over DP)" if best.layout.distributed_optimizer else "")
        + f" + activations {mem.activations / GIB:.1f} + output/CE {mem.output / GIB:.1f} + backward transient "
        f"{mem.transient / GIB:.1f} + fixed {mem.fixed / GIB:.2f}"
        + (f" (optimizer step {mem.optimizer_step / GIB:.1f})" if mem.optimizer_step else "")
        + f" = {mem.peak / GIB:.1f} of {planner.usable_gib:.1f} usable",
        f"time of #1: compute {best.time.compute_s:.3f} s (pipeline bubble {best.time.bubble_s:.3f}), exposed "
        f"communication {best.time.exposed_comm_s:.3f} s, optimizer {best.time.optimizer_s:.3f} s = "
        f"{best.time.step_s:.3f} s per step",
    ]
    if best.fits:
        lines += ["", f"launch: {launch}"]
    else:
        lines += ["", why_not(cfg, run_cfg, planner, best)]
    return "\n".join(lines)


def why_not(cfg, run_cfg, planner: Planner, best: Prediction) -> str:
    mem = best.memory
    state = mem.state / GIB
    where = f"{cfg.gpus} x {planner.gpu.name}"
    verdict = "does not fit" if not best.tight else "does not fit with the memory model's 10% margin"
    reason = (
        f"no layout of {run_cfg.model.name} fits {where}: the smallest, #1, needs {mem.peak / GIB:.1f} GiB of "
        f"{planner.usable_gib:.1f} usable ({verdict}); the model state alone (weights {mem.weights / GIB:.1f} + "
        f"gradients {mem.gradients / GIB:.1f} + Adam {mem.optimizer / GIB:.1f}) is {state:.1f} GiB per rank"
    )
    if state * 1.1 > planner.usable_gib:
        reason += ": more GPUs (TP / PP split the model, the distributed optimizer shards Adam over DP)"
    else:
        reason += "; the rest is activations: recompute, a smaller micro-batch or more GPUs"
    return reason


def _flag(value) -> str:
    import yaml

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return shlex.quote(yaml.safe_dump(value, default_flow_style=True).strip())
    return shlex.quote(str(value))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def launch_line(cfg, overrides: dict, run_cfg, best: Prediction) -> str:
    """`soda launch slurm` for the best layout: the user's overrides, then the layout's settings."""
    nodes = max(1, math.ceil(cfg.gpus / cfg.gpus_per_node))
    per_node = cfg.gpus // nodes
    run_dir = cfg.run_dir or f"runs/{run_cfg.model.name}"
    settings = _flatten(overrides)
    lay = best.layout
    defaults = {"parallel.vpp": 1, "parallel.cp": 1, "parallel.recompute": "none"}
    for key, value in _flatten(lay.overrides()).items():
        if defaults.get(key, object()) == value and key not in settings:
            continue
        settings[key] = value
    flags = " ".join(f"--{k} {_flag(v)}" for k, v in settings.items())
    return (
        f"soda launch slurm --config {shlex.quote(cfg.config)} --run-dir {shlex.quote(run_dir)} --nodes {nodes} "
        f"--gpus-per-node {per_node} {flags}"
    )


def as_json(cfg, run_cfg, planner: Planner, preds: list[Prediction], launch: str) -> dict:
    import dataclasses

    from megatron_soda.tools.plan.comm import totals

    g = planner.gpu
    return {
        "model": run_cfg.model.name,
        "gpus": cfg.gpus,
        "gpus_per_node": min(cfg.gpus_per_node, cfg.gpus),
        "gpu": dataclasses.asdict(g),
        "usable_gib": planner.usable_gib,
        "seq_length": run_cfg.train.seq_length,
        "global_batch_size": run_cfg.train.global_batch_size,
        "calibration": dataclasses.asdict(planner.cal),
        "links_gbs": {"intra_node": planner.intra, "inter_node": planner.inter},
        "validated": cfg.gpus == 1,
        "note": "" if cfg.gpus == 1 else UNVALIDATED,
        "fits": preds[0].fits,
        "layouts": [
            {
                "layout": dataclasses.asdict(p.layout),
                "fits": p.verdict,
                "memory_gib": p.memory.gib(),
                "step_s": p.time.step_s,
                "compute_s": p.time.compute_s,
                "bubble_s": p.time.bubble_s,
                "exposed_comm_s": p.time.exposed_comm_s,
                "exposed_comm_by_kind_s": p.time.comm_by_kind,
                "optimizer_s": p.time.optimizer_s,
                "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
                "mfu": p.mfu,
                "comm_bytes_per_step": {str(r): totals(c)["bytes"] for r, c in p.collectives.items()},
            }
            for p in preds
        ],
        "launch": launch,
        "why_not": "" if preds[0].fits else why_not(cfg, run_cfg, planner, preds[0]),
    }
