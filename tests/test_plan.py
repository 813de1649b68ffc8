"""`soda plan` against what was measured: every GPU row's peak memory, single-GPU speed left one
preset out, the bytes a gloo run sends per step, the scaling rules of the activation measurement,
and the two questions a user asks (does 4B fit one H100? what do 16 GPUs run best?). docs/PLAN.md
is the model these hold to account."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.launch import ROOT, env

ROWS_DIR = ROOT / "docs" / "bench"
CONFIGS = ROOT / "configs"
MEMORY_BAND = 0.10
TIME_BAND = 0.10

# GPU rows the memory model does not reach, with what is known (docs/PLAN.md, "Accuracy"): the
# test fails when one of them starts to fit (or another stops), so the list stays true.
KNOWN_MISSES = {
    # model.norm_impl triton (an ablation lever, not auto's choice): the GPU holds 1.9 GiB more than
    # with torch's norm, the interpreter's run of the same kernel on the CPU 6.5 GiB less
    "train.jsonl:15": "Triton RMSNorm",
    "train_h200.jsonl:10": "Triton RMSNorm",
    # output_impl torch (ours-nokernels, 2026-11-25): the GPU holds one or two more fp32 copies of
    # the logits at the peak than the CPU measurement of the same code
    "train.jsonl:5": "torch output layer + CE",
    "train.jsonl:8": "torch output layer + CE",
}


def _rows():
    from megatron_soda.tools.plan import timing

    return timing.read_rows(ROWS_DIR)


def test_comm_stats_wraps_every_name_megatron_calls_and_puts_them_back(tmp_path):
    from megatron_soda.parallel.cpu_backend import import_megatron

    import_megatron()
    import megatron.core.distributed.param_and_grad_buffer as buffers
    import megatron.core.tensor_parallel.mappings as mappings
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from megatron_soda.parallel.comm_stats import CommStats

    originals = (dist.all_reduce, c10d.isend, mappings.dist_all_gather_func, buffers.dist_reduce_scatter_func)
    off = CommStats(tmp_path, 0, enabled=False)
    off.start()
    assert dist.all_reduce is originals[0]
    off.step_done(1)
    off.stop()
    assert not (tmp_path / "comm").exists()
    on = CommStats(tmp_path, 3, enabled=True)
    on.start()
    try:
        assert dist.all_reduce is not originals[0] and c10d.all_reduce is dist.all_reduce
        assert c10d.isend is not originals[1]  # what P2POp and batch_isend_irecv compare with
        assert mappings.dist_all_gather_func is not originals[2]  # aliases taken at megatron's import
        assert buffers.dist_reduce_scatter_func is not originals[3]
        on.add(None, "all_reduce", 12)
        on.step_done(7)
    finally:
        on.stop()
    assert (dist.all_reduce, c10d.isend, mappings.dist_all_gather_func, buffers.dist_reduce_scatter_func) == originals
    row = json.loads((tmp_path / "comm" / "rank3.jsonl").read_text())
    assert row == {"step": 7, "rank": 3, "bytes": {"world": {"all_reduce": 12}}, "calls": {"world": {"all_reduce": 1}}}


COUNTED_LAYOUTS = {  # world, parallel settings
    "tp2_pp2_vpp2_dp2_sp_distopt": (
        8,
        {"tp": 2, "pp": 2, "vpp": 2, "sequence_parallel": True, "distributed_optimizer": True},
    ),
    "cp2_dp2_distopt": (4, {"cp": 2, "distributed_optimizer": True}),
}


@pytest.mark.slow  # eight (then four) gloo ranks under torchrun
@pytest.mark.parametrize("name", list(COUNTED_LAYOUTS))
def test_comm_bytes_of_every_group_match_a_gloo_run_exactly(name, tmp_path):
    """TP 2 x PP 2 (interleaved, 2 chunks) x DP 2 on 8 gloo ranks, with sequence parallelism and the
    distributed optimizer, and CP 2 x DP 2 on 4: every collective and point-to-point call of 2
    training steps counted (parallel/comm_stats.py) per rank, group and op, bytes and calls, equal to
    the planner's."""
    from megatron_soda.config import load_config
    from megatron_soda.parallel import processes
    from megatron_soda.parallel.comm_stats import read_comm
    from megatron_soda.tokenization.vocab import SodaLayout
    from megatron_soda.tools.plan.comm import step_collectives, totals
    from megatron_soda.tools.plan.layout import layout_of, run_of
    from megatron_soda.tools.plan.shapes import stage_state

    small = {"text_vocab_size": 256, "bos_id": 0, "eos_id": 1, "codebooks": 2, "codebook_size": 64}
    cfg = load_config(
        str(CONFIGS / "tiny.yaml"),
        {
            "model": {"vocab_size": 388, "vocab_pad_multiple": 256},
            "parallel": COUNTED_LAYOUTS[name][1],
            "train": {"device": "cpu", "seq_length": 32, "micro_batch_size": 2, "global_batch_size": 8},
        },
    )
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"config": cfg.to_dict(), "steps": 2, "run_dir": str(tmp_path), "layout": small}))
    world = COUNTED_LAYOUTS[name][0]
    cmd = processes.torchrun(world, "megatron_soda.tools.plan.count_run", [str(spec)])
    r = subprocess.run(cmd, env=processes.rank_env(world, env()), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    counted = read_comm(tmp_path)
    assert sorted(counted) == list(range(world))
    lay = layout_of(cfg, world)
    run = run_of(cfg, SodaLayout(**small), cuda=False)
    for rank, steps in counted.items():
        pp_rank = rank // (world // lay.pp)  # megatron's rank order: pipeline stages outermost
        stage = stage_state(cfg.model, lay.tp, lay.pp, lay.vpp, lay.dp * lay.cp, pp_rank, True, False)
        predicted = totals(step_collectives(run, lay, stage))
        assert [s["step"] for s in steps] == [1, 2]
        for s in steps:
            assert {"bytes": s["bytes"], "calls": s["calls"]} == predicted, (rank, s["step"])


def test_rank_shapes_and_buffers_follow_megatron_built_on_meta():
    """What a rank holds, from the TP 1 model by rules (shapes.py), equals megatron's own build on
    the meta device at that layout: DDP buffer and bucket sizes, distributed-optimizer padding
    included; the 4B model builds on meta in seconds."""
    from megatron_soda.config import load_config
    from megatron_soda.tools.plan import shapes

    shapes._model_params.cache_clear()
    t0 = time.perf_counter()
    shapes.model_params(load_config(str(CONFIGS / "soda-4b.yaml")).model)
    assert time.perf_counter() - t0 < 15
    cases = [
        ("soda-4b", {"tp": 2, "pp": 2, "distributed_optimizer": True}, 16),
        ("soda-1.7b", {"tp": 2, "pp": 2, "vpp": 2, "distributed_optimizer": True, "overlap_grad_reduce": True}, 8),
        ("soda-135m", {"pp": 3}, 6),
    ]
    for preset, parallel, world in cases:
        cfg = load_config(str(CONFIGS / f"{preset}.yaml"), {"parallel": parallel})
        p = cfg.parallel
        dp = world // (p.tp * p.pp)
        for stage in sorted({0, p.pp - 1}):
            mine = shapes.stage_state(
                cfg.model, p.tp, p.pp, p.vpp, dp, stage, p.distributed_optimizer, p.overlap_grad_reduce
            )
            meta = shapes.meta_ddp_buffers(cfg, world, stage * p.tp * dp)
            assert [(c.buffer, c.buckets) for c in mine.chunks] == meta, (preset, stage)


def test_activation_scaling_rules_predict_measurements_at_other_shapes():
    """The micro-batch measured at one shape predicts a measurement at another (sizes, micro-batch,
    sequence), at TP 2 with and without SP, and at CP 2 from CP 2 at another shape."""
    from megatron_soda.tools.plan.footprint import Structure, measure, replace

    ours = Structure(embedding="triton", output="fused", norm="torch", rope="triton", wgrad="main_grad")
    a = measure(ours)
    other = tuple(
        sorted(dict(b=3, s=24, h=48, hd=8, heads=10, groups=2, ffn=88, vocab=516, vocab_pad=128, chunk=29).items())
    )

    def close(rule, measured, sizes, band, sp=False):
        for layers in (2,):
            r = rule.timeline(sizes, layers, True, True, sp)
            m = measured.timeline(sizes, layers, True, True)
            assert abs(r["peak"] / m["peak"] - 1) < band, (r, m)
            assert abs(r["held"] / m["held"] - 1) < band, (r, m)
        assert abs(rule.saved_per_layer(sizes, sp) / measured.saved_per_layer(sizes) - 1) < band

    b = measure(ours, other)
    close(a, b, b.measured_at, 0.01)
    tp2 = measure(replace(ours, tp=2))
    close(a, tp2, tp2.measured_at, 0.02)
    sp2 = measure(replace(ours, tp=2, sequence_parallel=True))
    close(a, sp2, sp2.measured_at, 0.05, sp=True)
    cp2 = measure(replace(ours, cp=2))
    cp2b = measure(replace(ours, cp=2), other)
    close(cp2, cp2b, cp2b.measured_at, 0.02)


def test_blockwise_output_layer_is_planned_from_its_measurement_without_logits():
    """`soda plan` with `model.output_impl blockwise` measures that kernel (in the interpreter) like any
    structure: the rule predicts it at another shape, and at the 135M preset's micro-batch (8 x 4096
    tokens) its output layer holds about its fp32 d(hidden) (tokens x hidden, 75 MB), where the
    chunked kernel holds a 4096-token chunk of logits and an fp32 weight gradient (2.9 GB)."""
    from megatron_soda.config import load_config
    from megatron_soda.tools.plan.footprint import Structure, measure, sizes_of

    fused = Structure(embedding="triton", output="fused", norm="torch", rope="triton", wgrad="main_grad")
    blockwise = Structure(embedding="triton", output="blockwise", norm="torch", rope="triton", wgrad="main_grad")
    other = tuple(sorted(dict(b=3, s=24, h=48, hd=8, heads=10, groups=2, ffn=88, vocab=516, vocab_pad=128).items()))
    a, b = measure(blockwise), measure(blockwise, other)
    ruled, measured = a.timeline(b.measured_at, 2, True, True, False), b.timeline(b.measured_at, 2, True, True)
    assert abs(ruled["peak"] / measured["peak"] - 1) < 0.01, (ruled, measured)
    big = sizes_of(load_config(str(CONFIGS / "soda-135m.yaml")).model, 4096, 8)
    out_bw = a.timeline(big, 30, True, True, False)["output"]
    out_fused = measure(fused).timeline(big, 30, True, True, False)["output"]
    assert out_bw < 0.05 * out_fused and out_bw < 1.5 * big.b * big.seq * big.h * 4, (out_bw, out_fused)


def _row_predictions():
    from megatron_soda.tools.plan import timing
    from megatron_soda.tools.plan.layout import Layout
    from megatron_soda.tools.plan.planner import GIB, Planner

    rows = _rows()
    cal = timing.calibrate("h200", rows, CONFIGS)
    out = {}
    for r in rows:
        if not timing.is_ours(r) or timing.gpu_of(r) is None:
            continue  # transformers' model (hf rows) and the CPU backend's rows: not what soda plan plans
        cfg = timing.row_config(r, CONFIGS)
        planner = Planner(cfg, timing.GPUS[timing.gpu_of(r)], cal, fast_paths=timing.row_fast_paths(r))
        pred = planner.predict(Layout(micro_batch=r["micro_batch"], recompute=r["recompute"]))
        out[r["_source"]] = (pred.memory.peak / GIB, r["peak_memory_gb"])
    return out


def test_memory_of_every_gpu_row_within_ten_percent():
    preds = _row_predictions()
    assert len(preds) >= 25  # every row of our model in docs/bench (H100 and H200)
    missed = {src for src, (p, m) in preds.items() if abs(p / m - 1) > MEMORY_BAND}
    assert missed == set(KNOWN_MISSES), {s: preds[s] for s in missed ^ set(KNOWN_MISSES)}
    for src in ("train_h200.jsonl:2", "train_h200.jsonl:13", "train_h200.jsonl:4", "train_h200.jsonl:16"):
        p, m = preds[src]  # the brief's four: 135M mb 8, 600M mb 4, 1.7B mb 2, 4B mb 1 on the H200
        assert abs(p / m - 1) < MEMORY_BAND, (src, p, m)


def test_single_gpu_speed_of_each_preset_from_the_others():
    """Leave one preset out: the compute fit of the other presets' rows predicts its tokens/s."""
    from megatron_soda.tools.plan import timing
    from megatron_soda.tools.plan.layout import Layout
    from megatron_soda.tools.plan.planner import Planner

    samples = timing.calibration_rows(_rows(), "h200", CONFIGS)
    assert len({r["preset"] for r, _ in samples}) == 4
    for r, cfg in samples:
        cal = timing.fit(samples, "h200", exclude_preset=r["preset"])
        assert r["_source"] not in " ".join(cal.rows)
        pred = Planner(cfg, timing.GPUS["h200"], cal).predict(Layout(micro_batch=r["micro_batch"]))
        assert abs(pred.tokens_per_s_per_gpu / r["tokens_per_s_per_gpu"] - 1) < TIME_BAND, (r["_source"], pred)


def test_4b_on_one_h100_does_not_fit_and_says_why(capsys):
    from megatron_soda.cli import main

    rc = main(["plan", "--config", str(CONFIGS / "soda-4b.yaml"), "--gpus", "1", "--gpu", "h100-80gb"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "no layout of soda-4b fits 1 x H100" in out and "does not fit" in out
    assert "model state alone" in out and "launch:" not in out


def test_16_gpus_rank_the_layouts_that_fit(capsys):
    from megatron_soda.cli import main
    from megatron_soda.config import load_config, parse_overrides, validate

    argv = ["plan", "--config", str(CONFIGS / "soda-4b.yaml"), "--gpus", "16", "--gpu", "h100-80gb", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and not plan["validated"] and "unvalidated" in plan["note"]
    fitting = [x for x in plan["layouts"] if x["fits"] == "yes"]
    assert len(fitting) >= 5
    speeds = [x["tokens_per_s_per_gpu"] for x in fitting]
    assert speeds == sorted(speeds, reverse=True)
    for x in plan["layouts"]:
        lay = x["layout"]
        assert lay["tp"] * lay["pp"] * lay["cp"] * lay["dp"] == 16
        assert x["memory_gib"]["peak"] * 1.1 <= plan["usable_gib"] or x["fits"] != "yes"
    launch = plan["launch"]
    assert launch.startswith("soda launch slurm --config") and "--nodes 2 --gpus-per-node 8" in launch
    flags = launch.split("--gpus-per-node 8", 1)[1].split()
    validate(load_config(str(CONFIGS / "soda-4b.yaml"), parse_overrides(flags)), 16, need_data=False)
