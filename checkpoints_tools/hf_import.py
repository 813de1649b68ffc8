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
from typing import TYPE_CHECKING

from megatron_soda.checkpoints_tools.qwen3_mapping import from_hf, hf_shapes, model_config_from_hf
from megatron_soda.config import SodaConfig, UserError, save_config

if TYPE_CHECKING:
    import torch


# safetensors dtype names of floating-point tensors: the only weights a model is made of (an int64
# or bool tensor under a weight's name is not one, whatever a cast would make of it)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> the safetensors file of the folder holding it."""
    from safetensors import SafetensorError, safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{index}: not a safetensors index (a JSON object with a 'weight_map')") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: 'weight_map' must map tensor names to file names")
        return weight_map
    if (folder / "model.safetensors").is_file():
        try:
            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                return {k: "model.safetensors" for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise UserError(f"{folder / 'model.safetensors'}: not a readable safetensors file ({e})") from None
    raise UserError(f"{folder}: no model.safetensors or {index.name}")


def check_weights(folder: Path, weight_map: dict[str, str], expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the conversion reads is there, of the shape config.json implies and floating
    point, from the safetensors headers alone (no tensor data is read): copying a [1] or [1, d]
    tensor into its parameter would broadcast, an integer one would be cast, and a config.json
    that claims a larger model than its weights would be built (allocated) first."""
    from safetensors import SafetensorError, safe_open

    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for fname in sorted({weight_map[n] for n in expected if n in weight_map}):
        path = folder / fname
        if not path.is_file():
            raise UserError(f"{path}: shard named in the index is missing")
        try:
            with safe_open(str(path), "pt") as f:
                present = set(f.keys())
                for name in expected:
                    if weight_map.get(name) == fname and name in present:
                        piece = f.get_slice(name)
                        headers[name] = (tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    for name, shape in expected.items():
        if name not in headers:  # e.g. config.json says more layers than the weights hold
            raise UserError(f"{folder}: tensor {name} missing: the weights do not match config.json")
        got, dtype = headers[name]
        if got != shape:
            raise UserError(
                f"{folder}: tensor {name} has shape {list(got)}, config.json implies {list(shape)}: "
                "the weights do not match config.json"
            )
        if dtype not in FLOAT_DTYPES:
            raise UserError(f"{folder}: tensor {name} is {dtype}, expected floating-point weights (F32, BF16, F16)")


def _tensor_source(folder: Path, weight_map: dict[str, str]):
    """name -> tensor, reading one safetensors file at a time (no full copy of the model in memory)."""
    from safetensors import safe_open

    handles = {}

    def get(name: str) -> torch.Tensor:
        fname = weight_map[name]
        if fname not in handles:
            handles[fname] = safe_open(str(folder / fname), "pt")
        return handles[fname].get_tensor(name)

    return get


def import_hf(hf_dir: str, out_run: str, tokenizer: str | None = None, seed: int = 0, force: bool = False) -> dict:
    src = Path(hf_dir)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json (expected a Hugging Face model folder)")
    out = Path(out_run)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a run directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty (pass --force to replace it)")
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise UserError(f"{out}: replacing it would delete the model being imported from {src}")
    try:
        model_type = json.loads((src / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise UserError(f"{src}/config.json: not a JSON object") from None
    if model_type != "qwen3":
        raise UserError(f"{src}: expected a Qwen3 checkpoint (model_type 'qwen3'), got {model_type!r}")

    import torch  # only now: every refusal above is instant
    from transformers import AutoConfig

    from megatron_soda.checkpoints_tools.session import build_full_model, single_process
    from megatron_soda.tokenization.text_tokenizer import load_soda_tokenizer
    from megatron_soda.training.checkpoint import Checkpointer

    try:
        hf_cfg = AutoConfig.from_pretrained(str(src))
    except Exception as e:  # transformers validates the config with its own exception types
        raise UserError(f"{src}/config.json: {str(e).strip().splitlines()[-1]}") from None
    m = model_config_from_hf(hf_cfg)
    hf_vocab = m.vocab_size
    weight_map = _weight_map(src)
    check_weights(src, weight_map, hf_shapes(m, hf_vocab))  # before anything of the model's size exists
    if tokenizer:
        _, layout = load_soda_tokenizer(tokenizer)
        if layout.text_vocab_size > hf_vocab:
            raise UserError(f"tokenizer {tokenizer} has {layout.text_vocab_size} text ids, the model only {hf_vocab}")
        m.vocab_size = layout.vocab_size
    get = _tensor_source(src, weight_map)
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
                if state[name].shape != p.shape:  # copy_ would broadcast; check_weights saw the HF side
                    raise RuntimeError(f"conversion made {name} {list(state[name].shape)}, expected {list(p.shape)}")
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
