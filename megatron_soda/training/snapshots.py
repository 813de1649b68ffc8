"""Hugging Face snapshots during training: every `checkpoint.hf_interval` steps the step's checkpoint
is exported to RUN_DIR/hf/step_<N> (model, tokenizer, soda.json) by `soda export-hf` in a child
process on the CPU, while training goes on; the checkpoint it reads is kept from pruning until the
export is done. A finished snapshot is never overwritten."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from megatron_soda.parallel import processes

log = logging.getLogger("soda")


class HFSnapshots:
    def __init__(self, run_dir: Path, interval: int, rank0: bool) -> None:
        self.root, self.interval, self.rank0 = Path(run_dir) / "hf", interval, rank0
        self.running: dict[str, tuple[subprocess.Popen, Path, Path]] = {}  # checkpoint name -> (child, out, log)

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def start(self, step: int, checkpoint: Path) -> None:
        """Export `checkpoint` (complete, on disk) to RUN_DIR/hf/step_<N> in the background (rank 0)."""
        self.poll()
        if not self.rank0:
            return
        out = self.root / f"step_{step:07d}"
        if out.exists():
            log.warning("HF snapshot %s exists already: kept, not overwritten", out)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        log_file = self.root / f".step_{step:07d}.log"
        f = open(log_file, "w")
        cmd = processes.python_module("megatron_soda.cli", ["export-hf", str(checkpoint), str(out)])
        child = subprocess.Popen(cmd, env=processes.standalone_env(), stdout=f, stderr=subprocess.STDOUT)
        f.close()
        self.running[checkpoint.name] = (child, out, log_file)
        log.info("HF snapshot of step %d -> %s (exporting in the background)", step, out)

    def poll(self, wait: bool = False) -> None:
        """Reap finished exports; a failed one is a warning naming its log (training goes on)."""
        for name, (child, out, log_file) in list(self.running.items()):
            code = child.wait() if wait else child.poll()
            if code is None:
                continue
            del self.running[name]
            if code == 0:
                log_file.unlink(missing_ok=True)
            else:
                log.warning("HF snapshot %s failed (exit %d): see %s", out, code, log_file)

    def in_use(self) -> set[str]:
        """Checkpoint directories an export still reads (not to be pruned)."""
        self.poll()
        return set(self.running)

    def finish(self) -> None:
        self.poll(wait=True)
