"""`soda export-hf`: a megatron-core distributed checkpoint (any layout) -> a Hugging Face folder.

The folder loads offline with `AutoModelForCausalLM` / `AutoTokenizer` as `Qwen3ForCausalLM` with the
extended SODA tokenizer, like the released SODA models. It is written under a temporary name and
renamed when complete, so an interrupted export never leaves a half-written folder. `--verify`
proves the conversion on the spot: logits of both implementations on fresh random sequences and a
greedy continuation, compared.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.checkpoints_tools.qwen3_mapping import hf_config, to_hf
from megatron_soda.config import USER_ERRORS, UserError, config_from_dict, report_error
from megatron_soda.model.flops import param_counts
from megatron_soda.parallel.processes import pid_alive

SAFETENSORS_INDEX = "model.safetensors.index.json"


def _find_tokenizer(explicit: str | None, cfg) -> Path | None:
    if explicit:
        return Path(explicit)
    for p in cfg.data.paths:
        cand = Path(p) / "tokenizer"
        if (cand / "tokenizer.json").is_file():
            return cand
    return None


def training_codec(cfg) -> str | None:
    """The codec the training shards were tokenized with (what generation must decode with)."""
    from megatron_soda.tokenization.shard_format import ShardFormatError, read_index

    for p in cfg.data.paths:
        try:
            return read_index(p).meta.get("codec", {}).get("name")
        except ShardFormatError:
            continue
    return None


def write_safetensors(tensors, out: Path, max_shard_bytes: int) -> dict:
    """Shard by size in the given order, one shard in memory at a time; returns the weight map."""
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
        if size >= max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        try:
            save_file({k: v.contiguous() for k, v in shard.items()}, str(out / fname), metadata={"format": "pt"})
        except Exception as e:  # safetensors' Rust error carries the OS error only in its text
            # ENOSPC, EDQUOT: "(os error 28)" in safetensors 0.5+, "Os { code: 28, ..." before
            full = re.search(r"os error (28|122)\)|Os \{ code: (28|122),", str(e))
            if full is None:
                raise
            code = errno.ENOSPC if "28" in (full.group(1), full.group(2)) else errno.EDQUOT
            raise OSError(code, os.strerror(code), str(out / fname)) from e
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    if len(shards) > 1:
        (out / SAFETENSORS_INDEX).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1)
        )
    return weight_map


def _model_card(cfg, common: dict, counts: dict, source: Path) -> str:
    m, t = cfg.model, cfg.train
    seen = int(common.get("data", {}).get("consumed_samples", 0)) * t.seq_length
    return f"""---
library_name: transformers
tags: [audio, speech, soda, mimi, qwen3]
---
# {m.name} (SODA-style discrete audio foundation model)

Exported by megatron-soda from `{source}` (step {common.get("step", 0)}, about {seen:,} tokens seen).

- Architecture: Qwen3ForCausalLM, d={m.hidden_size}, {m.num_layers} layers, {m.num_attention_heads} heads /
  {m.num_query_groups} KV heads, head dim {m.head_dim}, MLP {m.ffn_hidden_size}, RMSNorm eps {m.norm_eps},
  RoPE theta {m.rope_theta:g}{" with Llama-3 scaling" if m.rope_llama3_scaling else ""}, \
{"tied" if m.tie_embeddings else "untied"} embeddings.
- Parameters: {counts["non_embedding"] / 1e6:.1f}M non-embedding, {counts["label"] / 1e6:.1f}M non-embedding + one
  embedding (the size name the SODA paper uses), {counts["total"] / 1e6:.1f}M in total.
- Vocabulary: {m.vocab_size} ids: text tokens, then `<|text_start|> <|text_end|> <|audio_start|> <|audio_end|>`,
  then 8 x 2048 Mimi codes (codebook k, code c -> first audio id + k*2048 + c), frame-major; in strings code
  (k, c) is the character chr(0xE000 + k*2048 + c).
- Training: {t.steps} steps planned, global batch {t.global_batch_size} x {t.seq_length} tokens,
  peak LR {cfg.optim.lr:g}, {cfg.optim.schedule} schedule, z-loss {cfg.optim.z_loss:g}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("PATH")
model = AutoModelForCausalLM.from_pretrained("PATH")
ids = tok("<|text_start|>Hello there.<|text_end|><|audio_start|>", return_tensors="pt").input_ids
audio = model.generate(ids, max_new_tokens=800, do_sample=True, temperature=0.9, top_p=0.8)
```
"""


def verify(model, out: Path, vocab: int, tolerance: float, seed: int | None = None, long_positions: int = 0) -> dict:
    """Megatron vs transformers on fresh random sequences: max |logit diff| and a greedy continuation;
    with `long_positions`, also over one sequence that long (RoPE at long positions: where a wrong
    scaling or base shows, which 48 tokens never reach)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    seed = int(time.time_ns() % 2**31) if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    hf_logging.disable_progress_bar()  # a bar over the tensors of a just-written folder tells nothing
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        tokens = torch.randint(0, vocab, (2, 48), generator=g)
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        ours = model(tokens, pos, None)[..., :vocab].float()
        theirs = hf(tokens).logits.float()
        diff = float((ours - theirs).abs().max())
        long_diff = None
        if long_positions:
            long = torch.randint(0, vocab, (1, long_positions), generator=g)
            pos = torch.arange(long_positions).unsqueeze(0)
            long_diff = float((model(long, pos, None)[..., :vocab].float() - hf(long).logits.float()).abs().max())
            diff = max(diff, long_diff)
        prompt = tokens[:1, :8]
        seq = prompt
        for _ in range(20):
            p = torch.arange(seq.shape[1]).unsqueeze(0)
            nxt = model(seq, p, None)[:, -1, :vocab].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        hf_seq = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    report = {
        "seed": seed,
        "max_abs_logit_diff": diff,
        "long_positions": long_positions,
        "max_abs_logit_diff_long": long_diff,
        "logit_scale": float(theirs.abs().max()),
        "tolerance": tolerance,
        "greedy_ours": seq[0, 8:].tolist(),
        "greedy_transformers": hf_seq[0, 8:].tolist(),
    }
    report["greedy_identical"] = report["greedy_ours"] == report["greedy_transformers"]
    report["ok"] = diff <= tolerance and report["greedy_identical"]
    return report


class Stopped(UserError):
    """SIGTERM / SIGINT ended the export; its partial output was removed."""


class StopOnSignals:
    """While active, SIGTERM and SIGINT raise `Stopped` in the main thread, so the `except` that
    removes the partial output runs (the default action would kill the process and leave the
    whole half-written model behind). Inside `deferred()` a signal waits for the block's end."""

    SIGNALS = ("SIGTERM", "SIGINT")

    def __init__(self, partial: Path) -> None:
        self.partial = partial
        self._previous: dict = {}
        self._deferring = False
        self._pending: int | None = None

    def _handle(self, signum, frame) -> None:
        if self._deferring:
            self._pending = signum
            return
        raise Stopped(f"stopped by {self._name(signum)}: the partial export {self.partial} was removed")

    @staticmethod
    def _name(signum: int) -> str:
        import signal

        return signal.Signals(signum).name

    def __enter__(self) -> StopOnSignals:
        import signal

        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    @contextmanager
    def deferred(self, done: str) -> Iterator[None]:
        """A block a signal must not cut short; one that came meanwhile stops the process after it
        (`done`: what is then complete, for the message)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self._pending is not None:
            raise Stopped(f"stopped by {self._name(self._pending)} after {done}")


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Remove the `.NAME.tmp-<pid>` siblings of `out_dir` that exports killed by SIGKILL, a lost
    node or a crash left behind (a whole model each), where that pid no longer runs here."""
    removed = []
    prefix = f".{out_dir.name}.tmp-"
    parent = out_dir.parent if out_dir.parent.is_dir() else None
    for p in parent.iterdir() if parent else []:
        pid = p.name[len(prefix) :]
        if p.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def export_hf(
    checkpoint: str,
    out: str,
    tokenizer: str | None = None,
    dtype: str = "fp32",
    do_verify: bool = False,
    max_shard_gb: float = 5.0,
    force: bool = False,
    verify_positions: int = 4160,
) -> dict:
    if not Path(checkpoint).exists():
        raise UserError(f"{checkpoint} is not a megatron-core distributed checkpoint (no such path)")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a model folder: --force replaces only a folder (move it away)")
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} exists (pass --force to replace it)")
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype: expected fp32 or bf16, got {dtype!r}")

    import torch  # only now: the refusals above are instant
    from transformers import GenerationConfig

    from megatron_soda.checkpoints_tools.session import build_full_model, single_process
    from megatron_soda.tokenization.text_tokenizer import layout_of, load_tokenizer
    from megatron_soda.training import checkpoint as ckpt

    src = ckpt.resolve(checkpoint)
    if out_dir.resolve() == src.resolve() or out_dir.resolve() in src.resolve().parents:
        raise UserError(f"{out_dir}: replacing it would delete the checkpoint being exported ({src})")
    common = ckpt.common_state(src)
    if "config" not in common:
        raise UserError(f"{src}: no training config inside (not written by megatron-soda)")
    cfg = config_from_dict(common["config"])
    m = cfg.model
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tok_dir = _find_tokenizer(tokenizer, cfg)
    tok = None
    if tok_dir is not None:
        tok = load_tokenizer(str(tok_dir))
        layout = layout_of(tok)
        if layout.vocab_size != m.vocab_size:
            raise UserError(f"tokenizer {tok_dir} has {layout.vocab_size} ids, the model {m.vocab_size}")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    remove_stale_partials(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stop = StopOnSignals(tmp)
    try:
        with stop, single_process():
            model = build_full_model(m)
            ckpt.load_weights(src, [model])
            state = model.state_dict()
            tensors = ((k, v.detach().to(torch_dtype)) for k, v in to_hf(state, m))
            write_safetensors(tensors, tmp, int(max_shard_gb * 2**30))
            bos = tok.bos_token_id if tok is not None else None
            eos = tok.eos_token_id if tok is not None else None
            config = hf_config(m, bos, eos, cfg.train.seq_length)
            config.dtype = "float32" if dtype == "fp32" else "bfloat16"
            config.save_pretrained(str(tmp))
            GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos).save_pretrained(str(tmp))
            if tok is not None:
                tok.save_pretrained(str(tmp))
            (tmp / "README.md").write_text(_model_card(cfg, common, param_counts(m), src))
            # what `soda generate` / `soda eval` decode with when no --codec is given
            (tmp / "soda.json").write_text(json.dumps({"codec": training_codec(cfg), "vocab_size": m.vocab_size}))
            report = {
                "checkpoint": str(src),
                "step": common.get("step", 0),
                "tokenizer": str(tok_dir) if tok_dir else None,
            }
            if do_verify:
                tol = 1e-4 if dtype == "fp32" else 5e-1
                report["verify"] = verify(model, tmp, m.vocab_size, tol, long_positions=verify_positions)
            with stop.deferred(f"the export to {out_dir} was complete"):  # else neither old nor new
                if out_dir.exists():
                    shutil.rmtree(out_dir)
                os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def export_in_subprocess(checkpoint: str, out: str, tokenizer: str | None = None) -> dict:
    """`export_hf` in a child process, for callers that go on to run transformers (soda generate,
    soda eval): megatron's one-process session may switch on the CPU backend, which patches
    torch.cuda for the whole process. The child's report, or its error, comes back as JSON."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "result.json"
        cmd = [  # library warnings silenced before this module's imports bring megatron-core in
            sys.executable,
            "-c",
            "from megatron_soda.config import quiet_library_warnings as q; q(); "
            "from megatron_soda.checkpoints_tools.hf_export import _main; raise SystemExit(_main())",
            checkpoint,
            out,
            "--result",
            str(result),
        ]
        code = subprocess.call(cmd + (["--tokenizer", tokenizer] if tokenizer else []), stdout=subprocess.DEVNULL)
        data = (
            json.loads(result.read_text()) if result.is_file() else {"error": f"the export process exited with {code}"}
        )
    if "error" in data:
        raise UserError(f"{checkpoint}: not an HF folder, and exporting it as a checkpoint failed: {data['error']}")
    return data


def _main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description="export_hf in its own process (export_in_subprocess)")
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--tokenizer")
    ap.add_argument("--result", required=True, help="the report or {'error': ...} goes here as JSON")
    a = ap.parse_args()
    import signal

    from megatron_soda.parallel.processes import die_with_parent

    die_with_parent(os.getppid(), signal.SIGTERM)  # SIGTERM: the export removes its partial output
    try:
        data = export_hf(a.checkpoint, a.out, a.tokenizer)
    except Exception as e:  # noqa: BLE001  (whatever it is, the caller gets it as data)
        if not isinstance(e, USER_ERRORS):  # a user error's one line is the parent's to print
            report_error(e, "soda export-hf (child)")
        data = {"error": str(e)}
    Path(a.result).write_text(json.dumps(data))
    return 0 if "error" not in data else 1


@dataclass
class ExportConfig:
    checkpoint: str = field(metadata={"positional": True, "help": "run dir, its checkpoints/ or one iter_* directory"})
    out: str = field(metadata={"positional": True})
    tokenizer: str | None = field(
        default=None, metadata={"help": "SODA tokenizer to include (default: the training shards' copy)"}
    )
    dtype: str = field(default="fp32", metadata={"choices": ["fp32", "bf16"]})
    verify: bool = field(default=False, metadata={"help": "compare logits and greedy output with transformers"})
    verify_positions: int = field(
        default=4160, metadata={"help": "--verify also compares one sequence this long (positions past 4,096; 0: not)"}
    )
    max_shard_gb: float = 5.0
    force: bool = field(default=False, metadata={"help": "replace OUT if it exists"})


def export_job(cfg: ExportConfig) -> dict:
    """`soda export-hf`: a megatron checkpoint (any layout) -> a Hugging Face Qwen3 folder."""
    report = export_hf(
        cfg.checkpoint, cfg.out, cfg.tokenizer, cfg.dtype, cfg.verify, cfg.max_shard_gb, cfg.force, cfg.verify_positions
    )
    print(
        f"exported {report['checkpoint']} (step {report['step']}) -> {cfg.out}"
        + ("" if report["tokenizer"] else " (no tokenizer found: pass --tokenizer)")
    )
    if "verify" in report:
        v = report["verify"]
        print(
            f"verify: max |logit diff| {v['max_abs_logit_diff']:.2e} (tolerance {v['tolerance']:g}, logits up to "
            f"{v['logit_scale']:.2f}"
            + (f"; positions up to {v['long_positions']}" if v["long_positions"] else "")
            + f"), greedy 20 tokens identical: {v['greedy_identical']}"
        )
        Path(cfg.out, "export_verify.json").write_text(json.dumps(v, indent=1))
        if not v["ok"]:
            raise UserError("export verification failed: the Hugging Face model does not reproduce ours")
    return report


if __name__ == "__main__":
    raise SystemExit(_main())
