"""Triton kernels against the torch reference, on CPU through Triton's interpreter (fp32).

Inputs are fresh random each run (the seed is in the failure message). Tolerances (fp32):
embedding forward/backward exact (a gather and a sum of the same numbers); NLL, log Z and
gradients 2e-5 absolute, relative to the largest value where that exceeds 1 (the fused path sums
the softmax chunk by chunk, in another order than the reference).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import pytest
import torch

import megatron_soda  # noqa: F401  (Triton interpreter on CPU)
from megatron_soda.kernels.blockwise_ce import blockwise_linear_cross_entropy
from megatron_soda.kernels.codec_embedding import fused_embedding
from megatron_soda.kernels.fused_ce import fused_linear_cross_entropy
from megatron_soda.kernels.grad_accum import wgrad_gemm_accum_fp32
from megatron_soda.kernels.multi_tensor import multi_tensor_l2norm, multi_tensor_scale
from megatron_soda.kernels.rmsnorm import rms_norm
from megatron_soda.kernels.rope import fused_apply_rotary_pos_emb
from tests.launch import ROOT, SMALL, env, run_train

SEED = int(time.time()) % 100_000


def _gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


class _Plant(torch.autograd.Function):
    """Identity, except for a 1% error in the value (`value`) or in the gradient (`grad`): a bug
    planted into one output of a kernel, to show its parity check would catch it."""

    @staticmethod
    def forward(ctx, x, value: float, grad: float):
        ctx.grad = grad
        return x * value

    @staticmethod
    def backward(ctx, g):
        return g * ctx.grad, None, None


def _out(plant: str | None, name: str, t: torch.Tensor) -> torch.Tensor:
    """A kernel's output `name`, with a planted error when `plant` names it."""
    return _Plant.apply(t, 1.01, 1.0) if plant == name else t


def _in(plant: str | None, name: str, t: torch.Tensor) -> torch.Tensor:
    """A kernel's input, whose gradient (`name`) gets a planted error when `plant` names it."""
    return _Plant.apply(t, 1.0, 1.01) if plant == name else t


def _close(got, want, atol: float, rel_to_max: bool = False) -> bool:
    tol = atol * max(1.0, want.abs().max().item()) if rel_to_max and want.numel() else atol
    return want.numel() == 0 or (got - want).abs().max().item() <= tol


def check_embedding(dtype=torch.int64, deterministic=False, plant: str | None = None) -> list[str]:
    """The outputs of the fused embedding (forward, d_table) that differ from torch's; [] = parity."""
    g = _gen()
    start, end, hidden = 300, 812, 40  # this rank's rows of a 1024-row (padded) table
    table = torch.randn(end - start, hidden, generator=g, requires_grad=True)
    ids = torch.randint(0, 1024, (3, 77), generator=g)
    ids[0, :6] = torch.tensor([start - 1, start, end - 1, end, 0, 1023])  # shard edges, padding row
    out = _out(
        plant, "forward", fused_embedding(ids.to(dtype), _in(plant, "d_table", table), start, end, deterministic)
    )
    mine = (ids >= start) & (ids < end)
    ref_table = table.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.embedding(torch.where(mine, ids - start, 0), ref_table) * mine[..., None]
    grad = torch.randn(ref.shape, generator=g)
    out.backward(grad)
    ref.backward(grad)
    bad = [] if torch.equal(out, ref) else ["forward"]
    return bad + ([] if _close(table.grad, ref_table.grad, 1e-6) else ["d_table"])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_embedding_matches_torch_on_a_vocab_shard(dtype, deterministic):
    assert check_embedding(dtype, deterministic) == [], f"seed {SEED}"


@contextlib.contextmanager
def _patched(module, **values):
    """Module constants set to `values` for the block (a kernel's launch sizes), then restored."""
    saved = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def _small_ce_tiles():
    """The blockwise kernel's interpreter launch as a GPU's, in miniature: 16-token by 128-row tiles
    (13 token blocks: the last group of GROUP_T token blocks is short), 3 vocabulary slices in the
    forward (unequal), the hidden dimension in two steps (the second partial); BLOCK_T / BLOCK_V
    are the GPU's tiles, which a filtered backward uses in the interpreter too."""
    from megatron_soda.kernels import blockwise_ce

    return _patched(
        blockwise_ce,
        INTERPRETER_BLOCK_T=16,
        INTERPRETER_BLOCK_V=128,
        INTERPRETER_LSE_SPLITS=3,
        INTERPRETER_BLOCK_K=16,
        BLOCK_T=16,
        BLOCK_V=128,
    )


def _linear_ce(impl: str, *args, **kw):
    """kernels/fused_ce.py (chunk 64) or kernels/blockwise_ce.py, the same arguments otherwise."""
    if impl == "blockwise":
        return blockwise_linear_cross_entropy(*args, **kw)
    return fused_linear_cross_entropy(*args, chunk=64, **kw)


def check_ce(
    start=0, v_local=1024, real=1000, mode="nll_lse", plant: str | None = None, impl="fused", small_blocks=False
) -> list[str]:
    """The outputs of the fused or blockwise linear + CE (nll, lse, loss, d_hidden, d_weight) that
    differ from logits -> logsumexp; [] = parity."""
    with _small_ce_tiles() if small_blocks else contextlib.nullcontext():
        return _check_ce(start, v_local, real, mode, plant, impl)


def _check_ce(start, v_local, real, mode, plant, impl) -> list[str]:
    g = _gen(1)
    n, hidden, z = 203, 24, 0.3  # not a multiple of the chunk
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    full_w = torch.randn(1024, hidden, generator=g) * 0.3
    w = full_w[start : start + v_local].clone().requires_grad_(True)
    labels = torch.randint(0, real, (n,), generator=g)
    labels[:3] = torch.tensor([start, min(start + v_local, real) - 1, real - 1])
    mask = (torch.rand(n, generator=g) > 0.3).float()
    hp, wp = _in(plant, "d_hidden", h), _in(plant, "d_weight", w)
    if mode == "loss":
        nll, lse, loss = _linear_ce(impl, hp, wp, labels, start, real, loss_weight=mask, z_loss=z)
        assert not nll.requires_grad and not lse.requires_grad
        nll, lse, loss = _out(plant, "nll", nll), _out(plant, "lse", lse), _out(plant, "loss", loss)
    else:
        nll, lse = _linear_ce(impl, hp, wp, labels, start, real)
        nll, lse = _out(plant, "nll", nll), _out(plant, "lse", lse)
        loss = _out(plant, "loss", (mask * (nll + z * lse.square())).sum())
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
    pairs = {"nll": (nll, nll_r), "lse": (lse, lse_r), "loss": (loss, loss_r)}
    pairs |= {"d_hidden": (h.grad, hr.grad), "d_weight": (w.grad, wr.grad)}
    bad = [k for k, (got, want) in pairs.items() if not _close(got.detach(), want.detach(), 2e-5, rel_to_max=True)]
    pad = cols >= real
    return bad + ([] if (w.grad[pad] == 0).all() else ["d_weight padding rows"])  # never any probability mass


@pytest.mark.parametrize("impl,small_blocks", [("fused", False), ("blockwise", True), ("blockwise", False)])
@pytest.mark.parametrize("mode", ["nll_lse", "loss"])
@pytest.mark.parametrize("start,v_local,real", [(0, 1024, 1000), (512, 512, 1000), (0, 512, 1000)])
def test_fused_linear_ce_matches_logits_then_logsumexp(start, v_local, real, mode, impl, small_blocks):
    """TP=1 (whole vocab with padding), and one TP=2 shard holding the padding rows / none of them;
    both the general path (any gradient on NLL and log Z) and the training path (a masked loss with
    z-loss); the chunked kernel (whose training path computes its gradients in the forward) and the
    blockwise one, with the interpreter's one large tile and with GPU-like small tiles."""
    assert check_ce(start, v_local, real, mode, impl=impl, small_blocks=small_blocks) == [], f"seed {SEED}"


def test_blockwise_gradient_filter_skips_only_tiles_below_its_threshold():
    """`filter_eps`: a tile whose softmax-minus-one-hot entries are all below it adds nothing (the
    vocabulary rows 128..255, pushed ~25 nats below the rest: probabilities ~1e-11), except where a
    token's label sits in it (token 0's: the one-hot keeps its tile, so its -1 is never dropped);
    every other tile's gradient is the exact one; the forward is untouched; a threshold above every
    entry leaves no gradient at all, and 0 is the exact kernel."""
    g = _gen(7)
    n, hidden = 90, 24
    h = torch.randn(n, hidden, generator=g)
    h[:, 0] = 1.0
    w = torch.randn(512, hidden, generator=g) * 0.3
    w[:, 0] = 0.0
    w[128:256, 0] = -25.0  # a far-from-likely tile
    labels = torch.randint(0, 128, (n,), generator=g)
    labels[:40] += 256
    labels[0] = 200  # token 0's label in the unlikely tile: tokens 0..15 (one 16-token block) keep it
    out = {}
    for eps in (0.0, 1e-6, 2.0):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with _small_ce_tiles():  # the tiles are cut at launch: forward and backward
            nll, lse, loss = blockwise_linear_cross_entropy(
                hh, ww, labels, 0, 500, loss_weight=torch.ones(n), filter_eps=eps
            )
            loss.backward()
        out[eps] = (nll, lse, hh.grad, ww.grad)
    exact, filtered, everything = out[0.0], out[1e-6], out[2.0]
    assert torch.equal(exact[0], filtered[0]) and torch.equal(exact[1], filtered[1]), "the forward does not filter"
    # the unlikely rows get only the kept block's share: tokens 0..15 (softmax minus one-hot) x hidden
    p = torch.softmax((h @ w.t())[:, :500], -1)
    d = p - torch.nn.functional.one_hot(labels, 500)
    kept_share = d[:16, 128:256].t() @ h[:16]
    assert (exact[3][128:256] - kept_share).abs().max() > 0, "the other blocks' share is there without filtering"
    assert torch.allclose(filtered[3][128:256], kept_share, rtol=1e-3, atol=1e-15), f"seed {SEED}"
    assert filtered[3][200].abs().max() > 0.1  # token 0's -1 reached its label's row
    rest = torch.ones(512, dtype=torch.bool)
    rest[128:256] = False
    assert _close(filtered[3][rest], exact[3][rest], 2e-5, rel_to_max=True), f"seed {SEED}"
    assert _close(filtered[2], exact[2], 1e-6, rel_to_max=True), f"seed {SEED}"  # the skipped tiles' share is ~1e-11
    assert (everything[2] == 0).all() and (everything[3] == 0).all()
    from megatron_soda.kernels import blockwise_ce as bw

    # what filtering drops depends on the tile: the interpreter filters with the GPU's tiles
    assert bw._blocks(h, filtered=True)[:2] == (bw.BLOCK_T, bw.BLOCK_V) != bw._blocks(h)[:2]


def _main_grad(w: torch.Tensor, fill: float = 0.25) -> torch.Tensor:
    """A weight as megatron's DDP leaves it: an fp32 main_grad buffer (here pre-filled, as after an
    earlier micro-batch) and the not-yet-added flag."""
    w.main_grad = torch.full(w.shape, fill)
    w.grad_added_to_main_grad = False
    return w


def test_kernels_add_their_weight_gradient_into_main_grad():
    """Gradient-accumulation fusion: the fused embedding and output layer add d(weight) (times the
    upstream gradient) to main_grad themselves, flag it for megatron's DDP hook, and the sum equals
    what the separate gradient would have added."""
    g = _gen(3)
    table = _main_grad(torch.randn(300, 24, generator=g).requires_grad_(True))
    ids = torch.randint(0, 300, (5, 40), generator=g)
    grad = torch.randn(5, 40, 24, generator=g)
    fused_embedding(ids, table, 0, 300, into_main_grad=True).backward(grad)
    ref = torch.zeros(300, 24).index_add_(0, ids.reshape(-1), grad.reshape(-1, 24))
    assert table.grad_added_to_main_grad and torch.allclose(table.main_grad, 0.25 + ref, atol=1e-6), f"seed {SEED}"

    h = torch.randn(70, 24, generator=g, requires_grad=True)
    w = _main_grad((torch.randn(256, 24, generator=g) * 0.3).requires_grad_(True))
    labels, mask = torch.randint(0, 250, (70,), generator=g), torch.ones(70)
    _, _, loss = fused_linear_cross_entropy(h, w, labels, 0, 250, chunk=32, loss_weight=mask, into_main_grad=True)
    (1.5 * loss).backward()
    wr = w.detach().clone().requires_grad_(True)
    _, _, loss_r = fused_linear_cross_entropy(h.detach(), wr, labels, 0, 250, chunk=32, loss_weight=mask)
    (1.5 * loss_r).backward()
    assert w.grad_added_to_main_grad
    assert (w.main_grad - 0.25 - wr.grad).abs().max() <= 2e-5 * max(1.0, wr.grad.abs().max().item()), f"seed {SEED}"

    wb = _main_grad(w.detach().clone().requires_grad_(True))  # the blockwise kernel: atomics straight into main_grad
    with _small_ce_tiles():
        _, _, loss_b = blockwise_linear_cross_entropy(
            h.detach(), wb, labels, 0, 250, loss_weight=mask, into_main_grad=True
        )
        (1.5 * loss_b).backward()
    assert wb.grad_added_to_main_grad
    assert (wb.main_grad - 0.25 - wr.grad).abs().max() <= 2e-5 * max(1.0, wr.grad.abs().max().item()), f"seed {SEED}"


def test_wgrad_gemm_and_multi_tensor_ops_match_megatron():
    """The apex-named functions megatron-core calls (kernels/grad_accum.py, kernels/multi_tensor.py)
    against the arithmetic they replace and megatron-core's own Python fallbacks."""
    from megatron.core.utils import local_multi_tensor_scale

    g = _gen(4)
    x, dy = torch.randn(3, 7, 16, generator=g), torch.randn(3, 7, 9, generator=g)
    main_grad = torch.randn(9, 16, generator=g)
    want = main_grad + dy.reshape(-1, 9).t() @ x.reshape(-1, 16)
    wgrad_gemm_accum_fp32(x.reshape(-1, 16), dy.reshape(-1, 9), main_grad)
    assert torch.allclose(main_grad, want, atol=1e-5)

    ts = [torch.randn(n, generator=g) for n in (3, 100, 17)]
    flag = torch.zeros(1, dtype=torch.int)
    ours, _ = multi_tensor_l2norm(0, flag, [ts], False)
    theirs = torch.norm(torch.stack([torch.norm(t) for t in ts]))  # megatron's fallback, minus its host round trip
    assert torch.allclose(ours, theirs.reshape(1), rtol=1e-6)
    a, b = [torch.empty_like(t) for t in ts], [torch.empty_like(t) for t in ts]
    multi_tensor_scale(0, flag, [ts, a], 0.3)
    local_multi_tensor_scale(0, flag, [ts, b], 0.3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = [t.clone() for t in ts]
    multi_tensor_scale(0, flag, [c, c], 0.5)  # in place, as clipping calls it
    assert all(torch.equal(x, t * 0.5) for x, t in zip(c, ts, strict=True))


def _small_norm_blocks():
    """The interpreter's RMSNorm launch as a GPU's, in miniature: 4-row blocks, 3 backward programs
    each visiting several blocks (the last one short), the d(weight) sum over several column blocks
    and steps of partial rows."""
    from megatron_soda.kernels import rmsnorm

    return _patched(rmsnorm, INTERPRETER_BLOCK_ELEMENTS=4 * 256, INTERPRETER_PROGRAMS=3, DW_BLOCK_P=2, DW_BLOCK_N=16)


def check_rmsnorm(shape=(37, 3, 48), plant: str | None = None, small_blocks: bool = False) -> list[str]:
    """The outputs of the Triton RMSNorm (forward, d_x, d_w) that differ from torch's; [] = parity."""
    g = _gen(5)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).requires_grad_(True)
    dy = torch.randn(*shape, generator=g)
    with _small_norm_blocks() if small_blocks else contextlib.nullcontext():
        y = _out(plant, "forward", rms_norm(_in(plant, "d_x", x), _in(plant, "d_w", w), 1e-5))
        y.backward(dy)
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    yr = torch.nn.functional.rms_norm(xr, (shape[-1],), wr, 1e-5)
    yr.backward(dy)
    pairs = {"forward": (y.detach(), yr.detach(), 2e-6), "d_x": (x.grad, xr.grad, 2e-6), "d_w": (w.grad, wr.grad, 2e-5)}
    return [k for k, (got, want, atol) in pairs.items() if not _close(got, want, atol)]


@pytest.mark.parametrize("small_blocks", [False, True])
@pytest.mark.parametrize("shape", [(37, 3, 48), (5, 2, 4, 16), (9, 2, 4, 64), (6, 1, 4, 128), (7, 3, 200), (0, 8)])
def test_rmsnorm_matches_torch(shape, small_blocks):
    """Hidden-state and per-head (QK-norm, head dim 64 and 128) shapes, a hidden size that is not a
    power of two, and no rows at all: output, d(input), d(weight); with the interpreter's one large
    block, and with GPU-like small blocks (several backward programs, each reducing several row
    blocks into its partial d(weight) row, summed over column blocks afterwards)."""
    assert check_rmsnorm(shape, small_blocks=small_blocks) == [], f"seed {SEED}"


def check_rope(plant: str | None = None) -> list[str]:
    """The outputs of the Triton RoPE (forward, d_q, and no gradient leaking into K/V) that differ
    from megatron-core's unfused path; [] = parity. The query is a view into the fused QKV
    projection (strided heads), as megatron hands it over."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    g = _gen(6)
    qkv = torch.randn(11, 2, 3, 3 * 16, generator=g, requires_grad=True)
    q = qkv[..., 16:32]
    half = torch.rand(11, 1, 1, 8, generator=g) * 11
    freqs = torch.cat([half, half], -1)
    dy = torch.randn(11, 2, 3, 16, generator=g)
    out = _out(plant, "forward", fused_apply_rotary_pos_emb(_in(plant, "d_q", q), freqs))
    out.backward(dy)
    qr = q.detach().clone().requires_grad_(True)
    ref = _apply_rotary_pos_emb_bshd(qr, freqs)
    ref.backward(dy)
    bad = [k for k, (a, b) in {"forward": (out, ref), "d_q": (qkv.grad[..., 16:32], qr.grad)}.items()
           if not _close(a.detach(), b.detach(), 1e-6)]  # fmt: skip
    return bad + ([] if qkv.grad[..., :16].abs().max() == 0 and qkv.grad[..., 32:].abs().max() == 0 else ["d_kv"])


def test_rope_matches_megatron_unfused_on_a_strided_view():
    assert check_rope() == [], f"seed {SEED}"


CHECKS = {
    "embedding": check_embedding,
    "fused_ce": check_ce,
    "blockwise_ce": lambda plant, mode="nll_lse": check_ce(mode=mode, plant=plant, impl="blockwise"),
    "rmsnorm": check_rmsnorm,
    "rope": check_rope,
}
PLANTED = [
    ("embedding", "forward"),
    ("embedding", "d_table"),
    *[(ce, out) for ce in ("fused_ce", "blockwise_ce") for out in ("nll", "lse", "loss", "d_hidden", "d_weight")],
    ("rmsnorm", "forward"),
    ("rmsnorm", "d_x"),
    ("rmsnorm", "d_w"),
    ("rope", "forward"),
    ("rope", "d_q"),
]


@pytest.mark.parametrize("kernel,output", PLANTED)
def test_a_bug_planted_in_any_output_of_a_kernel_fails_its_parity_check(kernel, output):
    """Every output of every kernel (forward values and each gradient) is compared by its parity
    check: a 1% error planted in that one output makes the check name it."""
    assert output in CHECKS[kernel](plant=output), (kernel, output)
    if kernel.endswith("_ce"):  # the training path (a masked loss with z-loss) too
        assert output in CHECKS[kernel](plant=output, mode="loss"), (kernel, output, "loss mode")
    if kernel == "rmsnorm":  # the multi-program backward (partial d(weight) rows) and the QK-norm shape too
        assert output in check_rmsnorm((9, 2, 4, 64), plant=output, small_blocks=True), (kernel, output, "small blocks")


def test_kernels_compile_for_hopper_without_a_gpu():
    """Triton's interpreter accepts what its compiler refuses (a GPU session lost a run to a Python
    global in a kernel): every kernel is compiled for sm_90 here, no GPU needed."""
    r = subprocess.run(
        [sys.executable, "-m", "tests.triton_compile"],
        capture_output=True,
        text=True,
        env=dict(env(), TRITON_INTERPRET="0"),
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0 and "FAILED" not in r.stdout, r.stdout + r.stderr[-2000:]


@pytest.mark.parametrize("impl", ["fused", "blockwise"])
def test_fused_linear_ce_loss_without_grad_skips_the_gradient_work(impl):
    """Evaluation runs under no_grad: the training path then returns the same numbers without a
    graph (so no gradient work is kept for a backward that cannot come)."""
    g = _gen(2)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(256, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 250, (50,), generator=g)
    ones = torch.ones(50)
    with torch.no_grad():
        a = _linear_ce(impl, h, w, labels, 0, 250, loss_weight=ones, z_loss=1e-4)
    b = _linear_ce(impl, h, w, labels, 0, 250, loss_weight=ones, z_loss=1e-4)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y.detach())
    assert not a[2].requires_grad and b[2].requires_grad


# fp32, TP=2 on gloo: exact where the kernel gathers or sums the same numbers, else ~1e-6 observed
SELFCHECK_FP32_LIMITS = {
    "embedding_fwd": 0.0,
    "embedding_bwd": 2e-5,
    "embedding_main_grad": 2e-5,
    "ce_nll": 2e-5,
    "ce_lse": 2e-5,
    "ce_grad_hidden": 2e-5,
    "ce_grad_weight": 2e-5,
    "ce_loss_rel": 2e-5,
    "ce_loss_grad_hidden": 2e-5,
    "ce_loss_grad_weight": 2e-5,
    "ce_main_grad": 6e-5,
    "padding_rows_grad": 0.0,
    # the blockwise kernel (fp32 atomics in another order than the reference's sums)
    "bw_nll": 2e-5,
    "bw_lse": 2e-5,
    "bw_loss_rel": 2e-5,
    "bw_grad_hidden": 6e-5,
    "bw_main_grad": 6e-5,
    "bw_padding_rows": 0.0,
    "main_grad_flagged": True,
    "wgrad_accum": 1e-6,
    **{
        f"{norm}_{out}": 2e-5
        for norm in ("rmsnorm", "rmsnorm_rows", "qk_norm", "qk_norm128")
        for out in ("fwd", "dx", "dw")
    },
    # FP8 linears split over TP (SP column, row) vs unsharded: the same quantisation grid, ~3e-7 observed
    **{f"fp8_{kind}_{out}": 2e-6 for kind in ("col", "row") for out in ("fwd", "dx", "dw")},
    "fp8_gemm": 2e-6,  # torch's CPU _scaled_mm vs the fp32 emulation
    "rope_fwd": 2e-5,
    "rope_bwd": 2e-5,
    "l2norm_rel": 1e-6,
    "scale": 0.0,
}


@pytest.mark.slow
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
            "megatron_soda.kernels.selfcheck",
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
    assert len(rows) == 2, (r.stdout, r.stderr[-2000:])
    for row in rows:  # every measured difference against a limit held here, not the check's own verdict
        measured = {k: v for k, v in row.items() if k not in ("rank", "tp", "seed", "dtype", "ok", "wgrad_path")}
        assert set(measured) == set(SELFCHECK_FP32_LIMITS), sorted(set(measured) ^ set(SELFCHECK_FP32_LIMITS))
        over = {k: v for k, v in measured.items() if not v <= SELFCHECK_FP32_LIMITS[k]}
        assert not over and row["main_grad_flagged"] is True, (over, row)
    assert r.returncode == 0 and all(x["ok"] for x in rows), r.stderr[-2000:]


LEVERS = (  # every speed switch the CPU backend can run (CUDA graphs need a GPU)
    "--model.norm_impl",
    "triton",
    "--model.rope_impl",
    "triton",
    "--model.wgrad_impl",
    "main_grad",
    "--optim.adam_impl",
    "fused",
)


@pytest.mark.slow
def test_training_loss_with_kernels_and_levers_equals_without(small_shards, tmp_path):
    """Same init, same data: the torch paths at TP=1 vs every kernel and lever at TP=2 with sequence
    parallelism (embedding reduce-scatter, gathered output layer, the norms' weight gradients
    reduced over TP, weight gradients accumulated into main_grad, fused AdamW), with each output
    kernel (chunked fused; blockwise, its atomics adding into megatron's main_grad): the same loss,
    gradient norm and weight norm at every step. At TP=1 the kernels have their parity tests above,
    and the fused AdamW + main_grad path trains in tests/test_train.py."""
    from tests.test_train import _curves, assert_same_curves

    ref = tmp_path / "ref"  # the initial weights do not depend on the layout (model.init layout_invariant)
    run_train(ref, small_shards, 1, *SMALL, "--train.steps", "2")
    sp = ("--parallel.tp", "2", "--parallel.sequence_parallel", "true")
    for output in ("fused", "blockwise"):
        kernels = ("--model.embedding_impl", "triton", "--model.output_impl", output, "--model.ce_chunk_tokens", "200")
        tp2 = tmp_path / f"tp2-{output}"
        run_train(tp2, small_shards, 2, *SMALL, "--train.steps", "2", *sp, *kernels, *LEVERS)
        assert_same_curves(_curves(tp2), _curves(ref), f"kernels ({output} output) and levers at TP=2 + SP")
        fast_paths = (tp2 / "fast_paths.yaml").read_text()
        assert "norm: triton" in fast_paths and f"output: {output}" in fast_paths


def test_bench_kernels_prints_ratios_and_runs_the_fair_race(tmp_path):
    """Every op of `soda bench kernels` on a small shape; the fair CE race's rows: ours, torch and
    megatron-core timed on the same inputs (the same loss), the GPU peers skipped with a note, the
    inputs' entropy per token type the one asked for."""
    from megatron_soda.tools.bench.kernels import RACE_TARGETS

    out = tmp_path / "kernels.json"
    # its own process: the benchmark starts a one-rank megatron session (CPU backend) for megatron's modules
    r = subprocess.run(
        [sys.executable, "-m", "megatron_soda.cli", "bench", "kernels", "--hidden", "32", "--tokens", "64"]
        + ["--vocab", "17000", "--reps", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout
    assert "embedding  hidden 32, 64 tokens" in text and "megatron-core" in text and "fused is" in text
    assert "fair CE race  hidden 32, 64 tokens" in text and "cut-cross-entropy: skipped" in text
    rows = json.loads(out.read_text())
    (race,) = [row for row in rows if "ce_race" in row]
    assert [x["impl"] for x in race["ce_race"]] == ["fused", "blockwise", "blockwise+filter", "torch", "megatron-core"]
    assert {"liger-kernel", "cut-cross-entropy", "cut-cross-entropy-exact"} <= set(race["race"]["skipped"])
    nll = race["race"]["mean_nll"]
    assert max(nll.values()) - min(nll.values()) < 1e-4, nll
    assert set(race["race"]["inputs"]) == set(RACE_TARGETS)
    for name, row in race["race"]["inputs"].items():
        assert abs(row["entropy"] - RACE_TARGETS[name][1]) < 0.01, (name, row)
    assert {"rmsnorm", "qk_norm", "rope", "cross_entropy", "embedding"} <= {k for row in rows for k in row}


@pytest.mark.slow
def test_fair_race_inputs_have_a_trained_models_entropy_per_token_type():
    """Measured here from the inputs themselves: the mean entropy of each token type's softmax is its
    target, the labels' mean NLL matches it (labels drawn from those softmaxes), and a token's mass
    sits in its own type's id range (text ids or its codebook's), as a trained model's does."""
    from megatron_soda.tools.bench.kernels import RACE_TARGETS, _id_types, race_inputs, race_layout

    inp = race_inputs(1024, 32, 17000, "cpu", torch.float32, seed=SEED)
    logp = torch.log_softmax(inp["hidden"] @ inp["weight"].t(), -1)
    entropy = -(logp.exp() * logp).sum(-1)
    nll = -logp.gather(1, inp["labels"][:, None])[:, 0]
    own = _id_types(race_layout(17000))[None, :] == inp["types"][:, None]
    mass = (logp.exp() * own).sum(-1)
    targets = torch.tensor([t for _, t in RACE_TARGETS.values()])[inp["types"]]
    for k, (name, (share, target)) in enumerate(RACE_TARGETS.items()):
        mine = inp["types"] == k
        assert abs(mine.float().mean().item() - share) < 0.01, name
        assert abs(entropy[mine].mean().item() - target) < 0.01, (name, entropy[mine].mean().item())
    assert abs(nll.mean().item() - targets.mean().item()) < 0.3, (nll.mean().item(), targets.mean().item())
    assert mass.min().item() > 0.95, mass.min().item()
