"""Parity of the fused kernels at TP = world size, against the unsharded torch reference.

Run it under torchrun (CPU: gloo, Triton's interpreter; GPU: NCCL, compiled kernels):
    torchrun --nproc-per-node 2 -m megatron_soda.kernels.selfcheck [--seed N] [--bf16]
Ids include shard boundaries and padding rows; every rank checks its own shard and the reduced
result. Prints one JSON line per rank; exits non-zero when a tolerance is exceeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

import megatron_soda  # noqa: F401  (Triton interpreter switch before Triton is imported)
from megatron_soda.kernels import fp8
from megatron_soda.kernels.blockwise_ce import blockwise_linear_cross_entropy
from megatron_soda.kernels.codec_embedding import fused_embedding
from megatron_soda.kernels.fused_ce import fused_linear_cross_entropy
from megatron_soda.kernels.grad_accum import add_wgrad_, wgrad_path
from megatron_soda.kernels.multi_tensor import multi_tensor_l2norm, multi_tensor_scale
from megatron_soda.kernels.rmsnorm import rms_norm
from megatron_soda.kernels.rope import fused_apply_rotary_pos_emb
from megatron_soda.parallel.setup import init_distributed

TOL_FP32 = {"embedding": 0.0, "nll": 2e-5, "grad": 2e-5, "fp8": 2e-5}
TOL_BF16 = {"embedding": 0.0, "nll": 5e-2, "grad": 5e-2, "fp8": 2e-2}  # fp8: relative to the largest value


NORMS = ("rmsnorm", "rmsnorm_rows", "qk_norm", "qk_norm128")
FP8_KEYS = ("fp8_col_fwd", "fp8_col_dx", "fp8_col_dw", "fp8_row_fwd", "fp8_row_dx", "fp8_row_dw", "fp8_gemm")


def _main_grad(w: torch.Tensor, fill: float) -> torch.Tensor:
    """A weight as megatron's DDP leaves it: an fp32 main_grad (pre-filled) and the not-added flag."""
    w.main_grad = torch.full(w.shape, fill, dtype=torch.float32, device=w.device)
    w.grad_added_to_main_grad = False
    return w


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30))


def _fp8_tp(g: torch.Generator, dev: str, dtype: torch.dtype, rank: int, tp: int) -> dict:
    """Largest errors (relative to the largest reference value) of this rank's FP8 linear shards."""
    s, b, k, n = 16 * tp, 2, 64, 32 * tp
    x = torch.randn(s, b, k, generator=g).to(dtype).to(dev)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(dev)
    dy = (torch.randn(s, b, n, generator=g) * 1e-2).to(dtype).to(dev)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    yr = fp8.fp8_linear(xr, wr)  # the unsharded reference, on this device's GEMM
    yr.backward(dy)
    res = {}
    group = dist.group.WORLD
    rows, cols = slice(rank * s // tp, (rank + 1) * s // tp), slice(rank * n // tp, (rank + 1) * n // tp)
    xc, wc = x[rows].clone().requires_grad_(True), w[cols].clone().requires_grad_(True)
    yc = fp8.fp8_linear(xc, wc, parallel="column", group=group, sequence_parallel=True)
    yc.backward(dy[:, :, cols])
    res["fp8_col_fwd"] = _rel(yc, yr.detach()[:, :, cols])
    res["fp8_col_dx"] = _rel(xc.grad, xr.grad[rows])
    res["fp8_col_dw"] = _rel(wc.grad, wr.grad[cols])
    feats = slice(rank * k // tp, (rank + 1) * k // tp)
    xs, ws = x[:, :, feats].clone().requires_grad_(True), w[:, feats].clone().requires_grad_(True)
    part = fp8.fp8_linear(xs, ws, parallel="row", group=group)
    total = part.detach().float().clone()
    dist.all_reduce(total)
    part.backward(dy)
    res["fp8_row_fwd"] = _rel(total, yr.detach())
    res["fp8_row_dx"] = _rel(xs.grad, xr.grad[:, :, feats])
    res["fp8_row_dw"] = _rel(ws.grad, wr.grad[:, feats])
    pair = []
    for emulate in (True, False):  # the fp32 products of the dequantised operands; torch._scaled_mm here
        xe, we = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        ye = fp8.fp8_linear(xe, we, emulate=emulate)
        ye.backward(dy)
        pair.append((ye.detach(), xe.grad, we.grad))
    res["fp8_gemm"] = max(_rel(a, b) for a, b in zip(*pair, strict=True))
    return res


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    init_distributed("cuda" if cuda else "cpu")  # the process group as every training run sets it up
    dev = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu"
    rank, tp = dist.get_rank(), dist.get_world_size()
    seed = a.seed if a.seed is not None else int(time.time()) % 100000
    t = torch.tensor([seed], device=dev)
    dist.broadcast(t, 0)
    seed = int(t.item())
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch.bfloat16 if a.bf16 else torch.float32
    tol = TOL_BF16 if a.bf16 else TOL_FP32
    real, padded, hidden, n = 1000, 1024, 48, 300  # 24 padding rows, as the model pads to 1024 (TP 1..8)
    per = padded // tp
    start = rank * per
    out = {"rank": rank, "tp": tp, "seed": seed, "dtype": str(dtype)}

    # 1. embedding: partial lookups summed over TP == the full table's lookup; grads of the shard
    table = (torch.randn(padded, hidden, generator=g) * 0.02).to(dtype).to(dev)
    ids = torch.randint(0, real, (n,), generator=g)
    ids[:6] = torch.tensor([0, per - 1, min(per, real - 1), real - 2, real - 1, padded - 1])  # boundaries, padding
    ids = ids.to(dev)
    shard = table[start : start + per].clone().requires_grad_(True)
    part = fused_embedding(ids.to(torch.int32), shard, start, start + per)
    grad_out = torch.randn(n, hidden, generator=g).to(dtype).to(dev)
    part.backward(grad_out)
    total = part.detach().float().clone()
    dist.all_reduce(total)
    ref_table = table.float().clone().requires_grad_(True)
    ref = torch.nn.functional.embedding(ids, ref_table)
    ref.backward(grad_out.float())
    out["embedding_fwd"] = float((total - ref.detach()).abs().max())
    out["embedding_bwd"] = float((shard.grad.float() - ref_table.grad[start : start + per]).abs().max())

    # 2. fused linear + CE: per-token NLL / log Z and grads against logits -> logsumexp
    h = (torch.randn(n, hidden, generator=g)).to(dtype).to(dev)
    w = (torch.randn(padded, hidden, generator=g) * 0.3).to(dtype).to(dev)
    labels = torch.randint(0, real, (n,), generator=g)
    labels[:3] = torch.tensor([min(per - 1, real - 1), min(per, real - 1), real - 1])  # shard edges, last real id
    labels = labels.to(dev)
    hl, wl = h.clone().requires_grad_(True), w[start : start + per].clone().requires_grad_(True)
    nll, lse = fused_linear_cross_entropy(hl, wl, labels, start, real, chunk=128, group=dist.group.WORLD)
    (nll.float().sum() + 1e-2 * lse.float().square().sum()).backward()
    hr, wr = h.float().clone().requires_grad_(True), w.float().clone().requires_grad_(True)
    logits = (hr @ wr.t()).masked_fill(torch.arange(padded, device=dev) >= real, float("-inf"))
    lse_r = torch.logsumexp(logits, -1)
    nll_r = lse_r - logits.gather(1, labels[:, None])[:, 0]
    (nll_r.sum() + 1e-2 * lse_r.square().sum()).backward(retain_graph=True)
    out["ce_nll"] = float((nll.detach().float() - nll_r.detach()).abs().max())
    out["ce_lse"] = float((lse.detach().float() - lse_r.detach()).abs().max())
    out["ce_grad_hidden"] = float((hl.grad.float() - hr.grad).abs().max())
    out["ce_grad_weight"] = float((wl.grad.float() - wr.grad[start : start + per]).abs().max())
    out["padding_rows_grad"] = float(wl.grad[max(0, real - start) :].abs().max()) if real - start < per else 0.0

    # 3. the training path: masked loss + z-loss, gradients computed in the forward
    mask = (torch.rand(n, generator=g) > 0.25).float().to(dev)
    hl2, wl2 = h.clone().requires_grad_(True), w[start : start + per].clone().requires_grad_(True)
    _, _, loss = fused_linear_cross_entropy(
        hl2, wl2, labels, start, real, chunk=128, group=dist.group.WORLD, loss_weight=mask, z_loss=1e-2
    )
    loss.backward()
    hr.grad, wr.grad = None, None
    loss_r = (mask * (nll_r + 1e-2 * lse_r.square())).sum()
    loss_r.backward()
    out["ce_loss_rel"] = float((loss.detach() - loss_r.detach()).abs() / loss_r.detach().abs())
    out["ce_loss_grad_hidden"] = float((hl2.grad.float() - hr.grad).abs().max())
    out["ce_loss_grad_weight"] = float((wl2.grad.float() - wr.grad[start : start + per]).abs().max())

    # 4. gradient-accumulation fusion: the embedding's and the output layer's weight gradients added
    # to an fp32 main_grad (as megatron's DDP gives every weight) equal the separate gradients
    wl3 = _main_grad(w[start : start + per].clone().requires_grad_(True), 0.5)
    _, _, loss3 = fused_linear_cross_entropy(
        h,
        wl3,
        labels,
        start,
        real,
        chunk=128,
        group=dist.group.WORLD,
        loss_weight=mask,
        z_loss=1e-2,
        into_main_grad=True,
    )
    (3.0 * loss3).backward()
    out["ce_main_grad"] = float((wl3.main_grad - 0.5 - 3.0 * wr.grad[start : start + per]).abs().max())
    shard2 = _main_grad(table[start : start + per].clone().requires_grad_(True), 0.0)
    fused_embedding(ids, shard2, start, start + per, into_main_grad=True).backward(grad_out)
    out["embedding_main_grad"] = float((shard2.main_grad - ref_table.grad[start : start + per]).abs().max())
    # the blockwise kernel (kernels/blockwise_ce.py): the training loss, d(hidden) reduced over TP,
    # d(weight) added by atomics straight into main_grad
    hl4 = h.clone().requires_grad_(True)
    wl4 = _main_grad(w[start : start + per].clone().requires_grad_(True), 0.5)
    nll4, lse4, loss4 = blockwise_linear_cross_entropy(
        hl4, wl4, labels, start, real, group=dist.group.WORLD, loss_weight=mask, z_loss=1e-2, into_main_grad=True
    )
    (3.0 * loss4).backward()
    out["bw_nll"] = float((nll4.float() - nll_r.detach()).abs().max())
    out["bw_lse"] = float((lse4.float() - lse_r.detach()).abs().max())
    out["bw_loss_rel"] = float((loss4.detach() - loss_r.detach()).abs() / loss_r.detach().abs())
    out["bw_grad_hidden"] = float((hl4.grad.float() - 3.0 * hr.grad).abs().max())
    out["bw_main_grad"] = float((wl4.main_grad - 0.5 - 3.0 * wr.grad[start : start + per]).abs().max())
    out["bw_padding_rows"] = (
        float(wl4.main_grad[max(0, real - start) :].sub(0.5).abs().max()) if real - start < per else 0.0
    )
    flagged = shard2.grad_added_to_main_grad and wl3.grad_added_to_main_grad and wl4.grad_added_to_main_grad
    out["main_grad_flagged"] = bool(flagged)
    acc = torch.randn(64, 32, generator=g).to(dev)
    a_, b_ = torch.randn(64, 200, generator=g).to(dtype).to(dev), torch.randn(200, 32, generator=g).to(dtype).to(dev)
    want = acc + a_.float() @ b_.float()
    add_wgrad_(acc, a_, b_)
    out["wgrad_accum"] = float((acc - want).abs().max() / want.abs().max())
    out["wgrad_path"] = wgrad_path(torch.device(dev).type, dtype) or "same dtype (addmm_)"

    # 5. RMSNorm (hidden and per-head shapes; enough rows that each backward program of a GPU reduces
    # several row blocks into its partial d(weight)) and RoPE (on a strided view, as megatron's q/k are)
    norms = (("rmsnorm", (33, 2, 96)), ("rmsnorm_rows", (2176, 4, 512)), ("qk_norm", (17, 2, 4, 64)))
    for name, shape in (*norms, ("qk_norm128", (9, 2, 4, 128))):
        x = torch.randn(*shape, generator=g).to(dtype).to(dev).requires_grad_(True)
        wn = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).to(dev).requires_grad_(True)
        gy = torch.randn(*shape, generator=g).to(dtype).to(dev)
        y = rms_norm(x, wn, 1e-5)
        y.backward(gy)
        xr, wr_ = x.detach().float().requires_grad_(True), wn.detach().float().requires_grad_(True)
        yr = torch.nn.functional.rms_norm(xr, (shape[-1],), wr_, 1e-5)
        yr.backward(gy.float())
        out[f"{name}_fwd"] = float((y.detach().float() - yr.detach()).abs().max())
        out[f"{name}_dx"] = float((x.grad.float() - xr.grad).abs().max())
        out[f"{name}_dw"] = float((wn.grad.float() - wr_.grad).abs().max() / max(1.0, wr_.grad.abs().max().item()))
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    qkv = torch.randn(19, 2, 4, 3 * 64, generator=g).to(dtype).to(dev).requires_grad_(True)
    q = qkv[..., 64:128]
    half = torch.rand(19, 1, 1, 32, generator=g).to(dev) * 19
    freqs = torch.cat([half, half], -1)
    gy = torch.randn(19, 2, 4, 64, generator=g).to(dtype).to(dev)
    fused_apply_rotary_pos_emb(q, freqs).backward(gy)
    qr = q.detach().float().requires_grad_(True)
    _apply_rotary_pos_emb_bshd(qr, freqs).backward(gy.float())
    out["rope_fwd"] = float(
        (fused_apply_rotary_pos_emb(q, freqs).float() - _apply_rotary_pos_emb_bshd(qr, freqs)).abs().max()
    )
    out["rope_bwd"] = float((qkv.grad[..., 64:128].float() - qr.grad).abs().max())

    # 6. FP8 linears (model.fp8 tensorwise) split over TP as megatron's are: column-parallel with
    # sequence parallelism (input gathered, d(input) reduce-scattered) and row-parallel (outputs
    # summed), the amax of split operands reduced over TP: equal to the unsharded FP8 linear. Then
    # this device's GEMM (torch._scaled_mm: cuBLAS on a GPU) against the fp32 emulation.
    out.update(_fp8_tp(g, dev, dtype, rank, tp))

    # 7. multi-tensor norm / scale (grad clipping): equal megatron's per-tensor fallback
    ts = [torch.randn(n_, generator=g).to(dev) for n_ in (5, 300, 77)]
    flag = torch.zeros(1, dtype=torch.int, device=dev)
    norm, _ = multi_tensor_l2norm(0, flag, [ts], False)
    ref_norm = torch.norm(torch.stack([torch.norm(t) for t in ts]))
    out["l2norm_rel"] = float((norm[0] - ref_norm).abs() / ref_norm)
    copies = [torch.empty_like(t, dtype=dtype) for t in ts]
    multi_tensor_scale(0, flag, [ts, copies], 0.5)
    out["scale"] = float(
        max((c.float() - (t * 0.5).to(dtype).float()).abs().max() for c, t in zip(copies, ts, strict=True))
    )
    ok = (
        out["embedding_fwd"] <= tol["embedding"] + (1e-6 if a.bf16 else 0)
        and out["embedding_bwd"] <= tol["grad"]
        and max(out["ce_nll"], out["ce_lse"]) <= tol["nll"]
        and max(out["ce_grad_hidden"], out["ce_grad_weight"]) <= tol["grad"]
        and out["ce_loss_rel"] <= tol["nll"]
        and max(out["ce_loss_grad_hidden"], out["ce_loss_grad_weight"]) <= tol["grad"]
        and out["padding_rows_grad"] == 0.0
        and flagged
        and out["ce_main_grad"] <= 3 * tol["grad"]
        and max(out["bw_nll"], out["bw_lse"], out["bw_loss_rel"]) <= tol["nll"]
        and max(out["bw_grad_hidden"], out["bw_main_grad"]) <= 3 * tol["grad"]
        and out["bw_padding_rows"] == 0.0
        and out["embedding_main_grad"] <= tol["grad"]
        and out["wgrad_accum"] <= (1e-2 if a.bf16 else 1e-6)
        and max(out[f"{k}_fwd"] for k in NORMS) <= tol["nll"]
        and max(max(out[f"{k}_dx"], out[f"{k}_dw"]) for k in NORMS) <= tol["grad"]
        and max(out[k] for k in FP8_KEYS) <= tol["fp8"]
        and max(out["rope_fwd"], out["rope_bwd"]) <= tol["nll"]
        and out["l2norm_rel"] <= 1e-6
        and out["scale"] == 0.0
    )
    out["ok"] = ok
    sys.stdout.write(json.dumps(out) + "\n")  # one write (< PIPE_BUF): the ranks share the pipe
    sys.stdout.flush()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
