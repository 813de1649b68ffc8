import numpy as np
import webdataset as wds

from megatron_soda.data.shard_set import ShardSet
from megatron_soda.tokenization.shard_format import read_index, read_sidecar
from megatron_soda.tokenization.shards import Packer, write_shard
from megatron_soda.tokenization.vocab import SodaLayout
from tests.conftest import synthetic_set

LAYOUT = SodaLayout(text_vocab_size=500, bos_id=0, eos_id=1)


def test_packer_cuts_overlapping_samples_and_pads_the_tail():
    p = Packer(seq_len=8, layout=LAYOUT)
    docs = [np.arange(2, 7), np.arange(10, 24), np.arange(30, 33)]
    samples = [s for d in docs for s in p.add(d)] + p.finish()
    stream = np.concatenate(docs)
    assert all(len(s) == 9 for s in samples)
    # each sample starts with the previous one's last token: every token is a label exactly once
    rebuilt = np.concatenate([samples[0]] + [s[1:] for s in samples[1:]])
    n = len(stream)
    np.testing.assert_array_equal(rebuilt[:n], stream)
    assert (rebuilt[n:] == LAYOUT.pad_sentinel).all()
    assert p.doc_tokens == n and p.pad_tokens == len(rebuilt) - n


def test_packer_exact_fit_has_no_padding():
    p = Packer(seq_len=4, layout=LAYOUT)
    samples = p.add(np.arange(9)) + p.finish()  # 9 = 5 + 4: two samples, the lone last token already a label
    assert len(samples) == 2 and p.pad_tokens == 0


def test_shards_written_then_read_back_are_identical(tmp_path):
    written = synthetic_set(tmp_path / "set", [5, 3, 7], seq_len=32)
    shards = ShardSet(tmp_path / "set")
    assert len(shards) == 15
    for k, want in enumerate(written):
        got, corrupt = shards.read(k)
        assert not corrupt
        np.testing.assert_array_equal(got, want)


def test_shards_are_plain_webdataset(tmp_path):
    written = synthetic_set(tmp_path / "set", [4], seq_len=32)
    urls = str(tmp_path / "set" / "shard-000000.tar")
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node).decode()
    got = [s["tokens.npy"] for s in ds]
    assert len(got) == 4
    for a, b in zip(got, written, strict=True):
        assert a.dtype == np.uint32
        np.testing.assert_array_equal(a, b)


def test_shard_is_finished_only_with_matching_sidecar(tmp_path):
    path = tmp_path / "shard-000000.tar"
    assert read_sidecar(path) is None
    samples = [np.arange(9, dtype=np.uint16)] * 3
    rec = write_shard(path, samples, 0, {"tokens": 24, "pad_tokens": 0})
    assert read_sidecar(path) == rec and rec["samples"] == 3
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary left behind
    with open(path, "ab") as f:  # a shard rewritten after its sidecar no longer counts as finished
        f.write(b"\0" * 512)
    assert read_sidecar(path) is None


def test_index_records_layout(tmp_path):
    synthetic_set(tmp_path / "set", [2], seq_len=8, layout=LAYOUT)
    idx = read_index(tmp_path / "set")
    assert idx.layout == LAYOUT and idx.seq_len == 8 and idx.dtype == np.uint16 and idx.num_samples == 2
