"""`soda bench loader`: tokens/s of the training data loader, per worker process.

The goal (docs/PERFORMANCE.md) is >= 20M tokens/s per core on packed shards: a GPU consumes 0.1-1M
tokens/s, so loading must never show in a profile. Without --shards it writes a synthetic shard set
of random SODA ids through the real shard writer (the loader cannot tell the difference).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import DataConfig
from megatron_soda.tools.bench import write_json


def synthetic_shards(out: Path, num_shards: int = 8, samples_per_shard: int = 256, seq_len: int = 4096) -> Path:
    import numpy as np

    from megatron_soda.tokenization.shard_format import index_entry, write_index
    from megatron_soda.tokenization.shards import write_shard
    from megatron_soda.tokenization.vocab import LLAMA3_LAYOUT

    layout = LLAMA3_LAYOUT
    rng = np.random.default_rng(0)
    records = []
    for s in range(num_shards):
        samples = [
            rng.integers(0, layout.vocab_size, seq_len + 1).astype(layout.storage_dtype)
            for _ in range(samples_per_shard)
        ]
        stats = {"tokens": samples_per_shard * seq_len, "pad_tokens": 0}
        rec = write_shard(out / f"shard-{s:06d}.tar", samples, s, stats)
        records.append(index_entry(rec))
    write_index(out, layout, seq_len, records, {"synthetic": True})
    return out


def measure(paths: list[str], workers: int, micro_batch: int, seconds: float, verify: bool = True) -> tuple[float, int]:
    from megatron_soda.data.loader import SodaDataLoader
    from megatron_soda.data.mixture import MixtureDataset

    ds = MixtureDataset(DataConfig(paths=paths, num_workers=workers, verify_checksums=verify))
    loader = SodaDataLoader(ds, micro_batch_size=micro_batch, global_batch_size=micro_batch)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    t0, tokens = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        (batch,) = next(it)  # a step's work: one micro-batch here (global batch = micro batch)
        tokens += batch["tokens"].numel()
    return tokens / (time.perf_counter() - t0), ds.seq_len


def run(shards: str | None, workers: list[int], micro_batch: int, seconds: float) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        paths = [shards] if shards else [str(synthetic_shards(Path(tmp)))]
        rows = []
        print(f"loader benchmark on {paths[0]}{' (synthetic)' if not shards else ''}, micro batch {micro_batch}")
        print(f"{'workers':>8} {'checksums':>9} {'tokens/s':>14} {'tokens/s/worker':>16}")
        for w in workers:
            for verify in (True, False):  # what checking every sample's CRC-32 costs
                rate, seq_len = measure(paths, w, micro_batch, seconds / 2, verify)
                per = rate / max(w, 1)
                rows.append(
                    {
                        "workers": w,
                        "checksums": verify,
                        "tokens_per_s": rate,
                        "tokens_per_s_per_worker": per,
                        "seq_len": seq_len,
                    }
                )
                label = f"{w}" if w else "0 (main)"
                print(f"{label:>8} {'on' if verify else 'off':>9} {rate:>14,.0f} {per:>16,.0f}")
        best = max(r["tokens_per_s_per_worker"] for r in rows if r["checksums"])
        print(f"goal >= 20,000,000 tokens/s per core: {'met' if best >= 20e6 else 'NOT met'} (best {best:,.0f})")
        return rows


@dataclass
class LoaderBenchConfig:
    shards: str | None = field(default=None, metadata={"help": "a shard set (default: a synthetic seq-4096 set)"})
    workers: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "comma list of worker counts"})
    micro_batch: int = 8
    seconds: float = 3.0
    json: str | None = field(default=None, metadata={"help": "also write the rows here"})


def bench_job(cfg: LoaderBenchConfig) -> list[dict]:
    """`soda bench loader`: training data loader tokens/s per worker."""
    rows = run(cfg.shards, cfg.workers, cfg.micro_batch, cfg.seconds)
    write_json(rows, cfg.json)
    return rows
