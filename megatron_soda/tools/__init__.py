"""Tools around training: benchmarks (bench/), the IsoFLOP study (isoflop/), plots, shard inspection."""
