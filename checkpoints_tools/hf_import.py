"""`soda import-hf`: a Hugging Face Qwen3 folder (or an exported SODA model) -> a megatron-core checkpoint.

The result is a weights-only distributed checkpoint plus its config, which `soda train
--checkpoint.init_from DIR` starts from under any TP/PP (dist_checkpointing reshards on load).
With `--tokenizer` (a SODA tokenizer) the vocabulary is resized to that layout: the text rows are
kept and the new delimiter and audio rows drawn from N(0, init_std) with a fixed seed, as the
paper's warm-start runs (Qwen3 + random audio embeddings) did.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_soda.checkpoints_tools.qwen3_mapping import from_hf, model_config_from_hf
from megatron_soda.config import SodaConfig, save_config


def _tensor_source(folder: Path):
    """name -> tensor, reading one safetensors file at a time (no full copy of the model in memory)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or {index.name}")
    handles = {}

    def get(name: str) -> torch.Tensor:
        if name not in weight_map:  # e.g. config.json says more layers than the weights hold
            raise ValueError(f"{folder}: tensor {name} missing: the weights do not match config.json")
        fname = weight_map[name]
        if fname not in handles:
            path = folder / fname
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard named in the index is missing")
            handles[fname] = safe_open(str(path), "pt")
        return handles[fname].get_tensor(name)

    return get


def import_hf(hf_dir: str, out_run: str, tokenizer: str | None = None, seed: int = 0, force: bool = False) -> dict:
    from transformers import AutoConfig

    from megatron_soda.checkpoints_tools.session import build_full_model, single_process
    from megatron_soda.tokenization.text_tokenizer import load_soda_tokenizer
    from megatron_soda.training.checkpoint import Checkpointer

    src = Path(hf_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no config.json (expected a Hugging Face model folder)")
    out = Path(out_run)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a run directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (pass --force to replace it)")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise ValueError(f"{out}: replacing it would delete the model being imported from {src}")
    model_type = json.loads((src / "config.json").read_text()).get("model_type")
    if model_type != "qwen3":
        raise ValueError(f"{src}: expected a Qwen3 checkpoint (model_type 'qwen3'), got {model_type!r}")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(src))
    except Exception as e:  # transformers validates the config with its own exception types
        raise ValueError(f"{src}/config.json: {str(e).strip().splitlines()[-1]}") from None
    m = model_config_from_hf(hf_cfg)
    hf_vocab = m.vocab_size
    if tokenizer:
        _, layout = load_soda_tokenizer(tokenizer)
        if layout.text_vocab_size > hf_vocab:
            raise ValueError(f"tokenizer {tokenizer} has {layout.text_vocab_size} text ids, the model only {hf_vocab}")
        m.vocab_size = layout.vocab_size
    get = _tensor_source(src)
    gen = torch.Generator().manual_seed(seed)

    def new_rows(n: int, d: int) -> torch.Tensor:
        return torch.randn(n, d, generator=gen) * m.init_std

    cfg = SodaConfig(model=m)
    cfg.run_dir = str(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with single_process():
        model = build_full_model(m)
        state = from_hf(get, m, m.padded_vocab_size, hf_vocab, new_rows)
        missing = set(model.state_dict()) - set(state) - {k for k in model.state_dict() if k.endswith("_extra_state")}
        if missing:
            raise RuntimeError(f"conversion left parameters unset: {sorted(missing)[:5]}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name])
        common = {"step": 0, "config": cfg.to_dict(), "imported_from": str(src.resolve())}
        Checkpointer(tmp, keep_last=1, async_save=False).save(0, [model], None, common)
    save_config(cfg, tmp / "config.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"checkpoint": str(out / "checkpoints"), "vocab": m.vocab_size, "resized_from": hf_vocab}


@dataclass
class ImportConfig:
    hf_dir: str = field(metadata={"positional": True})
    out: str = field(
        metadata={"positional": True, "help": "a run directory; its checkpoints/ is what --checkpoint.init_from takes"}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "resize the vocabulary to this SODA tokenizer's layout"}
    )
    seed: int = field(default=0, metadata={"help": "for the new vocabulary rows"})
    force: bool = False


def import_job(cfg: ImportConfig) -> dict:
    """`soda import-hf`: a Hugging Face Qwen3 folder -> a megatron checkpoint to start from (init_from)."""
    r = import_hf(cfg.hf_dir, cfg.out, cfg.tokenizer, cfg.seed, cfg.force)
    resized = f" (vocabulary {r['resized_from']} -> {r['vocab']})" if r["vocab"] != r["resized_from"] else ""
    print(
        f"imported {cfg.hf_dir} -> {r['checkpoint']}{resized}; "
        f"train from it with --checkpoint.init_from {r['checkpoint']}"
    )
    return r
