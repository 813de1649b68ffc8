"""`soda inspect CHECKPOINT`: config, step, tokens seen, saved layout, tensor shapes and sizes."""

from __future__ import annotations

from megatron_soda.config import config_from_dict
from megatron_soda.model.flops import param_counts


def inspect_checkpoint(path: str, show_tensors: int = 40) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_soda.training import checkpoint as ckpt

    src = ckpt.resolve(path)
    common = ckpt.common_state(src)
    cfg = config_from_dict(common["config"]) if "config" in common else None
    meta = dist_checkpointing.load_tensors_metadata(str(src))
    tensors = {k: v for k, v in meta.items() if hasattr(v, "global_shape") and not k.startswith("optimizer")}
    layout = tuple(common.get("layout", (None, None, None)))
    pp, tp, cp, dp = (*layout[:2], 1, layout[2]) if len(layout) == 3 else layout
    cp_part = f" x CP {cp}" if cp and cp > 1 else ""
    print(f"checkpoint {src}")
    print(f"  step {common.get('step', 0)}, saved at TP {tp} x PP {pp}{cp_part} x DP {dp} (loads under any layout)")
    if cfg is not None:
        m = cfg.model
        seen = int(common.get("data", {}).get("consumed_samples", 0)) * cfg.train.seq_length
        counts = param_counts(m)
        print(
            f"  model {m.name}: d {m.hidden_size}, {m.num_layers} layers, "
            f"{m.num_attention_heads}/{m.num_query_groups} heads, head dim {m.head_dim}, MLP {m.ffn_hidden_size}, "
            f"vocab {m.vocab_size} (padded {m.padded_vocab_size})"
        )
        print(
            f"  parameters: {counts['non_embedding'] / 1e6:.2f}M non-embedding, {counts['label'] / 1e6:.2f}M "
            f"label, {counts['total'] / 1e6:.2f}M total; tokens seen {seen:,}"
        )
    if "imported_from" in common:
        print(f"  imported from {common['imported_from']}")
    optimizer = any(k.startswith("optimizer") for k in meta)
    print(f"  optimizer state: {'yes' if optimizer else 'no (weights only)'}; {len(tensors)} model tensors")
    total = 0
    for i, (name, t) in enumerate(sorted(tensors.items())):
        n = 1
        for s in t.global_shape:
            n *= s
        total += n
        if i < show_tensors:
            print(f"    {name:<60} {str(tuple(t.global_shape)):<18} {str(t.dtype).replace('torch.', '')}")
    if len(tensors) > show_tensors:
        print(f"    ... {len(tensors) - show_tensors} more")
    print(f"  stored model elements: {total:,} (vocab padding rows included)")
    return {"step": common.get("step", 0), "tensors": len(tensors), "elements": total}
