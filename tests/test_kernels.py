"""Triton kernels against the torch reference, on CPU through Triton's interpreter (fp32).

Inputs are fresh random each run (the seed is in the failure message). Tolerances (fp32):
embedding forward/backward exact (a gather and a sum of the same numbers); NLL, log Z and
gradients 2e-5 absolute, relative to the largest value where that exceeds 1 (the fused path sums
the softmax chunk by chunk, in another order than the reference).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

import megatron_soda  # noqa: F401  (Triton interpreter on CPU)
from kernels.codec_embedding import fused_embedding
from kernels.fused_ce import fused_linear_cross_entropy
from tests.launch import ROOT, env, losses, run_train

SEED = int(time.time()) % 100_000


def _gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_embedding_matches_torch_on_a_vocab_shard(dtype, deterministic):
    g = _gen()
    start, end, hidden = 300, 812, 40  # this rank's rows of a 1024-row (padded) table
    table = torch.randn(end - start, hidden, generator=g, requires_grad=True)
    ids = torch.randint(0, 1024, (3, 77), generator=g)
    ids[0, :6] = torch.tensor([start - 1, start, end - 1, end, 0, 1023])  # shard edges, padding row
    out = fused_embedding(ids.to(dtype), table, start, end, deterministic)
    mine = (ids >= start) & (ids < end)
    ref_table = table.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.embedding(torch.where(mine, ids - start, 0), ref_table) * mine[..., None]
    grad = torch.randn(ref.shape, generator=g)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(out, ref), f"seed {SEED}"
    assert torch.allclose(table.grad, ref_table.grad, atol=1e-6, rtol=0), f"seed {SEED}"


@pytest.mark.parametrize("mode", ["nll_lse", "loss"])
@pytest.mark.parametrize("start,v_local,real", [(0, 1024, 1000), (512, 512, 1000), (0, 512, 1000)])
def test_fused_linear_ce_matches_logits_then_logsumexp(start, v_local, real, mode):
    """TP=1 (whole vocab with padding), and one TP=2 shard holding the padding rows / none of them;
    both the general path (any gradient on NLL and log Z, recomputed in backward) and the training
    path (a masked loss with z-loss whose gradients are computed in the forward)."""
    g = _gen(1)
    n, hidden, z = 203, 24, 0.3  # not a multiple of the chunk
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    full_w = torch.randn(1024, hidden, generator=g) * 0.3
    w = full_w[start : start + v_local].clone().requires_grad_(True)
    labels = torch.randint(0, real, (n,), generator=g)
    labels[:3] = torch.tensor([start, min(start + v_local, real) - 1, real - 1])
    mask = (torch.rand(n, generator=g) > 0.3).float()
    if mode == "loss":
        nll, lse, loss = fused_linear_cross_entropy(h, w, labels, start, real, chunk=64, loss_weight=mask, z_loss=z)
        assert not nll.requires_grad and not lse.requires_grad
    else:
        nll, lse = fused_linear_cross_entropy(h, w, labels, start, real, chunk=64)
        loss = (mask * (nll + z * lse.square())).sum()
    (2.5 * loss).backward()  # an upstream gradient other than 1 reaches both paths
    # the reference sees only this shard's columns, as one TP rank does before the TP reduction
    hr, wr = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    cols = torch.arange(start, start + v_local)
    logits = (hr @ wr.t()).masked_fill(cols >= real, float("-inf"))
    lse_r = torch.logsumexp(logits, -1)
    local = labels - start
    mine = (local >= 0) & (local < v_local)
    target = torch.where(mine, logits.gather(1, local.clamp(0, v_local - 1)[:, None])[:, 0], torch.zeros(()))
    nll_r = lse_r - target
    loss_r = (mask * (nll_r + z * lse_r.square())).sum()
    (2.5 * loss_r).backward()
    assert (loss - loss_r).abs() <= 2e-5 * max(1.0, loss_r.abs().item()), f"seed {SEED}"
    for got, want in ((nll, nll_r), (lse, lse_r), (h.grad, hr.grad), (w.grad, wr.grad)):
        assert (got - want).abs().max() <= 2e-5 * max(1.0, want.abs().max().item()), f"seed {SEED}"
    pad = cols >= real
    assert (w.grad[pad] == 0).all()  # padding rows never get probability mass


def test_fused_linear_ce_loss_without_grad_skips_the_gradient_work():
    """Evaluation runs under no_grad: the training path then returns the same numbers without a
    graph (so no gradient work is kept for a backward that cannot come)."""
    g = _gen(2)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(256, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 250, (50,), generator=g)
    ones = torch.ones(50)
    with torch.no_grad():
        a = fused_linear_cross_entropy(h, w, labels, 0, 250, chunk=32, loss_weight=ones, z_loss=1e-4)
    b = fused_linear_cross_entropy(h, w, labels, 0, 250, chunk=32, loss_weight=ones, z_loss=1e-4)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y.detach())
    assert not a[2].requires_grad and b[2].requires_grad


def test_tp2_parity_through_gloo():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "kernels.selfcheck",
            "--seed",
            str(SEED),
        ],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0 and len(rows) == 2 and all(x["ok"] for x in rows), (r.stdout, r.stderr[-2000:])


@pytest.mark.slow
def test_training_loss_with_kernels_equals_without(prepared, tmp_path):
    """Same init, same data: torch embedding + logits path at TP=1 vs both kernels at TP=2 with
    sequence parallelism (embedding reduce-scatter, gathered fused output layer)."""
    init = tmp_path / "init"
    run_train(init, prepared, 1, "--train.steps", "1", "--optim.lr", "0")
    ref = tmp_path / "ref"
    run_train(ref, prepared, 1, "--train.steps", "2", "--checkpoint.init_from", str(init))
    fused = tmp_path / "fused"
    run_train(
        fused,
        prepared,
        2,
        "--train.steps",
        "2",
        "--checkpoint.init_from",
        str(init),
        "--parallel.tp",
        "2",
        "--parallel.sequence_parallel",
        "true",
        "--model.embedding_impl",
        "triton",
        "--model.output_impl",
        "fused",
        "--model.ce_chunk_tokens",
        "200",
    )
    a, b = losses(ref), losses(fused)
    assert len(a) == len(b) == 2 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)


def test_bench_kernels_prints_ratios():
    # its own process: the benchmark starts a one-rank megatron session (CPU backend) for megatron's modules
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_soda.cli",
            "bench",
            "kernels",
            "--hidden",
            "32",
            "--tokens",
            "64",
            "--vocab",
            "512",
            "--reps",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "embedding  hidden 32, 64 tokens" in out and "megatron-core" in out and "fused is" in out
