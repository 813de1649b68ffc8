"""`soda finetune`: supervised fine-tuning = the training loop, started from pretrained weights, on
task shard sets whose loss masks keep the prompt out of the loss (`soda prepare --formats s2st,...`).

Everything of `soda train` carries over (parallel layouts, checkpoints, resume, logs). What differs:
the model section is the pretrained checkpoint's (a fine-tune cannot change the architecture, so
`--model.*` options do not exist here), the recipe defaults to the paper's S2ST SFT
(configs/finetune-s2st.yaml), and the run warns when no shard set carries a loss mask (then it would
train on the prompts too, the paper's plain-LM variant).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import ConfigError, Device, SodaConfig, config_from_dict, load_config, opt, validate

log = logging.getLogger("soda.finetune")
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "finetune-s2st.yaml"


@dataclass
class FinetuneCommand:
    init_from: str = field(
        metadata={"help": "pretrained run directory or checkpoint (ours, or `soda import-hf` output)"}
    )
    config: str | None = opt(None, f"fine-tuning recipe (default {DEFAULT_RECIPE.name})")
    device: Device = opt("auto", "cpu: megatron-core on gloo (fp32)")
    nproc: int = opt(1, "local ranks (started through torchrun)")


def finetune_config(init_from: str, config: str | None, overrides: dict) -> SodaConfig:
    from megatron_soda.tokenization.shard_format import read_index
    from megatron_soda.training import checkpoint as ckpt

    if "model" in overrides:
        raise ConfigError("--model.* cannot change in a fine-tune: the architecture is the pretrained checkpoint's")
    try:
        src = ckpt.resolve(init_from)
    except ckpt.CheckpointError as e:
        raise ConfigError(f"--init-from: {e}") from None
    common = ckpt.common_state(src)
    if "config" not in common:
        raise ConfigError(f"--init-from {src}: no model config inside (not written by megatron-soda or soda import-hf)")
    cfg = load_config(config or str(DEFAULT_RECIPE), overrides)
    cfg.model = config_from_dict(common["config"]).model
    cfg.checkpoint.init_from = str(src)
    masked = [read_index(p).rows == 2 for p in cfg.data.paths]
    if cfg.data.paths and not any(masked):
        log.warning("no shard set in data.paths has loss masks: the loss covers prompts too (plain LM fine-tuning)")
    return cfg


def finetune_job(cmd: FinetuneCommand, overrides: dict) -> int:
    """`soda finetune`: fine-tune a pretrained checkpoint (ours, or `soda import-hf` output) on task
    shard sets; --section.key flags override the recipe as in `soda train`."""
    from megatron_soda.training import spawn
    from megatron_soda.training.run_dir import check_run_dir

    if "run_dir" not in overrides:
        raise ConfigError("--run-dir: where the fine-tuned run goes is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = finetune_config(cmd.init_from, cmd.config, overrides)
    cfg.train.device = cmd.device
    validate(cfg, spawn.world_size(cmd.nproc))
    spawn.check_data(cfg)
    check_run_dir(Path(cfg.run_dir), cfg.checkpoint.resume)
    return spawn.start(cfg, cmd.nproc)
