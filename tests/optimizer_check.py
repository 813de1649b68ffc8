"""Two optimizer updates of the real Trainer (CPU backend, one process) against a plain reference of
the SODA recipe's update (Levanter's Cautious Adam with AdamC weight decay; no decay on the input
embedding, norm scales or biases). `python -m tests.optimizer_check [--optim.key value ...] [; ...]`
prints one JSON line per setting: the error against the reference, and against the reference with AdamC or the cautious
mask flipped (which must be large, or the check could not tell them apart)."""

from __future__ import annotations

import dataclasses
import json
import sys

import torch

from megatron_soda.checkpoints_tools.session import single_process
from megatron_soda.config import load_config
from megatron_soda.model.fast_paths import resolve_fast_paths
from megatron_soda.tokenization.vocab import SodaLayout
from megatron_soda.training.trainer import Trainer

TINY = "--model.hidden_size 32 --model.num_layers 2 --model.num_attention_heads 2 --model.num_query_groups 2 "
TINY += "--model.head_dim 16 --model.ffn_hidden_size 64 --model.vocab_size 300 --train.global_batch_size 1 "
TINY += "--train.steps 10 --optim.lr 0.01 --optim.weight_decay 0.5 --optim.warmup_fraction 0.5 --optim.clip_grad 0"


def reference_update(p, grads, lr, max_lr, o, decayed: bool):
    """One update per gradient in `grads`, as Levanter's optax chain computes them."""
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    wd = o.weight_decay * (lr / max_lr if o.adamc else 1.0) if decayed else 0.0
    for t, g in enumerate(grads, 1):
        m = o.beta1 * m + (1 - o.beta1) * g
        v = o.beta2 * v + (1 - o.beta2) * g * g
        u = (m / (1 - o.beta1**t)) / ((v / (1 - o.beta2**t)).sqrt() + o.eps)
        if o.cautious:
            mask = (u * g > 0).to(u.dtype)
            u = u * mask / (mask.mean() + o.eps)
        p = p - lr * (u + wd * p)
    return p


def check(argv: list[str]) -> dict:
    cfg = load_config(None, [*TINY.split(), "--train.device", "cpu", *argv])
    o = cfg.optim
    with single_process():
        trainer = Trainer(cfg, "cpu", resolve_fast_paths(cfg, cuda=False), SodaLayout(), dp=1)
        named = dict(trainer.chunks[0].module.named_parameters())
        gen = torch.Generator().manual_seed(0)
        # two different gradients: in places the second disagrees in sign with the first moment
        grads = {n: [torch.randn(p.shape, generator=gen) * 1e-3 for _ in range(2)] for n, p in named.items()}
        start = {n: p.detach().clone() for n, p in named.items()}
        trainer.scheduler.step(increment=2)  # inside the warmup: lr < max_lr, so AdamC's scaling shows
        lr = trainer.optimizer.param_groups[0]["lr"]
        for step in range(2):
            for n, p in named.items():
                p.main_grad.copy_(grads[n][step])
            trainer.optimizer.step()
        worst, flipped_err, decayed_names = 0.0, {"adamc": 0.0, "cautious": 0.0}, []
        for n, p in named.items():
            embedding = n.endswith("word_embeddings.weight")
            decayed = p.dim() > 1 and (not embedding or o.embedding_weight_decay)
            decayed_names += [n] if decayed else []
            want = reference_update(start[n], grads[n], lr, o.lr, o, decayed)
            scale = (want - start[n]).abs().max()
            worst = max(worst, ((p.detach() - want).abs().max() / scale).item())
            for key in flipped_err:
                flipped = dataclasses.replace(o, **{key: not getattr(o, key)})
                other = reference_update(start[n], grads[n], lr, o.lr, flipped, decayed)
                flipped_err[key] = max(flipped_err[key], ((p.detach() - other).abs().max() / scale).item())
        row = {"lr": lr, "max_rel_err": worst, "flipped_rel_err": flipped_err, "decayed": sorted(decayed_names)}
        return row | {"optimizer": type(trainer.optimizer.optimizer).__name__}


if __name__ == "__main__":
    for argv in " ".join(sys.argv[1:]).split(";"):  # several settings: `... --optim.cautious true ; ...`
        print(json.dumps({"args": argv.strip(), **check(argv.split())}))
