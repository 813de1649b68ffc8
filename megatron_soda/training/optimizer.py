"""The optimizer and LR schedule: megatron-core's mixed-precision (or distributed) Adam over the DDP
model chunks, and its parameter scheduler (WSD, cosine or constant)."""

from __future__ import annotations

import torch

from megatron_soda.config import ConfigError, SodaConfig


def build_optimizer(cfg: SodaConfig, chunks: list, dtype: torch.dtype, fused_adam: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, p = cfg.optim, cfg.parallel
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,  # bf16 model weights, fp32 main copies in the optimizer
        use_distributed_optimizer=p.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, chunks)
    if fused_adam:
        use_fused_adam(optimizer)
    return optimizer


def use_fused_adam(optimizer) -> int:
    """Switch megatron's torch AdamW fallback (foreach: ~10 kernels per parameter group chunk) to
    torch's fused AdamW (one kernel over all tensors). `fused` is a per-group hyperparameter that
    torch's AdamW reads at every step, so the optimizer and its state stay megatron's; this must
    run before the first step (fused AdamW keeps its step counts on the device). Returns the number
    of torch optimizers switched."""
    inner = []
    stack = [optimizer]
    while stack:
        o = stack.pop()
        if hasattr(o, "chained_optimizers"):
            stack.extend(o.chained_optimizers)
        elif isinstance(getattr(o, "optimizer", None), torch.optim.Optimizer):
            inner.append(o.optimizer)
    for opt in inner:
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            raise ConfigError(f"optim.adam_impl fused: megatron built a {type(opt).__name__}, not torch's Adam/AdamW")
        opt.defaults.update(fused=True, foreach=False)
        for group in opt.param_groups:
            group.update(fused=True, foreach=False)
    return len(inner)


def build_scheduler(cfg: SodaConfig, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, steps = cfg.optim, cfg.train.steps
    style = {"wsd": "WSD", "cosine": "cosine", "constant": "constant"}[o.schedule]
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=int(round(o.warmup_fraction * steps)),
        lr_decay_steps=steps,
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
        wsd_decay_steps=int(round(o.decay_fraction * steps)) if o.schedule == "wsd" else None,
        lr_wsd_decay_style="linear" if o.schedule == "wsd" else None,
    )
