"""Parity of the fused kernels at TP = world size, against the unsharded torch reference.

Run it under torchrun (CPU: gloo, Triton's interpreter; GPU: NCCL, compiled kernels):
    torchrun --nproc-per-node 2 -m kernels.selfcheck [--seed N] [--bf16]
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
from kernels.codec_embedding import fused_embedding
from kernels.fused_ce import fused_linear_cross_entropy

TOL_FP32 = {"embedding": 0.0, "nll": 2e-5, "grad": 2e-5}
TOL_BF16 = {"embedding": 0.0, "nll": 5e-2, "grad": 5e-2}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo")
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
    ok = (
        out["embedding_fwd"] <= tol["embedding"] + (1e-6 if a.bf16 else 0)
        and out["embedding_bwd"] <= tol["grad"]
        and max(out["ce_nll"], out["ce_lse"]) <= tol["nll"]
        and max(out["ce_grad_hidden"], out["ce_grad_weight"]) <= tol["grad"]
        and out["ce_loss_rel"] <= tol["nll"]
        and max(out["ce_loss_grad_hidden"], out["ce_loss_grad_weight"]) <= tol["grad"]
        and out["padding_rows_grad"] == 0.0
    )
    out["ok"] = ok
    sys.stdout.write(json.dumps(out) + "\n")  # one write (< PIPE_BUF): the ranks share the pipe
    sys.stdout.flush()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
