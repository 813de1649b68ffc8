"""Presets against the paper's parameter counts (SODA paper, model table), and the FLOPs formula."""

import pytest

from megatron_soda.config import load_config
from megatron_soda.model.flops import flops_per_token, param_counts
from tests.launch import PRESETS, ROOT

# (non-embedding, one V x d embedding, label = non-emb + 1 embedding, untied total), in millions
SPEC = {
    "soda-135m": (57.0, 74.1, 131.1, 205.0),
    "soda-600m": (440.5, 148.1, 588.6, 737.0),
    "soda-600m-32k": (440.5, 148.1, 588.6, 737.0),  # the 600M shape, its context extended
    "soda-1.7b": (1409.0, 296.2, 1706.0, 2000.0),
    "soda-4b": (3634.0, 370.3, 4004.0, 4370.0),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_match_the_paper_counts(preset):
    assert preset in SPEC, f"configs/{preset}.yaml: add its parameter counts (the paper's model table) to SPEC"
    cfg = load_config(str(ROOT / "configs" / f"{preset}.yaml"))
    c = {k: v / 1e6 for k, v in param_counts(cfg.model).items()}
    non_emb, emb, label, total = SPEC[preset]
    assert c["non_embedding"] == pytest.approx(non_emb, rel=2e-3)
    assert c["embedding"] == pytest.approx(emb, rel=2e-3)
    assert c["label"] == pytest.approx(label, rel=2e-3)
    assert c["total"] == pytest.approx(total, rel=5e-3)
    assert cfg.model.padded_vocab_size % (128 * 8) == 0 and cfg.model.padded_vocab_size - 144_644 < 1024


def test_flops_per_token_counts_matmuls_and_attention():
    cfg = load_config(str(ROOT / "configs" / "soda-135m.yaml"))
    m = cfg.model
    matmul_params = (
        param_counts(m)["non_embedding"] - m.num_layers * (2 * m.hidden_size + 2 * m.head_dim) - m.hidden_size
    )
    expected = 3 * (2 * (matmul_params + m.hidden_size * m.vocab_size) + 4 * m.num_layers * 4096 * 8 * 64)
    assert flops_per_token(m, 4096) == pytest.approx(expected)
    # without attention it is the 6N rule with N = matmul weights + LM head
    assert flops_per_token(m, 0) == 6 * (matmul_params + m.hidden_size * m.vocab_size)


def test_counter_normal_is_a_function_of_the_index_only():
    """The layout-invariant initialiser's generator: any subset of indices, in any blocks, gives the
    same values as the whole; the values are standard normal; names and seeds give other streams."""
    import torch

    from megatron_soda.model.init import counter_normal

    idx = torch.arange(1_000_000)
    whole = counter_normal(7, "w", idx)
    part = counter_normal(7, "w", idx[123_457:223_457].flip(0))
    assert torch.equal(part, whole[123_457:223_457].flip(0))
    assert abs(whole.mean().item()) < 0.005 and abs(whole.std().item() - 1) < 0.005
    assert abs((whole.abs() < 1).double().mean().item() - 0.6827) < 0.003  # the normal's 1-sigma mass
    other_name, other_seed = counter_normal(7, "v", idx[:1000]), counter_normal(8, "w", idx[:1000])
    assert abs(torch.corrcoef(torch.stack([whole[:1000], other_name, other_seed]))[0, 1:]).max() < 0.1
