"""Parameter counts, training FLOPs per token and MFU: the one place each is computed.

Used by the training log, `soda bench`, the IsoFLOP planner, the HF export's model card and
`soda inspect`; all count the way the SODA paper does (see each function).
"""

from __future__ import annotations

from megatron_soda.config import ModelConfig


def param_counts(m: ModelConfig) -> dict[str, int]:
    """non_embedding, embedding (one V x d matrix, real vocab), label (= non_embedding + one
    embedding: the paper's size names), total (both matrices unless tied)."""
    d, hd = m.hidden_size, m.head_dim
    attn = d * hd * (m.num_attention_heads + 2 * m.num_query_groups) + m.num_attention_heads * hd * d
    mlp = 3 * d * m.ffn_hidden_size
    norms = 2 * d + 2 * hd
    non_embedding = m.num_layers * (attn + mlp + norms) + d
    embedding = m.vocab_size * d
    total = non_embedding + embedding * (1 if m.tie_embeddings else 2)
    return {"non_embedding": non_embedding, "embedding": embedding, "label": non_embedding + embedding, "total": total}


def forward_flops_per_token(m: ModelConfig, seq_length: int, softmax: bool = False, causal: bool = False) -> float:
    """Forward FLOPs per token: 2 x every matmul weight (QKV, attention output, SwiGLU's three, LM
    head over the real vocabulary) plus attention scores and values, 2 x 2 x seq x (heads x head_dim)
    per layer, counted over the full (not causally halved) score matrix as PaLM, torchtitan and
    Levanter do (the paper's convention). `causal` counts only the lower triangle the causal kernels
    compute, (seq + 1) / 2 keys per query on average: what the hardware does, about half the
    attention term. The embedding lookup is free. `softmax` adds Levanter's 3 x seq x heads per layer
    for the mask and softmax: the SODA IsoFLOP sweep counted it, and its budgets only come out right
    with it.
    """
    d, hd, L = m.hidden_size, m.head_dim, m.num_layers
    attn_proj = d * hd * (m.num_attention_heads + 2 * m.num_query_groups) + m.num_attention_heads * hd * d
    mlp = 3 * d * m.ffn_hidden_size
    matmul = L * (attn_proj + mlp) + d * m.vocab_size
    keys = (seq_length + 1) / 2 if causal else seq_length
    attn_scores = L * 2 * 2 * keys * m.num_attention_heads * hd
    mask = L * 3 * seq_length * m.num_attention_heads if softmax else 0
    return 2.0 * matmul + attn_scores + mask


def flops_per_token(m: ModelConfig, seq_length: int, causal: bool = False) -> float:
    """Training FLOPs per token = 3 x forward (backward = 2 x forward), attention over the full score
    matrix (the paper's convention) or, `causal`, over the half the kernels compute. Activation
    recomputation is not counted (MFU counts useful work)."""
    return 3.0 * forward_flops_per_token(m, seq_length, causal=causal)


PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0, "L40S": 362.0}


def peak_tflops(override: float) -> float | None:
    if override > 0:
        return override
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS_BF16.items() if k in name), None)


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s per device over the device's peak (None: unknown peak)."""
    if not peak_tflops:
        return None
    return flops_per_token * tokens_per_s_per_device / (peak_tflops * 1e12)
