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
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding
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


class SDPAttention(MegatronModule):
    """Causal core attention through torch SDPA (flash / cuDNN / memory-efficient kernels on GPU,
    the math kernel on CPU), or flash-attn's kernel when installed and asked for."""

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
        if self.use_flash_attn and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, h, d]
            out = _flash_attn()(q, k, v, dropout_p=p, softmax_scale=self.scale, causal=True)
            out = out.transpose(0, 1)
        else:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
            gqa = q.shape[1] != k.shape[1]
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.scale, enable_gqa=gqa)
            out = out.permute(2, 0, 1, 3)
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


def layer_impl(m: ModelConfig, cuda: bool) -> str:
    if m.transformer_impl == "transformer_engine":
        if not (_have_te() and cuda):
            raise ConfigError("model.transformer_impl transformer_engine needs Transformer Engine and a GPU")
        return "transformer_engine"
    if m.transformer_impl == "auto" and _have_te() and cuda:
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
    impl = layer_impl(m, cuda)
    flash = False
    if impl == "local":
        want_flash = m.attention_backend in ("auto", "flash_attn")
        flash = want_flash and cuda and _flash_attn() is not None
        if m.attention_backend == "flash_attn" and not flash:
            raise ConfigError("model.attention_backend flash_attn needs flash-attn and a GPU")
        path = "local spec, " + ("flash-attn" if flash else "torch SDPA") + " attention"
    else:
        path = "Transformer Engine spec"
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
