"""Token losses on vocab-parallel logits: NLL, z-loss, and the per-modality breakdown.

The logits of a TP rank cover its slice of the padded vocabulary. Padding rows are masked to
-inf, so they never receive probability mass; the log-partition is combined across the TP group
(max, then sum of exp) as megatron-core's vocab-parallel cross-entropy does, here with z-loss
(1e-4 * logZ^2, as SODA's production runs) added. This is the output seam: a fused
linear + cross-entropy kernel replaces `token_losses` without touching the training loop.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megatron_soda.tokenization.vocab import SodaLayout


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, real_vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [b, s, v_local] (this rank's vocab slice), labels [b, s] -> (nll, log_z), each [b, s]."""
    logits = logits.float()
    v_local = logits.shape[-1]
    n_real = real_vocab - vocab_start
    if n_real < v_local:  # this slice holds padding rows
        cols = torch.arange(v_local, device=logits.device)
        logits = logits.masked_fill(cols >= n_real, float("-inf"))
    group = ps.get_tensor_model_parallel_group()
    with torch.no_grad():
        m = logits.max(dim=-1).values
        if ps.get_tensor_model_parallel_world_size() > 1:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
    sum_exp = reduce_from_tensor_model_parallel_region((logits - m.unsqueeze(-1)).exp().sum(dim=-1))
    log_z = sum_exp.log() + m
    local = labels - vocab_start
    mine = (local >= 0) & (local < v_local)
    picked = torch.gather(logits, -1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    target = reduce_from_tensor_model_parallel_region(torch.where(mine, picked, torch.zeros_like(picked)))
    return log_z - target, log_z


def output_losses(
    output: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    z_weight: float,
    m,
    vocab_start: int,
    weight_fn,
    sequence_parallel: bool = False,
    impl: str = "torch",
    into_main_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nll, log_z, loss) from the last stage's output: logits (`impl` torch) or hidden states that
    a kernel projects itself (the resolved `model.output_impl`: fused, chunk by chunk; blockwise,
    tile by tile). nll and log_z are [b, s]; loss = sum(mask * (nll + z_weight * log_z^2)) is what
    backward differentiates."""
    if impl == "torch":
        nll, log_z = token_losses(output, labels, vocab_start, m.vocab_size)
        return nll, log_z, (nll * mask).sum() + z_weight * (log_z.square() * mask).sum()
    b, s, h = output.shape
    args = (output.reshape(b * s, h), weight_fn(), labels.reshape(-1), vocab_start, m.vocab_size)
    common = dict(
        group=ps.get_tensor_model_parallel_group(),
        reduce_grad_input=not sequence_parallel,
        loss_weight=mask.reshape(-1),
        z_loss=z_weight,
        into_main_grad=into_main_grad,
    )
    if impl == "blockwise":
        from megatron_soda.kernels.blockwise_ce import blockwise_linear_cross_entropy

        nll, log_z, loss = blockwise_linear_cross_entropy(*args, filter_eps=m.ce_filter_eps, **common)
    else:
        from megatron_soda.kernels.fused_ce import fused_linear_cross_entropy

        nll, log_z, loss = fused_linear_cross_entropy(*args, chunk=m.ce_chunk_tokens, **common)
    return nll.view(b, s), log_z.view(b, s), loss


def categories(labels: torch.Tensor, layout: SodaLayout) -> torch.Tensor:
    """Per-label category: 0 text, 1 delimiter, 2 + k audio codebook k."""
    audio = (labels >= layout.audio_offset) & (labels < layout.vocab_size)
    k = (labels - layout.audio_offset).div(layout.codebook_size, rounding_mode="floor")
    out = torch.where(labels >= layout.text_vocab_size, torch.ones_like(labels), torch.zeros_like(labels))
    return torch.where(audio, 2 + k, out)


def category_names(layout: SodaLayout) -> list[str]:
    return ["text", "delimiter"] + [f"audio_cb{k}" for k in range(layout.codebooks)]


def loss_breakdown(nll: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, layout: SodaLayout) -> torch.Tensor:
    """[2, C] sums and counts of NLL per category (masked positions excluded), for logging."""
    c = categories(labels, layout).reshape(-1)
    n = len(category_names(layout))
    w = mask.reshape(-1)
    sums = torch.zeros(n, dtype=torch.float64, device=nll.device).index_add_(
        0, c, (nll.detach().reshape(-1) * w).double()
    )
    counts = torch.zeros(n, dtype=torch.float64, device=nll.device).index_add_(0, c, w.double())
    return torch.stack([sums, counts])
