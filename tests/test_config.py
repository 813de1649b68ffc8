import pytest

from megatron_soda import cpu_backend
from megatron_soda.config import ConfigError, load_config, parse_overrides, save_config
from tests.launch import ROOT


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(
        str(ROOT / "configs" / "soda-600m.yaml"),
        ["--model.hidden_size", "512", "--optim.lr=1e-3", "--data.paths", "[a, b]", "--train.device", "cpu"],
    )
    assert cfg.model.hidden_size == 512 and cfg.optim.lr == 1e-3 and cfg.data.paths == ["a", "b"]
    assert cfg.model.num_layers == 28  # the preset's value survives
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.hiden_size", "1"], "unknown config key 'model.hiden_size'"),
        (["--train.steps", "1.5"], "train.steps: expected int"),
        (["--model", "3"], "'model' is a section"),
        (["--train.steps"], "has no value"),
    ],
)
def test_bad_overrides_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, args)


def test_parse_overrides_handles_equals_and_dashes():
    assert parse_overrides(["--run-dir=x", "--train.micro-batch-size", "4"]) == {
        "run_dir": "x",
        "train": {"micro_batch_size": 4},
    }


def test_cpu_backend_symbols_are_where_megatron_core_keeps_them():
    # canary: fails loudly if a megatron-core upgrade moves what the CPU backend redirects
    cpu_backend.check_symbols()
