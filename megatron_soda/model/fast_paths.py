"""Which implementation each speed switch gets in this run, and megatron-core's hooks for them.

Every switch in the config is `auto` by default: the fast path on a GPU, the torch reference on the
CPU backend (where Triton only runs interpreted and CUDA graphs do not exist). `resolve` turns the
user's settings into a `FastPaths` for this device once; it is logged and saved beside the config
(`fast_paths.yaml` in the run directory), and the user's settings keep saying `auto`, so a
checkpoint trained on a GPU fine-tunes on a CPU without carrying GPU choices along.

megatron-core looks for its fused helpers in apex and Transformer Engine (neither installable on
many clusters nor on our GPU machine) and falls back to slow Python loops or refuses the feature.
`install` puts torch / Triton implementations with the same names and arguments where megatron-core
looks them up, filling only the hooks it could not import:
- `fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32/fp16` (gradient-accumulation fusion):
  kernels/grad_accum.py, torch's GEMM with an fp32 output accumulating into `main_grad`;
- `amp_C.multi_tensor_l2norm / multi_tensor_scale` (grad norm, clipping, fp32 -> bf16 weight copy):
  kernels/multi_tensor.py, torch foreach ops without a host sync per parameter (with the fused
  AdamW, which training/optimizer.py switches on);
- Transformer Engine's `fused_apply_rotary_pos_emb` (`apply_rope_fusion`): kernels/rope.py.
These are process-wide names inside megatron-core, but each only acts where a model's config asks
for it (gradient_accumulation_fusion, apply_rope_fusion), except the multi-tensor ops, which
compute the same numbers as megatron's fallback and are installed only with the fused optimizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_soda.config import SWITCHES, ConfigError, SodaConfig, switch_options, switch_setting


@dataclass(frozen=True)
class FastPaths:
    embedding: str = "torch"
    output: str = "torch"
    norm: str = "torch"
    rope: str = "torch"
    wgrad: str = "torch"
    adam: str = "foreach"
    cuda_graph: str = "none"

    @property
    def fused_output(self) -> bool:
        """The output layer's projection happens inside the loss kernel (fused or blockwise)."""
        return self.output != "torch"

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(self).items())


# What `auto` picks on a GPU, per switch, and the measurement behind it (docs/PERFORMANCE.md, rows in
# docs/bench: H100 2026-11-25, H200 2026-11-26). A switch not in this table stays on its torch
# reference under `auto` until a GPU measurement earns it a line here (a test holds every switch to one).
# - embedding, output, rope: each faster than the reference in the kernel bench and the lever ablation;
# - wgrad, adam: on, as part of the all-on step (+20% at 135M over all off, and the 600M / 1.7B / 4B
#   headline rows); alone at 135M over 5 steps they measured -5.7% / -8.4%, within what 5 steps resolve;
# - norm: torch's RMSNorm was faster than kernels/rmsnorm.py for hidden 576 and 2560 and the 64-dim
#   QK-norm (0.40-0.83x), slower only for the 128-dim QK-norm (1.79x): auto stays with torch;
# - cuda_graph: on at 135M (part of the all-on gain); at 1.7B, micro-batch 2, the graph's memory pool
#   ran out of memory on an H100 (2026-11-25; no row was kept), so auto turns graphs on only up to
#   hidden 1024, where the step is host-bound; larger models are GPU-bound and gain little from them.
GRAPH_AUTO_MAX_HIDDEN = 1024
AUTO_ON_GPU = {
    "embedding": lambda cfg: True,
    "output": lambda cfg: True,
    "norm": lambda cfg: False,
    "rope": lambda cfg: True,
    "wgrad": lambda cfg: True,
    "adam": lambda cfg: True,
    "cuda_graph": lambda cfg: (
        cfg.model.hidden_size <= GRAPH_AUTO_MAX_HIDDEN and cfg.parallel.pp == 1 and cfg.parallel.cp == 1
    ),
}


def auto_fast(name: str, cfg: SodaConfig) -> bool:
    """Whether `auto` picks the fast implementation of switch `name` on a GPU for this model."""
    rule = AUTO_ON_GPU.get(name)
    return bool(rule and rule(cfg))


def resolve_fast_paths(cfg: SodaConfig, cuda: bool) -> FastPaths:
    """auto -> the fast path on GPU (where `auto_fast` says so), the torch path on CPU; explicit
    settings are kept, except those this device or layout cannot run, which are refused with the reason."""
    chosen = {}
    for name in SWITCHES:
        fast, reference = switch_options(name)
        value = switch_setting(cfg, name)
        chosen[name] = (fast if cuda and auto_fast(name, cfg) else reference) if value == "auto" else value
    if cfg.optim.cautious:
        if chosen["adam"] == "fused" and cfg.optim.adam_impl == "fused":
            raise ConfigError("optim.adam_impl fused cannot apply optim.cautious's mask: use foreach or auto")
        chosen["adam"] = "foreach"
    if cfg.model.fp8 != "none" and not cuda:
        raise ConfigError(f"model.fp8 {cfg.model.fp8} needs a GPU with FP8 tensor cores (the CPU backend runs fp32)")
    if chosen["cuda_graph"] != "none":
        where = "parallel.cuda_graph full_iteration"
        if not cuda:
            raise ConfigError(f"{where} needs a GPU (CUDA graphs do not exist on the CPU backend)")
        if cfg.parallel.pp > 1:
            raise ConfigError(f"{where} is supported with parallel.pp 1 only (untested with pipelining)")
        if cfg.train.debug_nan_steps:
            raise ConfigError(f"{where}: train.debug_nan_steps changes the step function, which a graph cannot")
    return FastPaths(**chosen)


def save_fast_paths(fp: FastPaths, path) -> None:
    """Beside config.yaml: what `auto` meant for this run (the user's settings stay as written)."""
    from pathlib import Path

    import yaml

    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(fp), sort_keys=False))


def install(fp: FastPaths) -> list[str]:
    """Fill the megatron-core hooks this run uses that apex / TE did not provide; returns their names."""
    done = []
    if fp.wgrad == "main_grad":
        from megatron.core.tensor_parallel import layers

        if not layers._grad_accum_fusion_available:
            from megatron_soda.kernels import grad_accum

            layers.fused_weight_gradient_mlp_cuda = grad_accum
            layers._grad_accum_fusion_available = True
            done.append("fused_weight_gradient_mlp_cuda")
    if fp.rope == "triton":
        from megatron.core.models.common.embeddings import rope_utils

        if rope_utils.fused_apply_rotary_pos_emb is None:
            from megatron_soda.kernels.rope import fused_apply_rotary_pos_emb

            rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
            done.append("fused_apply_rotary_pos_emb")
    if fp.adam == "fused":
        from megatron.core import utils as mutils
        from megatron.core.optimizer import clip_grads
        from megatron.core.optimizer import optimizer as mopt

        from megatron_soda.kernels import multi_tensor

        if clip_grads.l2_norm_impl is mutils.local_multi_tensor_l2_norm:
            clip_grads.l2_norm_impl = multi_tensor.multi_tensor_l2norm
            done.append("multi_tensor_l2norm")
        for mod in (clip_grads, mopt):
            if mod.multi_tensor_scale_impl is mutils.local_multi_tensor_scale:
                mod.multi_tensor_scale_impl = multi_tensor.multi_tensor_scale
                done.append(f"{mod.__name__.rsplit('.', 1)[-1]}.multi_tensor_scale")
    return done
