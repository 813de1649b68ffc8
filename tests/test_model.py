"""Presets against the paper's parameter counts (SODA paper, model table), and the FLOPs formula."""

import pytest

from megatron_soda.config import load_config
from megatron_soda.model.flops import flops_per_token, param_counts
from tests.launch import ROOT

# (non-embedding, one V x d embedding, label = non-emb + 1 embedding, untied total), in millions
SPEC = {
    "soda-135m": (57.0, 74.1, 131.1, 205.0),
    "soda-600m": (440.5, 148.1, 588.6, 737.0),
    "soda-1.7b": (1409.0, 296.2, 1706.0, 2000.0),
    "soda-4b": (3634.0, 370.3, 4004.0, 4370.0),
}


@pytest.mark.parametrize("preset", list(SPEC))
def test_presets_match_the_paper_counts(preset):
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
