"""A candidate layout and the run it belongs to: the vocabulary `soda plan`'s parts share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    dp: int = 1
    micro_batch: int = 1
    recompute: str = "none"
    distributed_optimizer: bool = False
    sequence_parallel: bool = False
    overlap_grad_reduce: bool = False

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def overrides(self) -> dict:
        """The `--section.key` settings of this layout (what `soda train` / `soda launch` take)."""
        return {
            "parallel": {
                "tp": self.tp,
                "pp": self.pp,
                "vpp": self.vpp,
                "cp": self.cp,
                "sequence_parallel": self.sequence_parallel,
                "distributed_optimizer": self.distributed_optimizer,
                "overlap_grad_reduce": self.overlap_grad_reduce,
                "recompute": self.recompute,
            },
            "train": {"micro_batch_size": self.micro_batch},
        }

    def describe(self) -> str:
        parts = [
            f"TP{self.tp}",
            f"PP{self.pp}" + (f"x{self.vpp}" if self.vpp > 1 else ""),
            f"CP{self.cp}",
            f"DP{self.dp}",
        ]
        return " ".join(parts)


def layout_of(cfg, world: int) -> Layout:
    """The layout a run config asks for on `world` ranks."""
    from megatron_soda.config import data_parallel_size

    p = cfg.parallel
    return Layout(
        tp=p.tp,
        pp=p.pp,
        vpp=p.vpp,
        cp=p.cp,
        dp=data_parallel_size(p, world),
        micro_batch=cfg.train.micro_batch_size,
        recompute=p.recompute,
        distributed_optimizer=p.distributed_optimizer,
        sequence_parallel=p.sequence_parallel,
        overlap_grad_reduce=p.overlap_grad_reduce,
    )


@dataclass(frozen=True)
class Run:
    """What besides the layout decides a step's bytes and time."""

    model: object  # ModelConfig
    seq: int
    global_batch: int
    embedding: str = "triton"  # resolved fast paths (model/fast_paths.py)
    output: str = "fused"
    act_bytes: int = 2  # bf16 on a GPU, fp32 on the CPU backend
    param_bytes: int = 2
    stats_width: int = 11  # StepStats' vector (training/trainer.py): what the loss reduction moves

    def micro_batches(self, lay: Layout) -> int:
        return self.global_batch // (lay.micro_batch * lay.dp)


def run_of(cfg, layout_obj=None, cuda: bool = True) -> Run:
    """The Run of a resolved config: its fast paths as `auto` resolves them on a GPU (or the CPU
    backend), its dtypes, and the width of the per-step loss statistics."""
    from megatron_soda.model.fast_paths import resolve_fast_paths
    from megatron_soda.tokenization.vocab import SodaLayout

    fp = resolve_fast_paths(cfg, cuda)
    layout_obj = layout_obj or SodaLayout()
    return Run(
        model=cfg.model,
        seq=cfg.train.seq_length,
        global_batch=cfg.train.global_batch_size,
        embedding=fp.embedding,
        output=fp.output,
        act_bytes=2 if cuda else 4,
        param_bytes=2 if cuda else 4,
        stats_width=stats_width(cfg, layout_obj),
    )


def stats_width(cfg, layout_obj) -> int:
    """Elements of the loss-statistics vector the Trainer reduces each step (StepStats.reduce)."""
    from megatron_soda.training.trainer import StepStats

    t = cfg.train
    try:
        stats = StepStats(layout_obj, t.seq_length, getattr(t, "position_bucket", 0) or t.seq_length)
    except TypeError:  # the older signature, without position buckets
        stats = StepStats(layout_obj)
    return 3 + 2 * len(stats.names) + 2 * len(getattr(stats, "buckets", []))
