import numpy as np
import pytest

from megatron_soda.config import ConfigError, DataConfig
from megatron_soda.data.loader import SodaDataLoader, split_batch
from megatron_soda.data.mixture import MixtureDataset, feistel_permute
from megatron_soda.data.shard_set import ShardReadError, ShardSet
from megatron_soda.tokenization.vocab import LayoutMismatchError, SodaLayout
from tests.conftest import synthetic_set


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_is_a_permutation(n):
    perm = [feistel_permute(i, n, key=42) for i in range(n)]
    assert sorted(perm) == list(range(n))
    if n >= 64:
        assert perm != list(range(n)) and perm != [feistel_permute(i, n, key=43) for i in range(n)]


def _collect(ds, steps, mbs, gbs, dp, workers, consumed=0):
    """Run every DP rank's loader for `steps` optimizer steps; returns [(step, rank, set, sample)]."""
    seen = []
    for rank in range(dp):
        loader = SodaDataLoader(ds, mbs, gbs, dp_rank=rank, dp_size=dp, num_workers=workers, consumed_samples=consumed)
        it = iter(loader)
        for step in range(steps):
            micro = next(it)  # one step: this rank's micro-batches of a global batch
            assert len(micro) == gbs // (mbs * dp) and loader.consumed_samples == consumed + (step + 1) * gbs
            for batch in micro:
                seen += [(step, rank, *ds.locate(int(g))) for g in batch["index"]]
    return seen


@pytest.fixture(scope="module")
def one_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "a"
    samples = synthetic_set(root, [10, 7, 15], seq_len=16)  # 32 samples
    return root, samples


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(one_set):
    root, samples = one_set
    ds = MixtureDataset(DataConfig(paths=[str(root)], seed=3))
    seen = _collect(ds, steps=4, mbs=2, gbs=8, dp=2, workers=2)  # 4 x 8 = 32 = one epoch
    keys = [(d, k) for _, _, d, k in seen]
    assert len(keys) == 32 and sorted(keys) == [(0, k) for k in range(32)]


def test_batches_carry_the_right_samples(one_set):
    root, samples = one_set
    ds = MixtureDataset(DataConfig(paths=[str(root)], seed=3))
    (batch,) = next(iter(SodaDataLoader(ds, 4, 4, num_workers=0)))
    for row, g in enumerate(batch["index"]):
        _, k = ds.locate(int(g))
        want = samples[k].astype(np.int64)
        assert batch["tokens"][row].tolist() == want[:-1].tolist()
        assert batch["labels"][row].tolist() == want[1:].tolist()
        assert batch["loss_mask"][row].all()


def test_order_is_deterministic_given_the_seed(one_set):
    root, _ = one_set
    a = _collect(MixtureDataset(DataConfig(paths=[str(root)], seed=5)), 2, 2, 4, 1, 0)
    b = _collect(MixtureDataset(DataConfig(paths=[str(root)], seed=5)), 2, 2, 4, 1, 2)
    c = _collect(MixtureDataset(DataConfig(paths=[str(root)], seed=6)), 2, 2, 4, 1, 0)
    assert a == b and a != c


def test_resume_sees_exactly_the_uninterrupted_batches(one_set):
    root, _ = one_set
    ds = MixtureDataset(DataConfig(paths=[str(root)], seed=1))
    straight = SodaDataLoader(ds, 2, 4, num_workers=2)
    it = iter(straight)

    def step_indices(it) -> list[list[int]]:
        return [m["index"].tolist() for m in next(it)]

    full = [step_indices(it) for _ in range(5)]
    first = SodaDataLoader(ds, 2, 4, num_workers=2)
    it = iter(first)
    part = [step_indices(it) for _ in range(2)]
    state = first.state_dict()
    assert state["consumed_samples"] == 8
    resumed = SodaDataLoader(MixtureDataset(DataConfig(paths=[str(root)], seed=1)), 2, 4, num_workers=1)
    resumed.load_state_dict(state)
    it = iter(resumed)
    part += [step_indices(it) for _ in range(3)]
    assert part == full


def test_resume_under_another_dp_degree_loses_and_repeats_nothing(one_set):
    root, _ = one_set
    ds = MixtureDataset(DataConfig(paths=[str(root)], seed=2))
    before = _collect(ds, steps=2, mbs=2, gbs=8, dp=2, workers=0)  # 16 samples at DP=2
    after = _collect(ds, steps=4, mbs=2, gbs=4, dp=1, workers=0, consumed=16)  # 16 more at DP=1
    keys = [(d, k) for _, _, d, k in before + after]
    assert sorted(keys) == [(0, k) for k in range(32)]


def test_state_for_other_data_is_refused(one_set, tmp_path):
    root, _ = one_set
    state = SodaDataLoader(MixtureDataset(DataConfig(paths=[str(root)], seed=1)), 2, 4).state_dict()
    other = SodaDataLoader(MixtureDataset(DataConfig(paths=[str(root)], seed=2)), 2, 4)
    with pytest.raises(ValueError, match="other data"):
        other.load_state_dict(state)


def test_weighted_mixture(tmp_path):
    synthetic_set(tmp_path / "speech", [40], seq_len=8, seed=1)
    synthetic_set(tmp_path / "text", [7], seq_len=8, seed=2)
    ds = MixtureDataset(
        DataConfig(paths=[str(tmp_path / "speech"), str(tmp_path / "text")], weights=[0.75, 0.25], blend_block=100)
    )
    draws = [ds.locate(g) for g in range(400)]
    sets = np.array([d for d, _ in draws])
    assert (sets.reshape(4, 100).sum(axis=1) == 25).all()  # exact proportions in every block
    text = [k for d, k in draws if d == 1]
    # the small set cycles through epochs, each a full permutation
    for e in range(len(text) // 7):
        assert sorted(text[e * 7 : (e + 1) * 7]) == list(range(7))
    assert text[:7] != text[7:14]  # a fresh shuffle per epoch
    speech = [k for d, k in draws if d == 0]
    assert sorted(speech[:40]) == list(range(40))


def test_a_later_stage_goes_on_with_each_sets_draws_and_counts_the_data_position(tmp_path):
    """Stage 2 draws from A after stage 1 did: A's samples go on through its epoch (none repeats
    before all were seen), and `sources` gives the labels `locate` reads."""
    from megatron_soda.config import MixtureStage

    synthetic_set(tmp_path / "a", [48], seq_len=8, seed=1)
    synthetic_set(tmp_path / "b", [48], seq_len=8, seed=2)
    stages = [MixtureStage(until_step=3, weights=[0.5, 0.5]), MixtureStage(until_step=6, weights=[0.75, 0.25])]
    cfg = DataConfig(paths=[str(tmp_path / "a"), str(tmp_path / "b")], stages=stages, blend_block=8)
    ds = MixtureDataset(cfg, global_batch_size=8)
    draws = [ds.locate(g) for g in range(48)]  # 3 steps of stage 1 (12 from A), 3 of stage 2 (18 from A)
    a = [k for d, k in draws if d == 0]
    assert len(a) == 30 and len(set(a)) == 30, a
    assert [ds.stage_of(g) for g in (0, 23, 24, 47)] == [0, 0, 1, 1]
    assert ds.sources(16, 16).tolist() == [d for d, _ in draws[16:32]]


def test_layout_and_seq_len_mismatch_is_refused(tmp_path):
    synthetic_set(tmp_path / "a", [3], seq_len=8)
    synthetic_set(tmp_path / "b", [3], seq_len=8, layout=SodaLayout(text_vocab_size=500, bos_id=0, eos_id=1))
    with pytest.raises(LayoutMismatchError, match="another token layout"):
        MixtureDataset(DataConfig(paths=[str(tmp_path / "a"), str(tmp_path / "b")]))
    with pytest.raises(LayoutMismatchError, match="text_vocab_size"):
        MixtureDataset(
            DataConfig(paths=[str(tmp_path / "a")]), layout=SodaLayout(text_vocab_size=500, bos_id=0, eos_id=1)
        )
    with pytest.raises(LayoutMismatchError, match="seq_len 8"):
        MixtureDataset(DataConfig(paths=[str(tmp_path / "a")]), seq_len=4096)


def test_truncated_shard_is_an_error_or_skipped_with_count(tmp_path):
    synthetic_set(tmp_path / "s", [4, 4, 4], seq_len=8)
    path = tmp_path / "s" / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ShardReadError, match="shard-000001.tar.*truncated"):
        MixtureDataset(DataConfig(paths=[str(tmp_path / "s")]))
    ds = MixtureDataset(DataConfig(paths=[str(tmp_path / "s")], skip_corrupt=True))
    assert len(ds.sets[0]) == 8 and len(ds.sets[0].skipped_shards) == 1


def test_overwritten_sample_is_an_error_or_masked_with_count(tmp_path):
    synthetic_set(tmp_path / "s", [4], seq_len=8)
    path = tmp_path / "s" / "shard-000000.tar"
    raw = bytearray(path.read_bytes())
    raw[1024 + 512 + 20] ^= 0xFF  # inside sample 1's .npy header (each member: 512 tar header + 512 data)
    path.write_bytes(bytes(raw))
    ds = MixtureDataset(DataConfig(paths=[str(tmp_path / "s")]))
    with pytest.raises(ShardReadError, match="sample 1"):
        for g in range(4):
            ds[g]
    ds = MixtureDataset(DataConfig(paths=[str(tmp_path / "s")], skip_corrupt=True))
    loader = SodaDataLoader(ds, 4, 4, num_workers=0)
    (batch,) = next(iter(loader))
    assert loader.corrupt_samples == 1
    bad = batch["corrupt"].nonzero().item()
    assert batch["loss_mask"][bad].sum() == 0 and batch["loss_mask"].sum() == 3 * 8


def test_padding_is_masked():
    batch = {"sample": __import__("torch").tensor([[5, 6, 7, -1, -1]]), "index": None, "corrupt": None, "source": None}
    out = split_batch(batch, pad_input_id=1)
    assert out["tokens"].tolist() == [[5, 6, 7, 1]]
    assert out["labels"].tolist() == [[6, 7, 0, 0]]
    assert out["loss_mask"].tolist() == [[1, 1, 0, 0]]


def test_a_changed_id_that_stays_in_the_vocabulary_fails_its_checksum(tmp_path, capsys):
    from megatron_soda.tokenization.shard_format import sample_span
    from megatron_soda.tools.inspect import verify_set

    written = synthetic_set(tmp_path / "s", [4], seq_len=8)
    clean = ShardSet(tmp_path / "s")
    assert verify_set(str(tmp_path / "s")) == 4 and "with checksums" in capsys.readouterr().out
    rec = clean.shards[0]
    span = sample_span(rec, 2, len(clean._header), clean._data_bytes)
    path = tmp_path / "s" / rec["file"]
    raw = bytearray(path.read_bytes())
    at = span.start + span.data_at
    item = clean.dtype.itemsize
    new_id = (int(written[2][0]) + 1) % clean.vocab_size  # still a valid id: only the checksum can tell
    raw[at : at + item] = np.array([new_id], dtype=clean.dtype).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardReadError, match="sample 2: checksum mismatch"):
        ShardSet(tmp_path / "s").read(2)
    assert int(ShardSet(tmp_path / "s", verify=False).read(2)[0][0]) == new_id  # unchecked, it trains silently
    with pytest.raises(ShardReadError, match="1 bad of 4 samples"):
        verify_set(str(tmp_path / "s"))


def test_the_loader_carries_32k_token_samples_whole(tmp_path):
    """Long-form audio's sample length (32,768 tokens: 5.5 minutes at 100 tokens/s) through the shard
    format, the mixture and the loader's workers, token for token."""
    samples = synthetic_set(tmp_path / "long", [2, 2], seq_len=32768, seed=5)
    ds = MixtureDataset(DataConfig(paths=[str(tmp_path / "long")]))
    (batch,) = next(iter(SodaDataLoader(ds, 2, 2, num_workers=1)))
    assert batch["tokens"].shape == (2, 32768)
    for row, g in enumerate(batch["index"]):
        want = samples[ds.locate(int(g))[1]].astype(np.int64)
        assert (
            batch["tokens"][row].tolist() == want[:-1].tolist() and batch["labels"][row].tolist() == want[1:].tolist()
        )


def test_sources_are_named_apart_and_one_set_twice_is_refused(tmp_path):
    """Per-source shares are logged as data_<name>: two names alike would overwrite one another."""
    synthetic_set(tmp_path / "en" / "shards", [4], seq_len=8, seed=1)
    synthetic_set(tmp_path / "zh" / "shards", [4], seq_len=8, seed=2)
    paths = [str(tmp_path / "en" / "shards"), str(tmp_path / "zh" / "shards")]
    assert MixtureDataset(DataConfig(paths=paths)).names == ["en/shards", "zh/shards"]
    with pytest.raises(ConfigError, match="each source needs its own name"):
        MixtureDataset(DataConfig(paths=[paths[0], paths[0]]))
    with pytest.raises(ConfigError, match="not 'stage'"):
        MixtureDataset(DataConfig(paths=paths, names=["stage", "zh"]))
