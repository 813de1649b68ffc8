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

import yaml


class UserError(Exception):
    """An error the user can act on (a setting, a path, the data, a run that diverged): reported as
    one line naming what and where, without a traceback. Anything else is a bug and keeps its
    traceback, on every rank."""


# What a user can fix from the message alone (a setting, a path, the data): reported as one line by
# the CLI, every training rank and child processes. Anything else (RuntimeError, OSError ...) is a bug
# or a broken machine and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, FileExistsError)


class ConfigError(UserError, ValueError):
    """A configuration that cannot run: one line naming the key and what was expected."""


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # shard-set directories (outputs of `soda prepare`)
    val_paths: list[str] = field(default_factory=list)  # held-out shard sets for validation loss
    weights: list[float] | None = None  # sampling weights per path; default (said in the log): by size
    names: list[str] = field(default_factory=list)  # the sources the paths stand for (presets: the paper's mixture)
    seed: int = 1234
    num_workers: int = 2
    skip_corrupt: bool = False
    verify_checksums: bool = True  # each sample read is checked against its CRC-32 (soda bench loader: the cost)
    max_corrupt_fraction: float = 0.01  # with skip_corrupt: stop when more of the data read so far is corrupt
    blend_block: int = 4096  # mixture proportions are exact within every block of this many samples


@dataclass
class ModelConfig:
    name: str = "tiny"
    hidden_size: int = 64
    num_layers: int = 4
    num_attention_heads: int = 4
    num_query_groups: int = 2  # KV heads (GQA); = num_attention_heads for MHA
    head_dim: int = 16
    ffn_hidden_size: int = 128
    vocab_size: int = 144_644  # the token layout's; checked against the shards
    vocab_pad_multiple: int = 1024  # 128 x 8: any TP in {1, 2, 4, 8} splits it, so checkpoints reshard
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_llama3_scaling: bool = True  # factor 8, low 1, high 4, original 8192 (as SODA / Llama-3)
    rope_scaling_factor: float = 8.0
    init_std: float = 0.02
    init: str = "layout_invariant"  # layout_invariant: same weights under any TP/PP/DP | megatron: per-rank RNG
    transformer_impl: str = "auto"  # auto | transformer_engine | local
    attention_backend: str = "auto"  # auto | flash_attn | sdpa (local implementation only)
    embedding_impl: str = "auto"  # the embedding seam: torch | triton (fused kernel) | auto (triton on GPU)
    output_impl: str = (
        "auto"  # the output seam: torch (logits, then CE) | fused (Triton, chunked) | auto (fused on GPU)
    )
    ce_chunk_tokens: int = 4096  # tokens per chunk of the fused output layer (its peak logits memory)
    norm_impl: str = "auto"  # layer norms and QK-norm: torch | triton | auto (triton on GPU)
    rope_impl: str = "auto"  # rotary embedding: torch (megatron's unfused) | triton (one kernel) | auto
    wgrad_impl: str = "auto"  # weight gradients: torch | main_grad (GEMM accumulates into fp32 main_grad) | auto

    @property
    def padded_vocab_size(self) -> int:
        return int(math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # model chunks per pipeline rank: > 1 selects interleaved 1F1B
    sequence_parallel: bool = False
    distributed_optimizer: bool = False  # ZeRO-1 over DP
    overlap_grad_reduce: bool = False
    recompute: str = "none"  # none | selective | full
    cuda_graph: str = "auto"  # none | full_iteration (forward+backward of a step as one CUDA graph) | auto (GPU, PP 1)


@dataclass
class OptimConfig:
    lr: float | None = None  # peak LR; None: the paper's rule from batch and width (`paper_peak_lr`)
    lr_rule_width: int = 0  # the width in that rule (0: model.hidden_size; the paper's 135M run used 1024)
    min_lr: float = 0.0
    beta1: float = 0.98
    beta2: float = 0.98
    eps: float = 1e-16
    weight_decay: float = 0.033
    clip_grad: float = 1.0
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_fraction: float = 0.1
    decay_fraction: float = 0.2  # wsd: linear decay to min_lr over the last fraction of steps
    z_loss: float = 1e-4
    adam_impl: str = "auto"  # foreach (megatron's torch fallback) | fused (one kernel, no per-tensor syncs) | auto
    adamc: bool = True  # AdamC: weight decay follows lr / max_lr through the schedule (as the paper's runs)
    embedding_weight_decay: bool = False  # the paper decays no input embedding (the untied LM head is decayed)
    cautious: bool = False  # Cautious Adam (the paper's optimizer): drop update entries against the gradient's sign


@dataclass
class TrainConfig:
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 512
    steps: int = 1000
    seed: int = 1234
    device: str = "auto"  # auto | cuda | cpu
    log_interval: int = 1
    eval_interval: int = 0  # 0: no validation
    eval_batches: int = 4
    exit_interval: int = 0  # save and exit after every this many steps (job-length limits; resume continues)
    max_skipped_steps: int = 5  # consecutive non-finite steps before the run stops
    peak_tflops: float = 0.0  # per device, for MFU; 0: known GPUs are detected, else no MFU
    tensorboard: bool = True
    wandb_project: str = ""  # log to W&B too when set and wandb is installed
    debug_nan_steps: list[int] = field(default_factory=list)  # fault injection (1-based steps): NaN loss there


@dataclass
class CheckpointConfig:
    save_interval: int = 0  # 0: only at the end and on preemption
    keep_last: int = 3
    async_save: bool = False
    init_from: str = ""  # weights only (a fresh run starting from them)
    resume: bool = True  # continue from run_dir/checkpoints/latest when it exists


@dataclass
class SodaConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Speed switches: name -> (section, key, implementations with the fast one first); each also takes
# `auto` (megatron_soda/model/fast_paths.py resolves it per device).
IMPL_CHOICES = {
    "embedding": ("model", "embedding_impl", ("triton", "torch")),
    "output": ("model", "output_impl", ("fused", "torch")),
    "norm": ("model", "norm_impl", ("triton", "torch")),
    "rope": ("model", "rope_impl", ("triton", "torch")),
    "wgrad": ("model", "wgrad_impl", ("main_grad", "torch")),
    "adam": ("optim", "adam_impl", ("fused", "foreach")),
    "cuda_graph": ("parallel", "cuda_graph", ("full_iteration", "none")),
}


def impl_setting(cfg: SodaConfig, name: str) -> str:
    section, key, _ = IMPL_CHOICES[name]
    return getattr(getattr(cfg, section), key)


def check_impls(cfg: SodaConfig) -> None:
    for name, (section, key, options) in IMPL_CHOICES.items():
        value = impl_setting(cfg, name)
        if value not in ("auto", *options):
            raise ConfigError(f"{section}.{key}: expected auto, {' or '.join(options)}, got {value!r}")


def _check_type(value, tp, where: str):
    origin = typing.get_origin(tp)
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


def validate(cfg: SodaConfig, world_size: int, need_data: bool = True) -> int:
    """Every layout/shape error as one clear message before any work starts; returns the DP degree.
    `need_data=False` for jobs that feed their own batches (the benchmarks)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.transformer_impl not in ("auto", "transformer_engine", "local"):
        raise ConfigError(
            f"model.transformer_impl: expected auto, transformer_engine or local, got {m.transformer_impl!r}"
        )
    if m.attention_backend not in ("auto", "flash_attn", "sdpa"):
        raise ConfigError(f"model.attention_backend: expected auto, flash_attn or sdpa, got {m.attention_backend!r}")
    check_impls(cfg)
    if m.init not in ("layout_invariant", "megatron"):
        raise ConfigError(f"model.init: expected layout_invariant or megatron, got {m.init!r}")
    if p.recompute not in ("none", "selective", "full"):
        raise ConfigError(f"parallel.recompute: expected none, selective or full, got {p.recompute!r}")
    if cfg.optim.schedule not in ("wsd", "cosine", "constant"):
        raise ConfigError(f"optim.schedule: expected wsd, cosine or constant, got {cfg.optim.schedule!r}")
    if t.device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"train.device: expected auto, cuda or cpu, got {t.device!r}")
    if min(p.tp, p.pp, p.vpp) < 1:
        raise ConfigError("parallel.tp, parallel.pp and parallel.vpp must be >= 1")
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
    if world_size % (p.tp * p.pp):
        raise ConfigError(f"world size {world_size} is not divisible by tp {p.tp} x pp {p.pp}")
    dp = world_size // (p.tp * p.pp)
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
    if p.sequence_parallel and t.seq_length % p.tp:
        raise ConfigError(f"train.seq_length {t.seq_length} is not divisible by parallel.tp {p.tp} (sequence parallel)")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} is not divisible by "
            f"micro_batch_size {t.micro_batch_size} x data-parallel size {dp}"
        )
    if p.vpp > 1 and (t.global_batch_size // (t.micro_batch_size * dp)) % p.pp:
        raise ConfigError("interleaved pipeline: micro-batches per step must be a multiple of parallel.pp")
    if t.steps < 1:
        raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(
            f"checkpoint.keep_last must be >= 1 (the checkpoint a resume needs), got {cfg.checkpoint.keep_last}"
        )
    if cfg.optim.lr is None or cfg.optim.lr < 0 or cfg.optim.min_lr < 0:
        raise ConfigError(f"optim.lr and optim.min_lr must be >= 0, got {cfg.optim.lr} and {cfg.optim.min_lr}")
    if cfg.optim.cautious and (p.tp > 1 or p.distributed_optimizer):
        raise ConfigError(
            "optim.cautious rescales each tensor by its mask's mean, which needs whole tensors: "
            "use it with parallel.tp 1 and parallel.distributed_optimizer false"
        )
    if need_data and not cfg.data.paths:
        raise ConfigError("data.paths: no training shard sets given")
    return dp
