"""`soda finetune`: supervised fine-tuning = the training loop, started from pretrained weights, on
task shard sets whose loss masks keep the prompt out of the loss (`soda prepare --formats s2st,...`).

Everything of `soda train` carries over (parallel layouts, checkpoints, resume, logs). What differs:
the model section is the pretrained checkpoint's (a fine-tune cannot change the architecture), the
recipe defaults to the paper's S2ST SFT (configs/finetune-s2st.yaml), and the run warns when no
shard set carries a loss mask (then it would train on the prompts too, the paper's plain-LM variant).
"""

from __future__ import annotations

import logging
from pathlib import Path

from megatron_soda.config import ConfigError, SodaConfig, config_from_dict, load_config, save_config

log = logging.getLogger("soda.finetune")
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "finetune-s2st.yaml"


def finetune_config(init_from: str, config: str | None, overrides: list[str]) -> SodaConfig:
    from megatron_soda.tokenization.shard_format import read_index
    from megatron_soda.training import checkpoint as ckpt

    if any(o.startswith("--model.") for o in overrides):
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
    masked = []
    for p in cfg.data.paths:
        try:
            masked.append(read_index(p).rows == 2)
        except ValueError as e:
            raise ConfigError(f"data.paths: {e}") from None
    if cfg.data.paths and not any(masked):
        log.warning("no shard set in data.paths has loss masks: the loss covers prompts too (plain LM fine-tuning)")
    return cfg


def main(argv: list[str]) -> int:
    import argparse
    import sys

    from megatron_soda.training import spawn

    ap = argparse.ArgumentParser(
        prog="soda finetune",
        description="fine-tune a pretrained checkpoint (ours, or `soda import-hf` output) on task shard sets; "
        "--section.key value flags override the recipe as in `soda train`",
    )
    ap.add_argument("--init-from", required=True, help="pretrained run directory or checkpoint")
    ap.add_argument("--config", help=f"fine-tuning recipe (default {DEFAULT_RECIPE.name})")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--nproc", type=int, default=1)
    a, rest = ap.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = finetune_config(a.init_from, a.config, rest)
    except (ConfigError, FileNotFoundError) as e:
        print(f"soda finetune: error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(a.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run_dir = str(run_dir)
    recipe = run_dir / "finetune.yaml"
    save_config(cfg, recipe)
    return spawn.train(a.nproc, ["--config", str(recipe), "--run-dir", str(run_dir), "--device", a.device])
