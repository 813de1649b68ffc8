"""A few training steps of the real Trainer with every collective counted (parallel/comm_stats.py):
what `soda plan`'s communication bytes are checked against, on the CPU backend over gloo.

`python -m megatron_soda.tools.plan.count_run SPEC.json` on every rank (torchrun): the spec holds
the resolved run config, the token layout, the number of steps and the run directory; each rank
writes RUN_DIR/comm/rank<R>.jsonl, one line per step. The micro-batches are synthetic (random ids,
as `soda bench train` feeds), so no shard set is needed; the step is `Trainer.train_step`, the one
`soda train` runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def run(spec: dict) -> int:
    from megatron_soda.parallel.cpu_backend import import_megatron

    import_megatron()
    import torch.distributed as dist

    from megatron_soda.config import config_from_dict, num_micro_batches, validate
    from megatron_soda.parallel.comm_stats import CommStats
    from megatron_soda.parallel.setup import init_distributed, resolve_device, teardown
    from megatron_soda.tokenization.vocab import SodaLayout
    from megatron_soda.tools.bench.train_step import synthetic_micro_batches
    from megatron_soda.training.trainer import build_trainer

    cfg = config_from_dict(spec["config"])
    layout = SodaLayout(**spec["layout"])
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")), need_data=False)
    init_distributed(resolve_device(cfg.train.device))
    try:
        trainer = build_trainer(cfg, layout, need_data=False)
        t = cfg.train
        micro = synthetic_micro_batches(
            layout.vocab_size,
            t.micro_batch_size,
            t.seq_length,
            num_micro_batches(t.global_batch_size, t.micro_batch_size, trainer.dp),
            seed=dist.get_rank(),
        )
        comm = CommStats(Path(spec["run_dir"]), dist.get_rank(), True)
        comm.start()
        try:
            for step in range(1, spec["steps"] + 1):
                trainer.train_step(micro)
                comm.step_done(step)
        finally:
            comm.stop()
    finally:
        teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    from megatron_soda.parallel.processes import spec_main

    return spec_main(run, "soda plan (count run)", argv)


if __name__ == "__main__":
    sys.exit(main())
