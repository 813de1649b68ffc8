"""The SODA decoder: a Qwen3-style megatron-core GPTModel (RMSNorm, SwiGLU, GQA, RoPE, QK-norm, no biases).

Two layer implementations, picked once here and logged: Transformer Engine's spec when TE is
installed and a GPU runs, else megatron-core's local spec with torch SDPA as core attention
(flash-attn's kernel when installed, on GPU). The word embedding goes through `SodaEmbedding`, the
one seam where the fused codec-embedding kernel plugs in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_soda.config import ConfigError, ModelConfig, ParallelConfig
from megatron_soda.model.fast_paths import FastPaths

# --- building blocks ----------------------------------------------------------------------------


class SodaRMSNorm(torch.nn.RMSNorm):
    """RMSNorm that megatron-core's sequence parallelism accepts: its weight is marked so that its
    gradient is all-reduced over TP (megatron's own torch-norm wrapper refuses SP). `impl` triton
    runs kernels/rmsnorm.py (fp32 statistics, one kernel each way) instead of torch's."""

    def __init__(
        self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, impl: str = "torch", **_
    ) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "triton":
            from megatron_soda.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def _flash_attn():
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func
    except ImportError:
        return None


def _attend(q, k, v, scale, dropout: float, flash: bool) -> torch.Tensor:
    """Causal attention of queries that are the LAST len(q) positions of the keys' span (megatron
    layout [s, b, heads, head_dim]): the causal mask aligned bottom-right, so query i sees keys up to
    len(k) - len(q) + i. flash-attn aligns it so for len(q) != len(k); SDPA's `is_causal` aligns
    top-left, so it gets `causal_lower_right` (which dispatches to the flash / memory-efficient
    kernels on GPU and is materialised for the math kernel on CPU)."""
    if flash and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        t = (x.transpose(0, 1) for x in (q, k, v))  # [b, s, h, d]
        return _flash_attn()(*t, dropout_p=dropout, softmax_scale=scale, causal=True).transpose(0, 1)
    qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, h, s, d]
    gqa = qb.shape[1] != kb.shape[1]
    if qb.shape[2] == kb.shape[2]:
        out = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(qb.shape[2], kb.shape[2])
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)
    return out.permute(2, 0, 1, 3)


def cp_chunk_order(cp: int) -> list[int]:
    """Where each of the 2 x CP sequence chunks sits in the rank-ordered all-gather of local chunks:
    rank r holds chunks r and 2cp - 1 - r (an early and a late one, so causal attention's work is
    balanced, as megatron-core's get_batch_on_this_cp_rank splits a batch)."""
    return [2 * c if c < cp else 2 * (2 * cp - 1 - c) + 1 for c in range(2 * cp)]


_CHUNK_IDS: dict = {}


def _chunk_ids(cp: int, device) -> torch.Tensor:
    """`cp_chunk_order` as an index on the device, made once (no host-to-device copy per layer)."""
    key = (cp, str(device))
    if key not in _CHUNK_IDS:
        _CHUNK_IDS[key] = torch.tensor(cp_chunk_order(cp), device=device)
    return _CHUNK_IDS[key]


def context_parallel_attention(query, key, value, scale, dropout: float, flash: bool, group) -> torch.Tensor:
    """Causal attention over a sequence split across the CP group: K and V are all-gathered along the
    sequence (cheap with GQA: 8 KV heads at most in the presets), put back in sequence order, and each
    of this rank's two query chunks attends to the keys up to its own end. The all-gather's backward
    reduce-scatters, so dK and dV return to the ranks that own those positions. All-gather rather
    than a ring: one collective each way per layer with no softmax merging (SDPA does not return the
    log-sum-exp a ring needs), at a memory cost: autograd keeps each layer's gathered K/V (the
    prefixes SDPA saves) until that layer's backward; `parallel.recompute selective` recomputes them
    instead (the all-gather then runs again in backward, in the same order on every rank)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    cp, r = group.size(), group.rank()
    L = query.shape[0] // 2
    ids = _chunk_ids(cp, key.device)

    def gathered(t):
        full = gather_from_sequence_parallel_region(t, True, group=group)
        return full.view(2 * cp, L, *t.shape[1:]).index_select(0, ids).flatten(0, 1)

    k, v = gathered(key), gathered(value)
    outs = [
        _attend(query[i * L : (i + 1) * L], k[: (c + 1) * L], v[: (c + 1) * L], scale, dropout, flash)
        for i, c in enumerate((r, 2 * cp - 1 - r))
    ]
    return torch.cat(outs, 0)


class SDPAttention(MegatronModule):
    """Causal core attention through torch SDPA (flash / cuDNN / memory-efficient kernels on GPU,
    the math kernel on CPU), or flash-attn's kernel when installed and asked for; with context
    parallelism (`parallel.cp` > 1), over the sequence split across the CP group
    (`context_parallel_attention`): megatron-core's own local attention refuses CP without TE."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        use_flash_attn: bool = False,
        **_,
    ) -> None:
        super().__init__(config=config)
        self.use_flash_attn = use_flash_attn
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError("SODA attention is causal")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale

    def forward(
        self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        # megatron layout [s, b, heads, head_dim]
        p = self.dropout if self.training else 0.0
        if self.config.context_parallel_size > 1:
            group = ps.get_context_parallel_group()
            out = context_parallel_attention(query, key, value, self.scale, p, self.use_flash_attn, group)
        else:
            out = _attend(query, key, value, self.scale, p, self.use_flash_attn)
        s, b = out.shape[:2]
        return out.reshape(s, b, -1)


class SodaEmbedding(VocabParallelEmbedding):
    """The embedding seam: same parameters and checkpoint layout as megatron-core's vocab-parallel
    embedding; `impl` picks the lookup (torch reference, or the fused Triton kernel, which with
    `into_main_grad` writes its weight gradient straight into megatron's fp32 main_grad). Both are
    set per instance by `build_model`."""

    impl = "torch"
    into_main_grad = False

    def forward(self, input_):
        if self.impl == "triton":
            from megatron_soda.kernels.codec_embedding import vocab_parallel_embedding

            return vocab_parallel_embedding(self, input_, into_main_grad=self.into_main_grad)
        return super().forward(input_)


class SodaOutputLayer(ColumnParallelLinear):
    """The output seam. With the fused output (`defer_to_loss`), the projection moves into the loss
    (kernels/fused_ce.py), which never materialises all logits: this layer then only gathers the
    sequence under SP (whose backward reduce-scatters the partial input gradients) and hands the
    hidden states on; without SP the fused op all-reduces its input gradient over TP itself.
    `defer_to_loss` is set per instance by `build_model`."""

    defer_to_loss = False

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.defer_to_loss:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(input_, group=self.tp_group), None
        return input_, None


class _Fp8Linear:
    """The FP8 seam of the transformer layers' linears (`model.fp8 tensorwise`): megatron-core's
    Column/RowParallelLinear compute through `_forward_impl` (its
    linear_with_grad_accumulation_and_async_allreduce); here the same arguments go to
    kernels/fp8.py's linear, whose three GEMMs run on scaled FP8 operands with the same
    communication (SP all-gather / reduce-scatter, d(input) all-reduce) and main_grad protocol.
    Parameters, init and checkpoint keys are megatron's. `fp8_parallel` says which operands are
    split over TP (their amax is all-reduced there). A frozen weight keeps megatron's path."""

    fp8_parallel = "column"

    def _forward_impl(self, input, weight, *args, **kwargs):
        if not weight.requires_grad:
            return super()._forward_impl(input, weight, *args, **kwargs)
        from megatron_soda.kernels.fp8 import fp8_linear

        return fp8_linear(
            input,
            weight,
            kwargs.get("bias"),
            parallel=self.fp8_parallel,
            group=self.tp_group,
            sequence_parallel=bool(kwargs.get("sequence_parallel")),
            allreduce_dgrad=bool(kwargs.get("allreduce_dgrad")),
            into_main_grad=bool(kwargs.get("gradient_accumulation_fusion")),
        )


class Fp8ColumnParallelLinear(_Fp8Linear, ColumnParallelLinear):
    fp8_parallel = "column"


class Fp8RowParallelLinear(_Fp8Linear, RowParallelLinear):
    fp8_parallel = "row"


FP8_CLASSES = {ColumnParallelLinear: Fp8ColumnParallelLinear, RowParallelLinear: Fp8RowParallelLinear}


def fp8_linears(model) -> int:
    """Re-class the decoder's QKV / projection / MLP linears of a model chunk to their FP8 subclasses
    in place (the embedding and the output layer live outside the decoder and stay bf16); returns
    how many. Each weight's dimensions on this rank must be multiples of 16 (torch._scaled_mm)."""
    from megatron_soda.kernels.fp8 import ALIGN

    n = 0
    for name, mod in getattr(model, "decoder", model).named_modules():
        cls = FP8_CLASSES.get(type(mod))
        if cls is None:
            continue
        if any(d % ALIGN for d in mod.weight.shape):
            raise ConfigError(
                f"model.fp8 tensorwise: {name} has a [{mod.weight.shape[0]}, {mod.weight.shape[1]}] weight on this "
                f"rank; FP8 GEMMs need both dimensions multiples of {ALIGN}"
            )
        mod.__class__ = cls
        n += 1
    return n


def output_weight(model) -> torch.Tensor:
    """The LM head of a (possibly DDP / Float16Module-wrapped) last-stage chunk."""
    while hasattr(model, "module"):
        model = model.module
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def transformer_config(
    m: ModelConfig, p: ParallelConfig, dtype: torch.dtype, cpu: bool, fp: FastPaths | None = None
) -> TransformerConfig:
    fp = fp or FastPaths()
    recompute = {}
    if p.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif p.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    graphs = {}
    if fp.cuda_graph == "full_iteration":  # the trainer wraps the schedule; megatron's modules must know
        graphs = dict(cuda_graph_impl="local", cuda_graph_scope="full_iteration")
    std = m.init_std

    def init_method(w):
        return torch.nn.init.normal_(w, mean=0.0, std=std)

    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method=init_method,
        output_layer_init_method=init_method,  # SODA/Levanter: every matrix N(0, 0.02), no depth scaling
        init_method_std=std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        context_parallel_size=p.cp,  # RoPE takes this rank's chunks of the full-length table
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp > 1 else None,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        calculate_per_token_loss=True,  # the loss is a mean over all tokens of the global batch
        batch_p2p_comm=p.vpp == 1,  # interleaved PP=2 with batched p2p is silently wrong (Megatron-LM #750)
        use_cpu_initialization=cpu,
        gradient_accumulation_fusion=fp.wgrad == "main_grad",  # model/fast_paths.py provides the GEMM
        bias_activation_fusion=not cpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=not cpu,
        apply_rope_fusion=fp.rope == "triton",  # kernels/rope.py, installed by model/fast_paths.py
        cross_entropy_loss_fusion=False,
        **graphs,
        **recompute,
    )


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401

        return True
    except ImportError:
        return False


def layer_impl(m: ModelConfig, cuda: bool, cp: int = 1) -> str:
    """`auto` takes Transformer Engine when installed on a GPU, except under context parallelism, whose
    attention is our own seam in the local layers (config.validate refuses an explicit TE with CP)."""
    if m.transformer_impl == "transformer_engine":
        if not (_have_te() and cuda):
            raise ConfigError("model.transformer_impl transformer_engine needs Transformer Engine and a GPU")
        return "transformer_engine"
    if m.transformer_impl == "auto" and _have_te() and cuda and cp == 1:
        return "transformer_engine"
    return "local"


def _local_block_spec(config: TransformerConfig, vp_stage: int | None, norm: str, flash: bool) -> ModuleSpec:
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    layer = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    sub = layer.submodules
    norm_spec = ModuleSpec(module=SodaRMSNorm, params={"impl": norm})
    sub.input_layernorm = sub.pre_mlp_layernorm = norm_spec
    attn = sub.self_attention.submodules
    attn.core_attention = ModuleSpec(module=SDPAttention, params={"use_flash_attn": flash})
    attn.q_layernorm = attn.k_layernorm = norm_spec
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=norm_spec)
    )


def build_model(
    m: ModelConfig, p: ParallelConfig, dtype: torch.dtype, cuda: bool, fp: FastPaths | None = None
) -> tuple[list[GPTModel], str]:
    """This rank's model chunks (one, or `vpp` for the interleaved schedule) and the layer path used.
    `fp`: the resolved implementation of each seam (model/fast_paths.py; default: torch's)."""
    fp = fp or FastPaths()
    config = transformer_config(m, p, dtype, cpu=not cuda, fp=fp)
    impl = layer_impl(m, cuda, p.cp)
    flash = False
    if impl == "local":
        want_flash = m.attention_backend in ("auto", "flash_attn")
        flash = want_flash and cuda and _flash_attn() is not None
        if m.attention_backend == "flash_attn" and not flash:
            raise ConfigError("model.attention_backend flash_attn needs flash-attn and a GPU")
        path = "local spec, " + ("flash-attn" if flash else "torch SDPA") + " attention"
    else:
        path = "Transformer Engine spec"
    if m.fp8 != "none":
        if impl != "local":
            raise ConfigError(
                "model.fp8 tensorwise is built into the local spec's linears: use model.transformer_impl local"
            )
        if cuda and torch.cuda.get_device_capability() < (8, 9):
            raise ConfigError(
                f"model.fp8 tensorwise needs FP8 tensor cores (compute capability 8.9+): {torch.cuda.get_device_name()}"
            )
        path += ", FP8 (tensorwise) linears"
    chunks = []
    stages = range(p.vpp) if p.vpp > 1 else [None]
    for v in stages:
        first = ps.is_pipeline_first_stage(ignore_virtual=v is None, vp_stage=v)
        last = ps.is_pipeline_last_stage(ignore_virtual=v is None, vp_stage=v)
        if impl == "local":
            spec = _local_block_spec(config, v, fp.norm, flash)
        else:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

            spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=m.padded_vocab_size,
            max_sequence_length=1 << 20,  # RoPE: positions are computed, not learned
            pre_process=first,
            post_process=last,
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(m.rope_theta),
            rope_scaling=m.rope_llama3_scaling,
            rope_scaling_factor=m.rope_scaling_factor,
            **({} if v is None else {"vp_stage": v}),
        )
        if first:
            emb = _swap_embedding(model)
            emb.impl, emb.into_main_grad = fp.embedding, fp.wgrad == "main_grad"
        if last:
            if type(model.output_layer) is not ColumnParallelLinear:
                raise TypeError(f"unexpected output layer class {type(model.output_layer).__name__}")
            model.output_layer.__class__ = SodaOutputLayer
            model.output_layer.defer_to_loss = fp.fused_output
        if m.fp8 != "none":
            fp8_linears(model)
        if cuda:
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks, path


def _swap_embedding(model: GPTModel) -> SodaEmbedding:
    """Re-class megatron's VocabParallelEmbedding in place: parameters, init and checkpoint keys stay."""
    emb = model.embedding.word_embeddings
    if type(emb) is not VocabParallelEmbedding:
        raise TypeError(f"unexpected embedding class {type(emb).__name__}")
    emb.__class__ = SodaEmbedding
    return emb


def local_vocab_range(m: ModelConfig) -> tuple[int, int]:
    """[start, end) of this TP rank's rows of the (padded) vocabulary."""
    per = m.padded_vocab_size // ps.get_tensor_model_parallel_world_size()
    start = per * ps.get_tensor_model_parallel_rank()
    return start, start + per
