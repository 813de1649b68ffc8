"""`soda bench loader`: tokens/s of the training data loader, per worker process.

The goal (docs/PERFORMANCE.md) is >= 20M tokens/s per core on packed shards: a GPU consumes 0.1-1M
tokens/s, so loading must never show in a profile. Without --shards it writes a synthetic shard set
of random SODA ids through the real shard writer (the loader cannot tell the difference).

With --shards on object storage (s3://, gs://, hf://) every worker count is measured four ways: the
same set copied to local disk, then from the store with a cold cache (without and with the
prefetcher) and with the cache the prefetched pass left (warm). The goal there is >= 1M tokens/s per
rank from a cold cache with the prefetcher (docs/OBJECT_STORAGE.md).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import DataConfig, UserError
from megatron_soda.tools.bench import write_json

REMOTE_GOAL = 1e6  # tokens/s per rank from a cold cache, with the prefetcher


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


def measure(
    paths: list[str],
    workers: int,
    micro_batch: int,
    seconds: float,
    verify: bool = True,
    cache_dir: str = "",
    prefetch_steps: int = 0,
    global_batch: int | None = None,
) -> tuple[float, int, int]:
    """(tokens/s, seq_len, samples read) of the loader on `paths`, one rank's: `global_batch`
    (default: one micro-batch) is what the rank reads per step, and so what the prefetcher sees."""
    from megatron_soda.data.loader import SodaDataLoader
    from megatron_soda.data.mixture import MixtureDataset

    cfg = DataConfig(
        paths=paths, num_workers=workers, verify_checksums=verify, cache_dir=cache_dir, prefetch_steps=prefetch_steps
    )
    ds = MixtureDataset(cfg)
    gbs = global_batch or micro_batch
    loader = SodaDataLoader(ds, micro_batch_size=micro_batch, global_batch_size=gbs)
    it = iter(loader)  # on object storage the loader runs the rank's prefetcher, as in training
    try:
        next(it)  # worker start-up is not throughput
        t0, tokens, samples = time.perf_counter(), 0, gbs
        while time.perf_counter() - t0 < seconds:
            for batch in next(it):  # a step's work: its micro-batches
                tokens += batch["tokens"].numel()
            samples += gbs
        return tokens / (time.perf_counter() - t0), ds.seq_len, samples
    finally:
        it.close()  # the loader's workers and prefetcher end here


def _row(workers: int, verify: bool, rate: float, seq_len: int, **extra) -> dict:
    per = rate / max(workers, 1)
    return {
        "workers": workers,
        "checksums": verify,
        "tokens_per_s": rate,
        "tokens_per_s_per_worker": per,
        "seq_len": seq_len,
        **extra,
    }


def run(
    shards: str | None,
    workers: list[int],
    micro_batch: int,
    seconds: float,
    prefetch_steps: int = 4,
    global_batch: int | None = None,
) -> list[dict]:
    if shards and "://" in shards:
        return run_remote(shards, workers, micro_batch, seconds, prefetch_steps, global_batch or micro_batch)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [shards] if shards else [str(synthetic_shards(Path(tmp)))]
        rows = []
        print(f"loader benchmark on {paths[0]}{' (synthetic)' if not shards else ''}, micro batch {micro_batch}")
        print(f"{'workers':>8} {'checksums':>9} {'tokens/s':>14} {'tokens/s/worker':>16}")
        for w in workers:
            for verify in (True, False):  # what checking every sample's CRC-32 costs
                rate, seq_len, _ = measure(paths, w, micro_batch, seconds / 2, verify, global_batch=global_batch)
                rows.append(_row(w, verify, rate, seq_len))
                label = f"{w}" if w else "0 (main)"
                per = rows[-1]["tokens_per_s_per_worker"]
                print(f"{label:>8} {'on' if verify else 'off':>9} {rate:>14,.0f} {per:>16,.0f}")
        best = max(r["tokens_per_s_per_worker"] for r in rows if r["checksums"])
        print(f"goal >= 20,000,000 tokens/s per core: {'met' if best >= 20e6 else 'NOT met'} (best {best:,.0f})")
        return rows


def run_remote(
    url: str, workers: list[int], micro_batch: int, seconds: float, prefetch_steps: int, global_batch: int
) -> list[dict]:
    """The set at `url` from a local copy, then from the store: cold without and with the
    prefetcher (each from an empty cache), and warm (every sample of the set cached)."""
    from megatron_soda.tokenization.object_store import filesystem, retrying
    from megatron_soda.tokenization.shard_format import read_index

    store = url.split("://", 1)[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "local"
        fs, path = filesystem(url)
        retrying(url, lambda: fs.get(path.rstrip("/") + "/", str(local) + "/", recursive=True))
        size = read_index(local).num_samples
        print(
            f"loader benchmark on {url} (and a local copy), micro batch {micro_batch}, {global_batch} samples "
            "per step, checksums on"
        )
        print(f"{'workers':>8} {'source':>10} {'cache':>6} {'prefetch':>8} {'tokens/s':>14} {'tokens/s/worker':>16}")
        cases = (("local disk", None, 0), (store, "cold", 0), (store, "cold", prefetch_steps), (store, "warm", None))
        for w in workers:
            for source, cache, steps in cases:
                cache_dir = str(Path(tmp) / f"cache-{w}-{steps or 0}")
                if cache == "warm":  # the prefetched cold pass's cache, holding the whole set now
                    steps = prefetch_steps
                    cache_dir = str(Path(tmp) / f"cache-{w}-{steps}")
                    warm_cache(url, cache_dir)
                paths = [str(local) if cache is None else url]
                rate, seq_len, read = measure(paths, w, micro_batch, seconds / 2, True, cache_dir, steps, global_batch)
                row = _row(w, True, rate, seq_len, source=source, cache=cache, prefetch_steps=steps)
                rows.append(_remote_row(row, micro_batch, global_batch, read, size))
        best = max(r["tokens_per_s"] for r in rows if r["cache"] == "cold" and r["prefetch_steps"])
        print(
            f"goal >= {REMOTE_GOAL:,.0f} tokens/s per rank from a cold cache, prefetching: "
            f"{'met' if best >= REMOTE_GOAL else 'NOT met'} (best {best:,.0f})"
        )
    return rows


def _remote_row(row: dict, micro_batch: int, global_batch: int, read: int, size: int) -> dict:
    row |= {"micro_batch": micro_batch, "global_batch": global_batch, "samples_read": read}
    note = ""
    if row["cache"] == "cold" and read > size:  # past the set's end the order comes back to samples now cached
        row["wrapped"] = True
        note = f"  (read {read} samples of a {size}-sample set: partly warm)"
    w, per = row["workers"], row["tokens_per_s_per_worker"]
    label = f"{w}" if w else "0 (main)"
    print(
        f"{label:>8} {row['source']:>10} {row['cache'] or '-':>6} {row['prefetch_steps']:>8} "
        f"{row['tokens_per_s']:>14,.0f} {per:>16,.0f}{note}"
    )
    return row


def warm_cache(url: str, cache_dir: str) -> None:
    """Every sample of the set read once into `cache_dir`."""
    from megatron_soda.data.shard_set import ShardSet

    s = ShardSet(url, cache_dir=cache_dir)
    for k0 in range(0, len(s), 1024):
        block = list(range(k0, min(k0 + 1024, len(s))))
        s.fetch(block)
        for k in block:
            s.read_masked(k)


@dataclass
class LoaderBenchConfig:
    shards: str | None = field(
        default=None,
        metadata={"help": "a shard set, a path or an s3:// gs:// hf:// URL (default: a synthetic seq-4096 set)"},
    )
    workers: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "comma list of worker counts"})
    micro_batch: int = 8
    global_batch: int | None = field(
        default=None, metadata={"help": "samples per step of the one rank measured (default: one micro-batch)"}
    )
    seconds: float = 3.0
    prefetch_steps: int = field(default=4, metadata={"help": "with --shards URL: steps the prefetcher reads ahead"})
    write_synthetic: bool = field(
        default=False, metadata={"help": "with --shards URL: first write the synthetic set there (to measure a store)"}
    )
    json: str | None = field(default=None, metadata={"help": "also write the rows here"})


def bench_job(cfg: LoaderBenchConfig) -> list[dict]:
    """`soda bench loader`: training data loader tokens/s per worker."""
    if cfg.write_synthetic:
        if not (cfg.shards and "://" in cfg.shards):
            raise UserError("--write-synthetic needs --shards URL (an s3:// or gs:// folder to write the set to)")
        upload_synthetic(cfg.shards)
    rows = run(cfg.shards, cfg.workers, cfg.micro_batch, cfg.seconds, cfg.prefetch_steps, cfg.global_batch)
    write_json(rows, cfg.json)
    return rows


def upload_synthetic(url: str) -> None:
    """The synthetic set, written locally and uploaded to `url`, its index last."""
    from megatron_soda.tokenization.object_store import check_url, join, upload_file

    check_url(url, write=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = synthetic_shards(Path(tmp))
        files = sorted(p for p in local.iterdir() if p.name != "index.json")
        for p in [*files, local / "index.json"]:
            upload_file(p, join(url, p.name))
        print(f"wrote the synthetic set to {url} ({len(files) // 3} shards)")
