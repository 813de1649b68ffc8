"""The SODA recipe as the presets and the optimizer carry it: the peak-LR rule, the paper's data
mixture, and the optimizer's update (no decay on the input embedding, AdamC, the cautious mask)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_soda.config import DataConfig, load_config
from megatron_soda.data.mixture import MixtureDataset
from tests.conftest import synthetic_set
from tests.launch import PRESETS, ROOT, env

PAPER_MIXTURE = {"yodas-en": 0.516, "emilia-yodas-en": 0.288, "emilia-en": 0.146, "nemotron-cc": 0.05}


PAPER_LR = {"soda-135m": 4.24e-3, "soda-600m": 4.24e-3, "soda-1.7b": 3.0e-3, "soda-4b": 2.68e-3}
EXPLICIT_LR = {"soda-600m-32k": 3.0e-4}  # a context extension from a trained checkpoint: its own, lower LR


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_follow_the_papers_lr_rule_and_mixture(preset):
    assert preset in PAPER_LR or preset in EXPLICIT_LR, f"configs/{preset}.yaml: add its peak LR to PAPER_LR"
    path = str(ROOT / "configs" / f"{preset}.yaml")
    cfg = load_config(path)
    assert dict(zip(cfg.data.names, cfg.data.weights, strict=True)) == PAPER_MIXTURE
    assert (cfg.optim.adamc, cfg.optim.embedding_weight_decay, cfg.optim.weight_decay) == (True, False, 0.033)
    if preset in EXPLICIT_LR:
        assert cfg.optim.lr == EXPLICIT_LR[preset]
        return
    lr = PAPER_LR[preset]
    assert abs(cfg.optim.lr - lr) < 0.005e-3, cfg.optim.lr
    half = load_config(path, ["--train.global_batch_size", "256"])  # the rule follows the batch
    assert abs(half.optim.lr - cfg.optim.lr / 2**0.5) < 1e-7
    assert load_config(path, ["--optim.lr", "1e-4"]).optim.lr == 1e-4  # a given LR is kept


def test_a_mixture_without_its_weights_says_so(tmp_path):
    paths = [tmp_path / "a", tmp_path / "b"]
    synthetic_set(paths[0], [6]), synthetic_set(paths[1], [2])
    with pytest.raises(ValueError, match=r"4 weights \(yodas-en 0.516, emilia-yodas-en 0.288, emilia-en 0.146, "):
        MixtureDataset(DataConfig(paths=[str(p) for p in paths], **_paper_sources()))
    by_size = MixtureDataset(DataConfig(paths=[str(p) for p in paths]))
    assert by_size.describe().startswith("a 75.0%, b 25.0% (by size: data.weights not set")
    named = MixtureDataset(DataConfig(paths=[str(p) for p in paths], names=["speech", "text"], weights=[0.95, 0.05]))
    assert named.describe() == "speech 95.0%, text 5.0%"


def _paper_sources() -> dict:
    return {"names": list(PAPER_MIXTURE), "weights": list(PAPER_MIXTURE.values())}


def test_optimizer_update_matches_the_recipes_reference():
    """Two updates of the real Trainer's optimizer against a plain reference of Levanter's Cautious
    Adam with AdamC decay; flipping AdamC or the mask in the reference must be visible."""
    settings = ["", "--optim.cautious true", "--optim.adamc false --optim.embedding_weight_decay true"]
    p = subprocess.run(
        [sys.executable, "-m", "tests.optimizer_check", *" ; ".join(settings).split()],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3, p.stderr[-3000:]
    for row in rows:
        assert row["max_rel_err"] < 1e-4 and min(row["flipped_rel_err"].values()) > 1e-2, row
        assert "output_layer.weight" in row["decayed"] and not any("layernorm" in n for n in row["decayed"])
    default, cautious, decay_all = rows
    assert not any("word_embeddings" in n for n in default["decayed"])
    assert any("word_embeddings" in n for n in decay_all["decayed"])
    assert (default["optimizer"], cautious["optimizer"]) == ("AdamW", "CautiousAdamW")


def test_cautious_needs_whole_tensors():
    from megatron_soda.config import ConfigError, validate

    cfg = load_config(None, ["--optim.cautious", "true", "--parallel.tp", "2", "--data.paths", "[x]"])
    with pytest.raises(ConfigError, match="optim.cautious rescales each tensor"):
        validate(cfg, 2)
