"""Shared, session-scoped fixtures: the tiny corpus, tokenizer, codec and one prepared shard set are
made once per test run (the codec is the slow part on 2 CPU cores)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_soda.tokenization.codec import MimiCodec, random_mimi
from megatron_soda.tokenization.prepare import PrepareConfig, prepare
from megatron_soda.tokenization.shard_format import index_entry, write_index
from megatron_soda.tokenization.shards import write_shard
from megatron_soda.tokenization.text_tokenizer import extend_tokenizer, save_tokenizer, train_tiny_bpe
from megatron_soda.tokenization.tiny_corpus import make_corpus, make_s2st_corpus
from megatron_soda.tokenization.vocab import SodaLayout

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores, next to the torchrun ranks they start (one thread
    # each): a worker's own torch work on two threads as well oversubscribes the cores, and OpenMP's
    # waiting threads then slow both sides several-fold (a fixture of 24 s alone took 138 s)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    make_corpus(root, num_utterances=12, num_text_docs=3, seed=1)
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    lines = (corpus / "sentences.txt").read_text().splitlines()
    tok, _ = extend_tokenizer(train_tiny_bpe(lines, vocab_size=400))
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="session")
def codec() -> MimiCodec:
    return MimiCodec(random_mimi(0), name="random:0")


@pytest.fixture(scope="session")
def s2st_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2st")
    make_s2st_corpus(root, num_pairs=8, seed=3)
    return root


def prepare_config(inputs: list, output: Path, tokenizer_dir: Path, **kw) -> PrepareConfig:
    defaults = dict(codec="random:0", seq_len=256, files_per_shard=4, num_workers=0)
    defaults.update(kw)
    return PrepareConfig(inputs=[str(i) for i in inputs], output=str(output), tokenizer=str(tokenizer_dir), **defaults)


@pytest.fixture(scope="session")
def prepared(corpus, tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "set"
    prepare(prepare_config([corpus / "manifest.jsonl", corpus / "text"], out, tokenizer_dir), progress=False)
    return out


# A token layout with a small vocabulary (256 text ids + 4 delimiters + 2 x 64 audio codes = 388 ids,
# padded to 1024): the parallel machinery is the same as at 144,644 ids, the output layer 17x cheaper
# than the tiny tokenizer's, so tests about layouts, resume and faults run in a fraction of the time.
SMALL_LAYOUT = SodaLayout(text_vocab_size=256, bos_id=0, eos_id=1, codebooks=2, codebook_size=64)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """A shard set of random ids in SMALL_LAYOUT at seq 128 (64 samples in 4 shards), by the real writer."""
    out = tmp_path_factory.mktemp("small") / "set"
    synthetic_set(out, [16, 16, 16, 16], seq_len=128, layout=SMALL_LAYOUT, seed=7)
    return out


@pytest.fixture(scope="session")
def long_shards(tmp_path_factory) -> Path:
    """SMALL_LAYOUT samples of 2,048 tokens (16 in 4 shards): what context-parallel layouts split."""
    out = tmp_path_factory.mktemp("long") / "set"
    synthetic_set(out, [4, 4, 4, 4], seq_len=2048, layout=SMALL_LAYOUT, seed=11)
    return out


def synthetic_set(
    out: Path, shard_sizes: list[int], seq_len: int = 16, layout: SodaLayout | None = None, seed: int = 0
) -> list[np.ndarray]:
    """A shard set of random ids written by the real writer; returns the samples in index order."""
    layout = layout or SodaLayout()
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    samples, records = [], []
    for s, n in enumerate(shard_sizes):
        shard = [rng.integers(0, layout.vocab_size, seq_len + 1).astype(layout.storage_dtype) for _ in range(n)]
        rec = write_shard(out / f"shard-{s:06d}.tar", shard, s, {"tokens": n * seq_len, "pad_tokens": 0})
        records.append(index_entry(rec))
        samples += shard
    write_index(out, layout, seq_len, records, {})
    return samples


def shard_tokens(shards, shard: int) -> np.ndarray:
    """One shard's token stream, undoing the one-token overlap and dropping the padding."""
    start = int(shards.cumulative[shard - 1]) if shard else 0
    samples = [shards.read(k)[0] for k in range(start, int(shards.cumulative[shard]))]
    stream = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]]).astype(np.int64)
    return stream[stream != shards.sentinel]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# The longest files first: `make test` hands whole files to two xdist workers in collection order,
# so starting the long ones first keeps one worker from finishing a long file alone at the end.
LONGEST_FIRST = ["test_eval", "test_launch", "test_signals", "test_train", "test_finetune", "test_hf", "test_kernels"]


def pytest_collection_modifyitems(items) -> None:
    def rank(item) -> int:
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a file is kept
