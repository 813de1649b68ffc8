import pytest

from megatron_soda.config import ConfigError, UserError, load_config, parse_overrides, save_config
from megatron_soda.parallel import cpu_backend
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


def test_speed_switches_resolve_per_device_and_refuse_what_the_device_cannot_run():
    """`auto` is the torch path on the CPU backend and the measured fast path on a GPU (CUDA graphs
    only where the step is host-bound); impossible choices are one clear error, before any work."""
    from megatron_soda.model.fast_paths import resolve_fast_paths

    cpu = resolve_fast_paths(load_config(str(ROOT / "configs" / "tiny.yaml")), cuda=False)
    assert (cpu.embedding, cpu.output, cpu.norm, cpu.rope, cpu.wgrad, cpu.adam, cpu.cuda_graph) == (
        "torch",
        "torch",
        "torch",
        "torch",
        "torch",
        "foreach",
        "none",
    )
    small = resolve_fast_paths(load_config(str(ROOT / "configs" / "soda-135m.yaml")), cuda=True)
    assert (small.embedding, small.output, small.rope, small.wgrad, small.adam, small.cuda_graph) == (
        "triton",
        "fused",
        "triton",
        "main_grad",
        "fused",
        "full_iteration",
    )
    assert small.norm == "torch"  # measured faster than ours on the H100 for these shapes
    big = resolve_fast_paths(load_config(str(ROOT / "configs" / "soda-1.7b.yaml")), cuda=True)
    assert big.cuda_graph == "none" and big.wgrad == "main_grad"
    mine = resolve_fast_paths(load_config(None, ["--model.norm_impl", "triton"]), cuda=False)
    assert mine.norm == "triton"  # an explicit choice is kept (the interpreter runs it on CPU)
    opt_in = resolve_fast_paths(load_config(None, ["--model.output_impl", "blockwise"]), cuda=True)
    assert opt_in.output == "blockwise" and opt_in.fused_output  # picked by name only: auto never takes it
    for args, cuda, message in (
        (["--parallel.cuda_graph", "full_iteration"], False, "needs a GPU"),
        (["--parallel.cuda_graph", "full_iteration", "--parallel.pp", "2"], True, "parallel.pp 1 only"),
        (["--parallel.cuda_graph", "full_iteration", "--train.debug_nan_steps", "[2]"], True, "debug_nan_steps"),
        (["--model.norm_impl", "apex"], False, "model.norm_impl: expected auto, triton or torch, got 'apex'"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve_fast_paths(load_config(None, args), cuda=cuda)


def test_bench_variants_name_their_levers():
    from megatron_soda.tools.bench.train import check_variant, variant_overrides

    off = variant_overrides("ours-off")
    assert off["parallel"]["cuda_graph"] == "none" and off["optim"]["adam_impl"] == "foreach"
    one = variant_overrides("ours-off+graphs+adam")
    assert one["parallel"]["cuda_graph"] == "full_iteration" and one["optim"]["adam_impl"] == "fused"
    assert one["model"]["norm_impl"] == "torch" and variant_overrides("ours") == {}
    filtered = variant_overrides("ours+filter")["model"]
    assert filtered["output_impl"] == "blockwise" and filtered["ce_filter_eps"] == 2**-12
    assert variant_overrides("ours-off+rope+blockwise")["model"]["output_impl"] == "blockwise"
    for bad, message in (
        ("ours-off+turbo", "unknown lever 'turbo'"),
        ("hf+graphs", "unknown variant"),
        ("ours-nokernels+filter", "puts a kernel into ours-nokernels"),
    ):
        with pytest.raises(UserError, match=message):
            check_variant(bad)
