"""FP8 linears (kernels/fp8.py, `model.fp8 tensorwise`) on CPU: the scaling, the casts and the three
GEMMs against a reference written here from the definition (quantise with scale = format max /
amax, dequantise, multiply in fp32), torch's own CPU `_scaled_mm` against the emulation (the scale
convention and the operand layouts cuBLAS wants), and the seam in megatron-core's linears at TP=1
and at TP=2 with sequence parallelism (the amax reduced over TP: the same numbers as TP=1).

`torch._scaled_mm` on a GPU runs only there (scripts/gpu_check.sh perf3, kernels/selfcheck.py).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import megatron_soda  # noqa: F401  (the kernels package)
from megatron_soda.kernels import fp8
from tests.launch import ROOT, env
from tests.test_kernels import _Plant  # identity with a 1% error planted in its value or gradient

SEED = int(time.time()) % 100_000
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


def _fake_quant(t: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    """The values FP8 per-tensor scaling gives `t`, from the definition: scale = the format's max
    finite value / max |t|; round t * scale to the format; divide by the scale."""
    top = torch.finfo(fmt).max
    scale = top / t.detach().abs().max().float()
    return (t.detach().float() * scale).clamp(-top, top).to(fmt).float() / scale


ROLES = ("scale_x", "scale_w", "scale_g")  # the order in which the linear asks for its scales


@contextlib.contextmanager
def _planted_scale(role: str | None):
    """A 1% error in one of the linear's three scales (x, weight: forward; output gradient: backward)."""
    if role is None:
        yield
        return
    real, calls = fp8.scale_for, []

    def wrong(a, fmt):
        calls.append(fmt)
        s = real(a, fmt)
        return s * 1.01 if ROLES[len(calls) - 1] == role else s

    fp8.scale_for = wrong
    try:
        yield
    finally:
        fp8.scale_for = real


def check_fp8_linear(plant: str | None = None, emulate: bool = True, rows: int = 40, bias: bool = False) -> list[str]:
    """The outputs of the FP8 linear (forward, d_x, d_w, d_b) that differ from the fp32 products of
    the operands quantised by definition (x, w: e4m3; the output gradient: e5m2); [] = parity."""
    g = _gen(1)
    x = (torch.randn(rows, 48, generator=g) * 3).requires_grad_(True)
    w = (torch.randn(32, 48, generator=g) * 0.05).requires_grad_(True)
    b = torch.randn(32, generator=g).requires_grad_(True) if bias else None
    dy = torch.randn(rows, 32, generator=g) * 1e-3  # gradients are small: e5m2's range matters
    xp = _Plant.apply(x, 1.0, 1.01) if plant == "d_x" else x
    wp = _Plant.apply(w, 1.0, 1.01) if plant == "d_w" else w
    with _planted_scale(plant if plant in ROLES else None):
        y = fp8.fp8_linear(xp, wp, b, emulate=emulate)
        y = _Plant.apply(y, 1.01, 1.0) if plant == "forward" else y
        y.backward(dy)
    xd, wd, gd = _fake_quant(x, E4M3), _fake_quant(w, E4M3), _fake_quant(dy, E5M2)
    ref = {"forward": xd @ wd.t() + (b.detach() if bias else 0), "d_x": gd @ wd, "d_w": gd.t() @ xd}
    got = {"forward": y.detach(), "d_x": x.grad, "d_w": w.grad}
    if bias:
        ref["d_b"], got["d_b"] = dy.sum(0), b.grad
    return [k for k in ref if not torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-6 * ref[k].abs().max().item())]


@pytest.mark.parametrize("rows", [40, 48, 7])  # padded to 48 and 16 rows for the GEMMs, or not padded
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_equals_the_products_of_the_quantised_operands(rows, bias):
    assert check_fp8_linear(rows=rows, bias=bias) == [], f"seed {SEED}"


@pytest.mark.parametrize("plant", ["forward", "d_x", "d_w", *ROLES])
def test_a_bug_planted_in_an_output_or_a_scale_fails_the_check(plant):
    """A 1% error in any output, or in any of the three scales (quantising on another grid: the
    values that depend on that operand move), makes the check name what it changes."""
    bad = set(check_fp8_linear(plant=plant))
    depends = {"scale_x": {"forward", "d_w"}, "scale_w": {"forward", "d_x"}, "scale_g": {"d_x", "d_w"}}
    assert bad == depends.get(plant, {plant}), (plant, bad)


def test_torch_scaled_mm_equals_the_emulation():
    """torch's CPU `_scaled_mm` (the op the GPU runs, with the same arguments: reciprocal scales,
    a row-major first and a column-major second operand) gives what the emulation gives."""
    g = _gen(2)
    x = (torch.randn(3, 11, 64, generator=g) * 2).requires_grad_(True)  # 33 rows: padded to 48
    w = (torch.randn(80, 64, generator=g) * 0.1).requires_grad_(True)
    dy = torch.randn(3, 11, 80, generator=g) * 1e-2
    outs = []
    for emulate in (True, False):
        x.grad = w.grad = None
        y = fp8.fp8_linear(x, w, emulate=emulate)
        y.backward(dy)
        outs.append((y.detach(), x.grad, w.grad))
    for name, a, b in zip(("forward", "d_x", "d_w"), *outs, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item()), (name, f"seed {SEED}")
    assert outs[0][0].shape == (3, 11, 80)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_the_scale_maps_the_amax_onto_the_formats_largest_value(fmt):
    """scale = max representable / amax: the largest element becomes exactly the format's max (448
    for e4m3, 57344 for e5m2), nothing saturates or overflows, and every normal value comes back
    within half a unit in the last place (3 mantissa bits for e4m3, 2 for e5m2)."""
    g = _gen(3)
    t = torch.randn(1000, generator=g) * 7
    t[17] = -t.abs().max() * 1.5  # a negative amax
    q, scale = fp8.to_fp8(t, fmt)
    top = {E4M3: 448.0, E5M2: 57344.0}[fmt]
    assert fp8.fp8_max(fmt) == top and q.dtype == fmt
    assert scale.item() == pytest.approx(top / t.abs().max().item(), rel=1e-6)
    assert q.float()[17].item() == -top and q.float().abs().max().item() == top
    back = fp8.dequantize(q, scale)
    normal = t.abs() * scale >= torch.finfo(fmt).smallest_normal
    mantissa = {E4M3: 3, E5M2: 2}[fmt]
    assert ((back - t).abs() <= t.abs() * 2.0 ** -(mantissa + 1) * 1.0001)[normal].all()
    zeros, zscale = fp8.to_fp8(torch.zeros(5), fmt)
    assert torch.isfinite(zscale) and (zeros.float() == 0).all()


def test_gemm_layout_rules_are_the_gpus():
    """The first operand row-major, the second column-major, dimensions multiples of 16: refused
    otherwise, on CPU as on a GPU, so the CPU tests hold the layouts the GPU path passes."""
    a = torch.zeros(16, 32).to(E4M3)
    b = torch.zeros(32, 16).to(E4M3)
    one = torch.ones(())
    fp8.scaled_mm(a, one, b.t().contiguous().t(), one, torch.float32, emulate=True)
    with pytest.raises(ValueError, match="column-major"):
        fp8.scaled_mm(a, one, b, one, torch.float32, emulate=True)
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.scaled_mm(torch.zeros(16, 24).to(E4M3), one, torch.zeros(16, 24).to(E4M3).t(), one, torch.float32, True)


def test_weight_gradient_goes_into_main_grad():
    """Gradient-accumulation fusion: d(weight) in fp32 added to megatron's main_grad, flagged for
    the DDP hook, equal to the separate gradient."""
    g = _gen(4)
    x = torch.randn(32, 48, generator=g)
    w = (torch.randn(32, 48, generator=g) * 0.1).requires_grad_(True)
    dy = torch.randn(32, 32, generator=g)
    fp8.fp8_linear(x, w).backward(dy)
    want = w.grad.clone()
    w.grad = None
    w.main_grad = torch.full(w.shape, 0.5)
    w.grad_added_to_main_grad = False
    fp8.fp8_linear(x, w, into_main_grad=True).backward(dy)
    assert w.grad_added_to_main_grad
    assert torch.allclose(w.main_grad, 0.5 + want, atol=1e-6)


def test_fp8_is_close_to_the_full_precision_linear():
    """The sanity bound: e4m3 / e5m2 rounding moves a 256-term product by about a percent."""
    g = _gen(5)
    x = torch.randn(64, 256, generator=g, requires_grad=True)
    w = (torch.randn(128, 256, generator=g) * 0.05).requires_grad_(True)
    y = fp8.fp8_linear(x, w)
    ref = x.detach() @ w.detach().t()
    rel = ((y.detach() - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < 0.05, rel


def test_the_cpu_backend_refuses_fp8_in_one_line():
    from megatron_soda.config import ConfigError, load_config
    from megatron_soda.model.fast_paths import resolve_fast_paths

    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), {"model": {"fp8": "tensorwise"}})
    with pytest.raises(ConfigError, match="needs a GPU") as e:
        resolve_fast_paths(cfg, cuda=False)
    assert "\n" not in str(e.value)
    cfg.model.fp8 = "none"
    resolve_fast_paths(cfg, cuda=False)


# --- the seam in megatron-core's linears (a trainer in its own processes) -------------------------


def _seam_run(out: str) -> None:
    """One rank: the tiny model, its loss in fp32, then with the decoder's linears re-classed to
    FP8 (emulated GEMMs: the CPU backend refuses fp8 in a config, so the seam is applied here by
    hand), then one training step through them; results on rank 0."""
    import torch.distributed as dist

    from megatron_soda.config import load_config, validate
    from megatron_soda.model.gpt import Fp8ColumnParallelLinear, Fp8RowParallelLinear, fp8_linears
    from megatron_soda.parallel.cpu_backend import import_megatron
    from megatron_soda.parallel.setup import init_distributed, teardown
    from megatron_soda.tools.bench.train import bench_layout
    from megatron_soda.tools.bench.train_step import synthetic_micro_batches
    from megatron_soda.training.trainer import build_trainer

    import_megatron()
    init_distributed("cpu")
    world = dist.get_world_size()
    over = {
        "model": {"vocab_size": 17000, "wgrad_impl": "main_grad"},
        "train": {"device": "cpu", "seq_length": 64, "micro_batch_size": 2, "global_batch_size": 2, "steps": 2},
        "parallel": {"tp": world, "sequence_parallel": world > 1},
    }
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), over)
    try:
        validate(cfg, world, need_data=False)
        layout = bench_layout(cfg.model.vocab_size)
        cfg.model.vocab_size = layout.vocab_size
        trainer = build_trainer(cfg, layout, need_data=False)
        micro = synthetic_micro_batches(layout.vocab_size, 2, 64, 1, seed=0)
        keys = sorted(trainer.modules[0].state_dict())
        full = trainer.evaluate(iter([micro]), 1)["loss"]
        n = sum(fp8_linears(m) for m in trainer.modules)
        classes = sorted({type(m).__name__ for m in trainer.modules[0].modules()})
        quantised = trainer.evaluate(iter([micro]), 1)["loss"]
        row = trainer.train_step(micro)
        fp8_mods = [
            m for m in trainer.modules[0].modules() if isinstance(m, Fp8ColumnParallelLinear | Fp8RowParallelLinear)
        ]
        grads = [float(m.weight.main_grad.abs().max()) for m in fp8_mods]
        result = {
            "full": full,
            "fp8": quantised,
            "step_loss": row["loss"],
            "grad_norm": row["grad_norm"],
            "reclassed": n,
            "classes": classes,
            "keys_unchanged": sorted(trainer.modules[0].state_dict()) == keys,
            "min_main_grad": min(grads),
        }
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        teardown()


def _seam(tmp_path: Path, nproc: int) -> dict:
    out = tmp_path / f"seam{nproc}.json"
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    r = subprocess.run(
        [sys.executable, *launch, "-m", "tests.test_fp8", str(out)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0 and out.is_file(), r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fp8_seam_in_megatron_linears_at_tp1_and_tp2_with_sequence_parallelism(tmp_path):
    """The decoder's QKV / projection / MLP linears (4 per layer) become FP8 linears, the embedding
    and output layer do not, the checkpoint keys stay; the loss moves by FP8 rounding only, the
    step trains (every FP8 weight's main_grad filled); and TP=2 with SP gives TP=1's FP8 loss and
    gradient norm (the amax of split operands reduced over TP: one quantisation grid)."""
    one = _seam(tmp_path, 1)
    assert one["reclassed"] == 4 * 4 and one["keys_unchanged"], one
    assert "Fp8ColumnParallelLinear" in one["classes"] and "Fp8RowParallelLinear" in one["classes"]
    assert "SodaOutputLayer" in one["classes"] and "SodaEmbedding" in one["classes"]
    assert one["fp8"] != one["full"] and abs(one["fp8"] - one["full"]) < 0.01 * one["full"], one
    assert one["step_loss"] == pytest.approx(one["fp8"], rel=1e-6) and one["min_main_grad"] > 0, one
    two = _seam(tmp_path, 2)
    assert two["reclassed"] == 4 * 4, two
    # measured: the losses equal to 1e-7, the grad norm within 2.5e-5 (an upstream gradient summed in
    # another order can round to the neighbouring FP8 value); per-shard scales: 1.4e-4 and 5.4e-3
    for k, rel in (("full", 1e-5), ("fp8", 1e-5), ("step_loss", 1e-5), ("grad_norm", 5e-4)):
        assert two[k] == pytest.approx(one[k], rel=rel), (k, one, two)


if __name__ == "__main__":
    _seam_run(sys.argv[1])
