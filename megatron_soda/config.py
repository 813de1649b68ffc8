"""Typed run configuration: dataclasses, filled from a YAML preset and `--section.key value` overrides.

Unknown keys and wrongly typed values are rejected with the dotted name, before any process starts;
the resolved config is saved beside every checkpoint so a run can always be reproduced or resumed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml


class UserError(Exception):
    """An error the user can act on (a setting, a path, the data, a run that diverged): reported as
    one line naming what and where, without a traceback, by `report_error`. Anything else is a bug
    and keeps its traceback, on the rank that hit it."""


# What a user can fix from the message alone. Deliberately only UserError: a ValueError or an
# OSError that no code of ours raised on purpose is a bug (or a broken machine) and keeps its
# traceback; every error we raise for bad input subclasses UserError.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)


class ConfigError(UserError, ValueError):
    """A configuration that cannot run: one line naming the key and what was expected."""


def report_error(error: BaseException, prog: str, rank: int | None = None) -> int:
    """The one error printer of every entry point (CLI, training ranks, child processes): a
    UserError is one line (prefixed with the rank when there are several), an interrupt one line,
    anything else its traceback; returns the exit code (2 user error, 130 interrupt, 1 bug).
    SODA_DEBUG=1 keeps the traceback of user errors too."""
    import os
    import sys
    import traceback

    where = f"[rank {rank}] " if rank is not None else ""
    if isinstance(error, KeyboardInterrupt):
        print(f"{where}{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    full = no_space_error(error)
    if isinstance(error, USER_ERRORS) or full is not None:
        if os.environ.get("SODA_DEBUG"):
            traceback.print_exception(error)
        text = (
            error if full is None else f"no space left on device writing {full.filename or 'a file'} ({full.strerror})"
        )
        # several ranks share a terminal: start a line of our own, whatever another rank's progress bar left
        print(f"{chr(10) if where else ''}{where}{prog}: error: {text}", file=sys.stderr, flush=True)
        return 2
    text = "".join(traceback.format_exception(error))
    print("".join(f"{where}{line}\n" for line in text.rstrip().splitlines()), end="", file=sys.stderr, flush=True)
    return 1


def no_space_error(error: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind `error`, if a full disk or quota is what failed (a user
    can act on that: one line, not a traceback)."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


def opt(default, help: str = "", **meta):
    """A config field with its help text (shown by `soda train --help`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


Device = Literal["auto", "cuda", "cpu"]


@dataclass
class MixtureStage:
    """One stage of a staged mixture: `weights` (one per data.paths entry) until step `until_step`."""

    until_step: int = opt(0, "the stage ends after this step")
    weights: list[float] = opt([], "sampling weight per data.paths entry")


@dataclass
class DataConfig:
    paths: list[str] = opt([], "shard-set directories (outputs of `soda prepare`)")
    val_paths: list[str] = opt([], "held-out shard sets for the validation loss")
    weights: list[float] | None = opt(None, "sampling weight per path; default (said in the log): by size")
    stages: list[MixtureStage] = opt(
        [], "a staged mixture: [{until_step: N, weights: [...]}, ...] in order; after the last, its weights go on"
    )
    names: list[str] = opt([], "the sources the paths stand for (presets: the paper's mixture)")
    seed: int = opt(1234, "seed of the mixture and the per-set shuffles")
    num_workers: int = opt(2, "DataLoader worker processes per rank")
    skip_corrupt: bool = opt(False, "mask corrupt samples (counted) instead of stopping")
    verify_checksums: bool = opt(True, "check each sample read against its CRC-32")
    max_corrupt_fraction: float = opt(0.01, "with skip_corrupt: stop when more of the data read so far is corrupt")
    blend_block: int = opt(4096, "mixture proportions are exact within every block of this many samples")
    cache_dir: str = opt(
        "", "local cache of shards read from s3:// / gs:// / hf:// (default: a folder in the temp dir)"
    )
    cache_gb: float = opt(20.0, "size of that cache; what the next steps need is never evicted")
    prefetch_steps: int = opt(4, "steps of samples fetched ahead from object storage (the order is known in advance)")


@dataclass
class ModelConfig:
    name: str = opt("tiny", "the model's name in logs and exports")
    hidden_size: int = opt(64)
    num_layers: int = opt(4)
    num_attention_heads: int = opt(4)
    num_query_groups: int = opt(2, "KV heads (GQA); = num_attention_heads for MHA")
    head_dim: int = opt(16)
    ffn_hidden_size: int = opt(128)
    vocab_size: int = opt(144_644, "the token layout's size, checked against the shards; 0: take it from them")
    vocab_pad_multiple: int = opt(1024, "128 x 8: any TP in {1, 2, 4, 8} splits it, so checkpoints reshard")
    tie_embeddings: bool = opt(False)
    norm_eps: float = opt(1e-5)
    rope_theta: float = opt(500_000.0)
    rope_llama3_scaling: bool = opt(True, "Llama-3 RoPE scaling (factor, low 1, high 4, original 8192), as SODA")
    rope_scaling_factor: float = opt(8.0)
    init_std: float = opt(0.02)
    init: Literal["layout_invariant", "megatron"] = opt(
        "layout_invariant", "layout_invariant: the same weights under any TP/PP/DP; megatron: per-rank RNG"
    )
    transformer_impl: Literal["auto", "transformer_engine", "local"] = opt("auto", "layer implementation")
    attention_backend: Literal["auto", "flash_attn", "sdpa"] = opt("auto", "attention kernel (local layers)")
    # speed switches (SWITCHES below): auto, the fast implementation, the torch reference
    embedding_impl: Literal["auto", "triton", "torch"] = opt("auto", "input embedding: triton is the fused kernel")
    output_impl: Literal["auto", "fused", "torch", "blockwise"] = opt(
        "auto",
        "output layer + CE: fused (Triton, chunked, no full logits), torch (logits, then CE) or blockwise "
        "(Triton, no logits in memory at all; opt-in until measured on a GPU)",
    )
    ce_chunk_tokens: int = opt(4096, "tokens per chunk of the fused output layer (its peak logits memory)")
    ce_filter_eps: float = opt(
        0.0,
        "output_impl blockwise: skip backward tiles whose softmax-minus-one-hot entries are all below this "
        "(cut-cross-entropy's filtering, an approximation; its bf16 default is 2**-12 = 0.000244); 0: exact",
    )
    norm_impl: Literal["auto", "triton", "torch"] = opt("auto", "layer norms and QK-norm")
    rope_impl: Literal["auto", "triton", "torch"] = opt("auto", "rotary embedding: triton is one kernel")
    wgrad_impl: Literal["auto", "main_grad", "torch"] = opt(
        "auto", "weight gradients: main_grad accumulates the GEMM into megatron's fp32 main_grad"
    )
    fp8: Literal["none", "tensorwise"] = opt(
        "none", "tensorwise: QKV / projection / MLP matmuls in FP8 (e4m3 forward, e5m2 gradients), GPU, opt-in"
    )

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple)


@dataclass
class ParallelConfig:
    tp: int = opt(1, "tensor-parallel degree")
    pp: int = opt(1, "pipeline-parallel degree")
    vpp: int = opt(1, "model chunks per pipeline rank: > 1 selects interleaved 1F1B")
    cp: int = opt(1, "context-parallel degree: each sequence split over this many ranks (long context)")
    sequence_parallel: bool = opt(False, "shard activations over TP between the tensor-parallel regions")
    distributed_optimizer: bool = opt(False, "ZeRO-1: optimizer state sharded over DP")
    overlap_grad_reduce: bool = opt(False, "overlap the DP gradient reduction with backward")
    recompute: Literal["none", "selective", "full"] = opt("none", "activation recomputation")
    cuda_graph: Literal["auto", "full_iteration", "none"] = opt(
        "auto", "full_iteration: a step's forward+backward as one CUDA graph (auto: GPU, small models, PP 1)"
    )


@dataclass
class OptimConfig:
    lr: float | None = opt(None, "peak LR; unset: the paper's rule from batch and width (logged)")
    lr_rule_width: int = opt(0, "the width in the LR rule (0: model.hidden_size; the paper's 135M run used 1024)")
    min_lr: float = opt(0.0)
    beta1: float = opt(0.98)
    beta2: float = opt(0.98)
    eps: float = opt(1e-16)
    weight_decay: float = opt(0.033)
    clip_grad: float = opt(1.0, "gradient-norm clipping (0: off)")
    schedule: Literal["wsd", "cosine", "constant"] = opt("wsd", "LR schedule")
    warmup_fraction: float = opt(0.1)
    decay_fraction: float = opt(0.2, "wsd: linear decay to min_lr over the last fraction of steps")
    decay_steps: int = opt(0, "wsd: decay over this many last steps instead (an anneal of a branch: its own steps)")
    z_loss: float = opt(1e-4)
    adam_impl: Literal["auto", "fused", "foreach"] = opt(
        "auto", "fused: one kernel, no per-tensor syncs; foreach: megatron's torch fallback"
    )
    adamc: bool = opt(True, "AdamC: weight decay follows lr / max_lr through the schedule (as the paper's runs)")
    embedding_weight_decay: bool = opt(False, "decay the input embedding too (the paper does not)")
    cautious: bool = opt(False, "Cautious Adam: drop update entries against the gradient's sign")


@dataclass
class TrainConfig:
    seq_length: int = opt(4096)
    micro_batch_size: int = opt(1)
    global_batch_size: int = opt(512)
    steps: int = opt(1000)
    seed: int = opt(1234)
    device: Device = opt("auto", "cpu: megatron-core on gloo (fp32); auto: cuda when torch sees a GPU")
    log_interval: int = opt(1)
    eval_interval: int = opt(0, "steps between validations (0: none)")
    eval_batches: int = opt(4, "global batches per validation")
    position_bucket: int = opt(4096, "the validation loss is also reported per range of this many token positions")
    exit_interval: int = opt(0, "save and exit after every this many steps (job-length limits; resume continues)")
    max_skipped_steps: int = opt(5, "consecutive non-finite steps before the run stops")
    hang_timeout_s: float = opt(
        1800.0, "a rank that finishes no step in this long dumps its stacks to RUN_DIR/hang/ and exits (0: off)"
    )
    straggler_interval: int = opt(100, "steps between reports of the slowest rank (0: off)")
    peak_tflops: float = opt(0.0, "per device, for MFU; 0: known GPUs are detected, else no MFU")
    tensorboard: bool = opt(True)
    wandb_project: str = opt("", "log to W&B too when set and wandb is installed")
    debug_nan_steps: list[int] = opt([], "fault injection (1-based steps): a NaN loss there")
    debug_slow_rank: list[float] = opt([], "fault injection: [rank, seconds] that rank sleeps in every step")
    comm_stats: bool = opt(False, "count the bytes each process group moves per step into RUN_DIR/comm/rank<R>.jsonl")


@dataclass
class CheckpointConfig:
    save_interval: int = opt(0, "steps between saves (0: only at the end and on preemption)")
    keep_last: int = opt(3)
    async_save: bool = opt(False)
    init_from: str = opt("", "weights only, from a checkpoint of any layout (a fresh run starting from them)")
    branch_from: str = opt(
        "",
        "a new run from another run's checkpoint (RUN or RUN/checkpoints/iter_N): weights, optimizer state, step",
    )
    hf_interval: int = opt(
        0, "steps between Hugging Face snapshots of the run (RUN_DIR/hf/step_N, exported in the background)"
    )
    resume: bool = opt(True, "continue from run_dir/checkpoints/latest when it exists")


@dataclass
class DownstreamConfig:
    """Downstream scores during training (`soda eval`'s tasks, scored by the training ranks)."""

    interval: int = opt(0, "steps between downstream evaluations on the training ranks (0: none)")
    tasks: list[str] = opt([], "KIND:FILE.jsonl task files, as `soda eval --task` takes them")
    max_items: int = opt(0, "score at most this many items of each task (0: all)")


@dataclass
class SodaConfig:
    run_dir: str = opt("runs/default", "checkpoints, config, TensorBoard logs and metrics.jsonl go here")
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: DownstreamConfig = field(default_factory=DownstreamConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# cut-cross-entropy's default gradient filter in bf16 (its filter_eps "auto"), for model.ce_filter_eps
CCE_FILTER_EPS = 2**-12

# Speed switches: name -> (section, key). Each field's Literal type lists `auto`, then the fast
# implementation, then the torch reference, then any opt-in alternatives (picked only by name);
# megatron_soda/model/fast_paths.py resolves `auto`.
SWITCHES = {
    "embedding": ("model", "embedding_impl"),
    "output": ("model", "output_impl"),
    "norm": ("model", "norm_impl"),
    "rope": ("model", "rope_impl"),
    "wgrad": ("model", "wgrad_impl"),
    "adam": ("optim", "adam_impl"),
    "cuda_graph": ("parallel", "cuda_graph"),
}


def switch_options(name: str) -> tuple[str, str]:
    """(fast, reference) implementation of speed switch `name`, from its field's Literal type."""
    section, key = SWITCHES[name]
    cls = type(getattr(SodaConfig(), section))
    auto, fast, reference, *_opt_in = typing.get_args(typing.get_type_hints(cls)[key])
    return fast, reference


def switch_setting(cfg: SodaConfig, name: str) -> str:
    section, key = SWITCHES[name]
    return getattr(getattr(cfg, section), key)


def num_micro_batches(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches per rank and step: the one place the global batch is divided (the loader
    yields that many per step; `validate` refuses a batch that does not divide)."""
    if global_batch_size % (micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size {global_batch_size} is not divisible by "
            f"micro_batch_size {micro_batch_size} x data-parallel size {dp}"
        )
    return global_batch_size // (micro_batch_size * dp)


MAX_MICRO_BATCHES = 1 << 20  # per rank and step: more is a typo (global_batch_size 2**40), not a run
MAX_STATE_BYTES = 1 << 44  # 16 TiB of training state per rank: no device or host holds a model that large


def model_state_bytes(m: ModelConfig, model_parallel: int) -> float:
    """Weights, gradients and Adam state per rank at 16 bytes per parameter: the parameters counted
    from the shape alone (matmuls, norms, both embeddings), split over TP x PP."""
    attn = m.hidden_size * m.head_dim * (2 * m.num_attention_heads + 2 * m.num_query_groups)
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    params = m.num_layers * (attn + mlp) + 2 * m.hidden_size * m.padded_vocab_size
    return 16.0 * params / model_parallel


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """world = TP x PP x CP x DP."""
    model = parallel.tp * parallel.pp * parallel.cp
    if world_size % model:
        cp = f" x cp {parallel.cp}" if parallel.cp > 1 else ""
        raise ConfigError(f"world size {world_size} is not divisible by tp {parallel.tp} x pp {parallel.pp}{cp}")
    return world_size // model


def _check_type(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            names = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
            raise ConfigError(f"{where}: expected {names}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-2" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if dataclasses.is_dataclass(tp):  # a section inside a list (data.stages): a mapping of its fields
        if isinstance(value, tp):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
        obj = tp()
        _fill(obj, value, f"{where}.")
        return obj
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _fill(obj, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{where}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}' is a section, expected a mapping")
            _fill(current, value, f"{where}.")
        else:
            setattr(obj, key, _check_type(value, hints[key], where))


def parse_overrides(args: list[str]) -> dict:
    """['--model.hidden_size', '512', '--train.steps=10'] -> nested dict; values parsed as YAML."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (overrides look like --section.key value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            value, i = args[i + 1], i + 1
        i += 1
        node = out
        parts = key.replace("-", "_").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    return out


def check_overrides(values: dict) -> None:
    """Unknown keys and wrongly typed values of a nested override dict, as a ConfigError."""
    _fill(SodaConfig(), values, "")


def config_from_dict(values: dict) -> SodaConfig:
    """A config saved with a checkpoint (`SodaConfig.to_dict()`) back to its dataclasses."""
    cfg = SodaConfig()
    _fill(cfg, values, "")
    return _resolve(cfg)


def quiet_library_warnings() -> None:
    """The one place that silences what a user cannot act on: megatron-core's (and its bundled
    megatron_fsdp's) import-time notes that TE / apex are missing (the torch fallbacks are intended),
    its CUDA-only settings on the CPU backend, and deprecations inside libraries."""
    import logging
    import warnings

    for module in (r"megatron\.core.*", r"megatron_fsdp.*", r"megatron\.core\.distributed\.fsdp.*"):
        warnings.filterwarnings("ignore", module=module)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("megatron.core.distributed.fsdp", "megatron_fsdp"):  # "Using Megatron-FSDP without TE"
        logging.getLogger(name).setLevel(logging.WARNING)


def paper_peak_lr(cfg: SodaConfig) -> float:
    """The SODA recipe's peak LR: 0.003 x sqrt(batch / 256) x sqrt(1024 / width), with the width
    `optim.lr_rule_width` (the 135M run set it to 1024 to keep its LR from getting too high)."""
    width = cfg.optim.lr_rule_width or cfg.model.hidden_size
    return 0.003 * math.sqrt(cfg.train.global_batch_size / 256) * math.sqrt(1024 / width)


def _resolve(cfg: SodaConfig) -> SodaConfig:
    if cfg.optim.lr is None:  # resolved once the batch and width are known, and saved as a number
        cfg.optim.lr = round(paper_peak_lr(cfg), 8)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> SodaConfig:
    cfg = SodaConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: expected a mapping of sections")
        _fill(cfg, values, "")
    if overrides:
        _fill(cfg, overrides if isinstance(overrides, dict) else parse_overrides(overrides), "")
    return _resolve(cfg)


def save_config(cfg: SodaConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def check_types(obj, prefix: str = "") -> None:
    """Every field of a config (and its sections) against its annotation: what `load_config`
    checks on the way in, again for a config changed in code."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_types(value, f"{prefix}{f.name}.")
        else:
            _check_type(value, hints[f.name], f"{prefix}{f.name}")


def validate(cfg: SodaConfig, world_size: int, need_data: bool = True) -> int:
    """Every layout/shape error as one clear message before any work starts; returns the DP degree.
    `need_data=False` for jobs that feed their own batches (the benchmarks)."""
    check_types(cfg)
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    if min(p.tp, p.pp, p.vpp, p.cp) < 1:
        raise ConfigError("parallel.tp, parallel.pp, parallel.vpp and parallel.cp must be >= 1")
    for where, value in (
        ("model.hidden_size", m.hidden_size),
        ("model.num_layers", m.num_layers),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.num_query_groups", m.num_query_groups),
        ("model.head_dim", m.head_dim),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("train.seq_length", t.seq_length),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.global_batch_size", t.global_batch_size),
    ):
        if value < 1:
            raise ConfigError(f"{where} must be >= 1, got {value}")
    dp = data_parallel_size(p, world_size)
    if m.num_attention_heads % p.tp or m.num_query_groups % p.tp:
        raise ConfigError(
            f"model.num_attention_heads {m.num_attention_heads} and num_query_groups {m.num_query_groups} "
            f"must be divisible by parallel.tp {p.tp}"
        )
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads {m.num_attention_heads} is not a multiple of "
            f"num_query_groups {m.num_query_groups}"
        )
    if m.num_layers % (p.pp * p.vpp):
        raise ConfigError(
            f"model.num_layers {m.num_layers} is not divisible by parallel.pp {p.pp} x parallel.vpp {p.vpp}"
        )
    if p.vpp > 1 and p.pp == 1:
        raise ConfigError("parallel.vpp > 1 (interleaved pipeline) needs parallel.pp > 1")
    if m.ffn_hidden_size % p.tp:
        raise ConfigError(f"model.ffn_hidden_size {m.ffn_hidden_size} is not divisible by parallel.tp {p.tp}")
    if m.vocab_pad_multiple % (128 * p.tp):
        raise ConfigError(
            f"model.vocab_pad_multiple {m.vocab_pad_multiple} is not a multiple of 128 x parallel.tp {p.tp}"
        )
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")
    if p.cp > 1 and t.seq_length % (2 * p.cp):
        raise ConfigError(
            f"train.seq_length {t.seq_length} is not divisible by 2 x parallel.cp {p.cp}: each context-parallel rank "
            "holds two of 2 x CP equal chunks (one early, one late: causal attention's work balanced)"
        )
    if p.sequence_parallel and (t.seq_length // p.cp) % p.tp:
        where = (
            f"train.seq_length {t.seq_length} / parallel.cp {p.cp}" if p.cp > 1 else f"train.seq_length {t.seq_length}"
        )
        raise ConfigError(f"{where} is not divisible by parallel.tp {p.tp} (sequence parallel)")
    if p.cp > 1 and m.transformer_impl == "transformer_engine":
        raise ConfigError(
            "parallel.cp > 1 runs in our own attention (all-gathered K/V); model.transformer_impl transformer_engine "
            "has its own, untested here: use local or auto"
        )
    if p.cp > 1 and p.cuda_graph == "full_iteration":
        raise ConfigError("parallel.cp > 1 with parallel.cuda_graph full_iteration is untested: use none or auto")
    micro = num_micro_batches(t.global_batch_size, t.micro_batch_size, dp)
    if micro > MAX_MICRO_BATCHES:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size}: {micro:,} micro-batches per rank and step "
            f"(at most {MAX_MICRO_BATCHES:,}); raise train.micro_batch_size or lower the global batch"
        )
    state = model_state_bytes(m, p.tp * p.pp)
    if state > MAX_STATE_BYTES:
        raise ConfigError(
            f"model {m.hidden_size} wide x {m.num_layers} layers: ~{state / 2**40:,.0f} TiB of weights, gradients "
            "and Adam state per rank (16 bytes per parameter): not a model any machine holds; check model.*"
        )
    if p.vpp > 1 and micro % p.pp:
        raise ConfigError("interleaved pipeline: micro-batches per step must be a multiple of parallel.pp")
    if t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    if t.debug_slow_rank and len(t.debug_slow_rank) != 2:
        raise ConfigError(f"train.debug_slow_rank: expected [rank, seconds], got {t.debug_slow_rank}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(
            f"checkpoint.keep_last must be >= 1 (the checkpoint a resume needs), got {cfg.checkpoint.keep_last}"
        )
    for where, value in (("optim.warmup_fraction", o.warmup_fraction), ("optim.decay_fraction", o.decay_fraction)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{where} must be in [0, 1], got {value}")
    if o.decay_steps < 0 or o.decay_steps > t.steps:
        raise ConfigError(f"optim.decay_steps {o.decay_steps}: expected 0..train.steps ({t.steps})")
    if cfg.checkpoint.branch_from and cfg.checkpoint.init_from:
        raise ConfigError(
            "checkpoint.branch_from and checkpoint.init_from: give one (a branch takes weights, optimizer and step; "
            "init_from weights only)"
        )
    if o.schedule == "wsd" and not o.decay_steps and o.warmup_fraction + o.decay_fraction > 1:
        raise ConfigError(
            f"optim.warmup_fraction {o.warmup_fraction} + optim.decay_fraction {o.decay_fraction} exceed the run "
            "(their sum must be <= 1)"
        )
    if o.lr is None or not (math.isfinite(o.lr) and math.isfinite(o.min_lr)) or o.lr < 0 or o.min_lr < 0:
        raise ConfigError(f"optim.lr and optim.min_lr must be finite and >= 0, got {o.lr} and {o.min_lr}")
    if o.cautious and (p.tp > 1 or p.distributed_optimizer):
        raise ConfigError(
            "optim.cautious rescales each tensor by its mask's mean, which needs whole tensors: "
            "use it with parallel.tp 1 and parallel.distributed_optimizer false"
        )
    if not (0 <= m.ce_filter_eps < 1):
        raise ConfigError(f"model.ce_filter_eps must be in [0, 1), got {m.ce_filter_eps}")
    if m.ce_filter_eps and m.output_impl != "blockwise":
        raise ConfigError(
            f"model.ce_filter_eps {m.ce_filter_eps} filters the blockwise kernel's backward: it needs "
            f"model.output_impl blockwise (got {m.output_impl})"
        )
    if need_data and not cfg.data.paths:
        raise ConfigError("data.paths: no training shard sets given")
    last = 0
    for i, st in enumerate(cfg.data.stages):
        if st.until_step <= last:
            raise ConfigError(
                f"data.stages[{i}].until_step {st.until_step}: stages must end in increasing steps, after {last}"
            )
        if need_data and len(st.weights) != len(cfg.data.paths):
            raise ConfigError(
                f"data.stages[{i}].weights has {len(st.weights)} weights for {len(cfg.data.paths)} data.paths "
                "(one per shard set, in their order)"
            )
        last = st.until_step
    return dp
