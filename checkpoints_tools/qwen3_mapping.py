"""megatron-core GPTModel (SODA layer spec) <-> Hugging Face Qwen3ForCausalLM: names, layouts, config.

Pure tensor bookkeeping, no I/O, so both directions are easy to test against each other. The two
layouts differ in three places: megatron fuses Q, K, V into one matrix grouped by KV head
([q heads of group g; k_g; v_g] for each g), fuses SwiGLU's gate and up projections ([gate; up]),
and pads the vocabulary rows (dropped on export, re-padded on import).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from megatron_soda.config import ModelConfig, UserError

if TYPE_CHECKING:
    import torch

LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}


class MappingError(UserError, ValueError):
    """A Hugging Face model this converter cannot reproduce in the SODA layout."""


def hf_config(m: ModelConfig, bos_id: int | None, eos_id: int | None, max_positions: int = 32768):
    """The transformers Qwen3 config of our model; `max_positions`: the longest sequence it trained on
    (transformers reads max_position_embeddings as the context the model is meant for)."""
    from transformers import Qwen3Config

    rope = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    if m.rope_llama3_scaling:
        rope = {
            "rope_type": "llama3",
            "rope_theta": float(m.rope_theta),
            "factor": float(m.rope_scaling_factor),
            **LLAMA3_ROPE,
        }
    return Qwen3Config(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups,
        head_dim=m.head_dim,
        hidden_act="silu",
        # above the RoPE scaling's original 8192, as transformers expects, and the trained context
        max_position_embeddings=max(32768, max_positions),
        initializer_range=m.init_std,
        rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings,
        rope_parameters=rope,
        attention_bias=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        architectures=["Qwen3ForCausalLM"],
    )


def model_config_from_hf(cfg) -> ModelConfig:
    """The SODA model config that reproduces a HF Qwen3 config; anything else is refused."""
    if getattr(cfg, "model_type", None) != "qwen3":
        raise MappingError(
            f"expected a Qwen3 checkpoint (model_type 'qwen3'), got {getattr(cfg, 'model_type', None)!r}"
        )
    if getattr(cfg, "attention_bias", False):
        raise MappingError("attention_bias=True is not a SODA/Qwen3 layout this converter supports")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise MappingError(f"hidden_act {cfg.hidden_act!r}: SODA uses SwiGLU (silu)")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    llama3 = kind == "llama3"
    if kind not in ("default", "llama3"):
        raise MappingError(f"rope_type {kind!r} is not supported (default or llama3)")
    if llama3 and any(float(rope.get(k, v)) != v for k, v in LLAMA3_ROPE.items()):
        raise MappingError(f"llama3 rope with {rope} differs from megatron-core's fixed 1 / 4 / 8192 parameters")
    return ModelConfig(
        name=getattr(cfg, "name_or_path", "") or "imported",
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        tie_embeddings=bool(cfg.tie_word_embeddings),
        norm_eps=cfg.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_llama3_scaling=llama3,
        rope_scaling_factor=float(rope.get("factor", 8.0)),
        init_std=cfg.initializer_range,
    )


def hf_shapes(m: ModelConfig, vocab: int) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor `from_hf` reads from a Hugging Face folder of `vocab` ids, from the
    config alone: the weights' headers are checked against it before a model is built, so a
    config.json that disagrees with its weights is refused before allocating what it claims."""
    d, hd, nq, ng, ffn = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (vocab, d)}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (nq * hd, d),
                p + "self_attn.k_proj.weight": (ng * hd, d),
                p + "self_attn.v_proj.weight": (ng * hd, d),
                p + "self_attn.o_proj.weight": (d, nq * hd),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "mlp.gate_proj.weight": (ffn, d),
                p + "mlp.up_proj.weight": (ffn, d),
                p + "mlp.down_proj.weight": (d, ffn),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    shapes["model.norm.weight"] = (d,)
    if not m.tie_embeddings:
        shapes["lm_head.weight"] = (vocab, d)
    return shapes


def to_hf(state: dict[str, torch.Tensor], m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """megatron TP=1 state dict -> (HF name, tensor) pairs, padding rows dropped, in a stable order."""
    d, hd, nq, ng = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_query_groups
    per = nq // ng
    V = m.vocab_size
    yield "model.embed_tokens.weight", state["embedding.word_embeddings.weight"][:V]
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = state[src + "self_attention.linear_qkv.weight"].view(ng, (per + 2) * hd, d)
        yield dst + "self_attn.q_proj.weight", qkv[:, : per * hd].reshape(nq * hd, d)
        yield dst + "self_attn.k_proj.weight", qkv[:, per * hd : (per + 1) * hd].reshape(ng * hd, d)
        yield dst + "self_attn.v_proj.weight", qkv[:, (per + 1) * hd :].reshape(ng * hd, d)
        gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        yield dst + "mlp.gate_proj.weight", gate
        yield dst + "mlp.up_proj.weight", up
        for a, b in _LAYER.items():
            yield dst + b, state[src + a]
    yield "model.norm.weight", state["decoder.final_layernorm.weight"]
    if not m.tie_embeddings:
        yield "lm_head.weight", state["output_layer.weight"][:V]


def from_hf(get, m: ModelConfig, padded_vocab: int, hf_vocab: int, new_row_init) -> dict[str, torch.Tensor]:
    """`get(name)` -> HF tensor; returns the megatron TP=1 state dict. Vocabulary rows beyond the HF
    vocabulary (a resize to the SODA layout) come from `new_row_init(rows, hidden)`; padding rows are 0."""
    import torch

    d, hd, nq, ng = m.hidden_size, m.head_dim, m.num_attention_heads, m.num_query_groups
    per = nq // ng

    def vocab_matrix(t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(padded_vocab, d, dtype=torch.float32)
        keep = min(hf_vocab, m.vocab_size)
        out[:keep] = t[:keep].float()
        if m.vocab_size > keep:
            out[keep : m.vocab_size] = new_row_init(m.vocab_size - keep, d)
        return out

    state = {"embedding.word_embeddings.weight": vocab_matrix(get("model.embed_tokens.weight"))}
    for i in range(m.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = get(src + "self_attn.q_proj.weight").float().view(ng, per * hd, d)
        k = get(src + "self_attn.k_proj.weight").float().view(ng, hd, d)
        v = get(src + "self_attn.v_proj.weight").float().view(ng, hd, d)
        state[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, d)
        state[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [get(src + "mlp.gate_proj.weight").float(), get(src + "mlp.up_proj.weight").float()], dim=0
        )
        for a, b in _LAYER.items():
            state[dst + a] = get(src + b).float()
    state["decoder.final_layernorm.weight"] = get("model.norm.weight").float()
    if not m.tie_embeddings:
        state["output_layer.weight"] = vocab_matrix(get("lm_head.weight"))
    return state
