"""Training data: the reader of `soda prepare`'s shard sets and the loader that mixes them.

shard_set.py reads one shard set (random access by sample, every read checked against the index);
mixture.py maps a global sample index to (set, sample) by weight and seeded permutation; loader.py
cuts this DP rank's micro-batches and keeps the position (`consumed_samples`) that checkpoints save.
The on-disk format itself is described once, in megatron_soda/tokenization/shard_format.py, which
the writer (tokenization/shards.py) shares.
"""
