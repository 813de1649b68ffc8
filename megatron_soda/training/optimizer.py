"""The optimizer and LR schedule: megatron-core's mixed-precision (or distributed) Adam over the DDP
model chunks, and its parameter scheduler (WSD, cosine or constant), with the SODA recipe's three
details (Levanter's Cautious optimizer with AdamC weight decay, as the paper's runs used):
- no weight decay on the input embedding (norm scales and biases are not decayed either; the untied
  LM head is);
- AdamC: the decay coefficient follows lr / max_lr through the schedule, so the decay per step
  (lr x wd) falls with the square of the schedule (Defazio 2025);
- optionally the cautious mask: update entries whose sign disagrees with the gradient are zeroed and
  the rest rescaled by the mask's mean over the tensor.
"""

from __future__ import annotations

import inspect

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
    optimizer = get_megatron_optimizer(opt_cfg, chunks, config_overrides=param_group_overrides(cfg, opt_cfg))
    if fused_adam:
        use_fused_adam(optimizer)
    if o.cautious:
        use_cautious_adam(optimizer)
    return optimizer


def param_group_overrides(cfg: SodaConfig, opt_cfg) -> dict:
    """megatron's standard groups (no decay for norm scales and biases), plus no decay for the input
    embedding unless optim.embedding_weight_decay (with tied embeddings that is the output layer too)."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    overrides = get_standard_config_overrides(opt_cfg)
    if not cfg.optim.embedding_weight_decay:
        embedding = ParamWithNamePredicate(
            name="input_embedding",
            fn=lambda p, name: name.endswith("word_embeddings.weight") or getattr(p, "shared_embedding", False),
        )
        overrides[ParamKey(with_name_predicate=embedding)] = {"wd_mult": 0.0}
    return overrides


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron's wrappers, with the wrapper that owns each."""
    found, stack = [], [optimizer]
    while stack:
        o = stack.pop()
        if hasattr(o, "chained_optimizers"):
            stack.extend(o.chained_optimizers)
        elif isinstance(getattr(o, "optimizer", None), torch.optim.Optimizer):
            found.append(o)
    return found


class CautiousAdamW(torch.optim.AdamW):
    """AdamW whose update keeps only the entries that agree in sign with the gradient, rescaled by
    the kept fraction (Levanter's `scale_by_cautious`: u * m / (mean(m) + eps)); decoupled weight
    decay is applied unmasked, as there. Same state as torch's AdamW (step, exp_avg, exp_avg_sq), so
    megatron's checkpoints of it are AdamW's."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                state["exp_avg"].lerp_(g, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = state["exp_avg"] / (1 - b1**t)
                u = m_hat / ((state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(eps))
                mask = (u * g > 0).to(u.dtype)
                u.mul_(mask).div_(mask.mean() + eps)
                p.add_(u.add_(p, alpha=wd), alpha=-lr)
        return None


def use_cautious_adam(optimizer) -> int:
    """Swap megatron's torch AdamW (built, no step taken yet) for CautiousAdamW over the same
    parameter groups; returns how many were swapped."""
    owners = _torch_optimizers(optimizer)
    for owner in owners:
        inner = owner.optimizer
        if not isinstance(inner, torch.optim.AdamW) or inner.state:
            raise ConfigError(f"optim.cautious: megatron built a {type(inner).__name__} that cannot be swapped")
        kwargs = {k: v for k, v in inner.defaults.items() if k in inspect.signature(torch.optim.AdamW).parameters}
        owner.optimizer = CautiousAdamW(inner.param_groups, **kwargs)
    return len(owners)


def use_fused_adam(optimizer) -> int:
    """Switch megatron's torch AdamW fallback (foreach: ~10 kernels per parameter group chunk) to
    torch's fused AdamW (one kernel over all tensors). `fused` is a per-group hyperparameter that
    torch's AdamW reads at every step, so the optimizer and its state stay megatron's; this must
    run before the first step (fused AdamW keeps its step counts on the device). Returns the number
    of torch optimizers switched."""
    inner = [o.optimizer for o in _torch_optimizers(optimizer)]
    for opt in inner:
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            raise ConfigError(f"optim.adam_impl fused: megatron built a {type(opt).__name__}, not torch's Adam/AdamW")
        opt.defaults.update(fused=True, foreach=False)
        for group in opt.param_groups:
            group.update(fused=True, foreach=False)
    return len(inner)


def build_scheduler(cfg: SodaConfig, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class AdamCScheduler(OptimizerParamScheduler):
        """megatron's schedule, then each group's decay scaled by its lr / max_lr (AdamC). Runs at
        every step and when a checkpoint's schedule is loaded, so resumes see the same decay."""

        def step(self, increment: int) -> None:
            super().step(increment)
            for group in self.optimizer.param_groups:
                max_lr = group.get("max_lr", self.max_lr)
                group["weight_decay"] *= group["lr"] / max_lr if max_lr > 0 else 0.0

    o, steps = cfg.optim, cfg.train.steps
    style = {"wsd": "WSD", "cosine": "cosine", "constant": "constant"}[o.schedule]
    return (AdamCScheduler if o.adamc else OptimizerParamScheduler)(
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
        wsd_decay_steps=(o.decay_steps or int(round(o.decay_fraction * steps))) if o.schedule == "wsd" else None,
        lr_wsd_decay_style="linear" if o.schedule == "wsd" else None,
    )
