"""`soda bench report`: docs/PERFORMANCE.md's measurement tables, rendered from the rows in docs/bench.

A number typed into a doc drifts from its measurement (a row re-measured, a ratio taken between two
runs at different micro-batches, a share quoted from a profile nobody committed). Here every table
of the doc sits between `<!-- report: NAME -->` and `<!-- /report -->`, and RENDERERS[NAME] rebuilds
it from the committed rows alone; `--check` (run by the tests) fails when a table says anything
else, so a table can only change with its rows.

Conventions the tables follow:
- MFU twice: the row's `mfu` counts attention over the full score matrix (PaLM, nanoGPT,
  torchtitan; the SODA paper and the team's goals); "causal" counts only the lower triangle causal
  kernels compute: mfu x flops_per_token(causal=True) / flops_per_token, from the preset's config.
- A ratio between two rows only when both come from one invocation (the same `command` field):
  same process setup, same synthetic batches, same GPU lease.
- Micro-batch x accumulation from each row's own micro_batch and global_batch / (micro_batch x dp):
  `--baseline-micro-batch` runs transformers at its own micro-batch, and the table says so.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from megatron_soda.config import UserError, opt


@dataclass
class ReportConfig:
    doc: str = opt("docs/PERFORMANCE.md", "the Markdown file whose `<!-- report: NAME -->` regions are rendered")
    bench_dir: str = opt("docs/bench", "where the rows are (one JSON object per measurement)")
    check: bool = opt(False, "compare, do not write: exit 1 if a table differs")


REGION = re.compile(r"(<!-- report: ([\w-]+) -->\n)(.*?)(<!-- /report -->)", re.S)


# --- rows ---------------------------------------------------------------------------------------


def load_rows(bench: Path, name: str) -> list[dict]:
    """The rows of one file of docs/bench: JSON lines (.jsonl) or one JSON list (.json)."""
    path = Path(bench) / name
    if not path.is_file():
        raise UserError(f"{path}: not found (a table of the performance report is rendered from it)")
    text = path.read_text()
    try:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, list) else [data]


def _model_overrides(command: str) -> tuple[tuple[str, str], ...]:
    """The `--model.key value` flags of a row's command: they change the FLOPs as the preset does."""
    words = command.split()
    return tuple((w, words[i + 1]) for i, w in enumerate(words[:-1]) if w.startswith("--model."))


@cache
def _model_config(preset: str, overrides: tuple[tuple[str, str], ...]):
    from megatron_soda.config import load_config

    return load_config(f"configs/{preset}.yaml", [x for pair in overrides for x in pair]).model


def flops_of(row: dict) -> tuple[float, float]:
    """(full-matrix, causal) training FLOPs per token of a row's model, the full one checked against
    the row's own `flops_per_token`: a formula changed since the row was measured must not go unseen."""
    from megatron_soda.model.flops import flops_per_token

    overrides = _model_overrides(row.get("command", ""))
    if "vocab" in row:  # the vocabulary the row ran with (a preset's 0 means the data's)
        overrides += (("--model.vocab_size", str(row["vocab"])),)
    model = _model_config(row["preset"], overrides)
    full = flops_per_token(model, row["seq_len"])
    if not math.isclose(full, row["flops_per_token"], rel_tol=1e-9):
        raise UserError(
            f"row {row['preset']} {row['variant']} ({row.get('date')}): flops_per_token {row['flops_per_token']:.6g} "
            f"but megatron_soda.model.flops gives {full:.6g} for configs/{row['preset']}.yaml at seq {row['seq_len']}"
        )
    return full, flops_per_token(model, row["seq_len"], causal=True)


def causal_mfu(row: dict) -> float:
    """The row's MFU with attention counted over the causal half of the score matrix."""
    full, causal = flops_of(row)
    return row["mfu"] * causal / full


def accumulation(row: dict) -> int:
    per_step = row["micro_batch"] * row.get("dp", 1)
    if row["global_batch"] % per_step:
        raise UserError(
            f"row {row['preset']} {row['variant']}: global batch {row['global_batch']} not a multiple of {per_step}"
        )
    return row["global_batch"] // per_step


def runs(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by invocation (the `command` field), in the order they were measured."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("command", ""), []).append(r)
    return out


def display_command(command: str) -> str:
    """A row's command as one can rerun it: where it wrote its results left out (`--results`,
    `--plot`: paths of the machine it ran on), the label quoted (the row stores it unquoted)."""
    words, out, i = command.split(), [], 0
    while i < len(words):
        w = words[i]
        if w in ("--results", "--plot"):
            i += 2
            continue
        if w == "--label":
            j = i + 1
            while j < len(words) and not words[j].startswith("--"):
                j += 1
            out += [w, shlex.quote(" ".join(words[i + 1 : j]))]
            i = j
            continue
        out.append(w)
        i += 1
    return " ".join(out)


# --- formatting ---------------------------------------------------------------------------------


def _table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _preset(row: dict) -> str:
    return row["preset"].removeprefix("soda-").upper().replace("TINY", "tiny")


VARIANT_NAMES = {
    "ours-nokernels": "ours, kernels off",
    "hf": "transformers Qwen3",
    "hf-compile": "transformers Qwen3 + torch.compile",
}


def _variant(row: dict) -> str:
    name = VARIANT_NAMES.get(row["variant"], row["variant"])
    return name + (f" (recompute {row['recompute']})" if row.get("recompute", "none") != "none" else "")


def _graphed(row: dict) -> bool:
    return (row.get("fast_paths") or {}).get("cuda_graph", "none") != "none"


def _split(row: dict) -> str:
    """Step time and its split; a graphed step is one replay, so only its optimizer is separate."""
    s = row.get("split_s") or {}
    if _graphed(row):
        return f"{row['step_time_s']:.3f} (graphed; opt {s['optimizer']:.3f})"
    parts = [s.get(k) for k in ("forward", "backward", "grad_sync", "optimizer")]
    return f"{row['step_time_s']:.3f} (" + " / ".join("-" if p is None else f"{p:.3f}" for p in parts) + ")"


def _letters(rows: list[dict]) -> dict[str, str]:
    """A letter per invocation of a file's rows, so every table names a run the same way."""
    return {cmd: chr(ord("A") + i) for i, cmd in enumerate(runs(rows))}


def _provenance(file: str, rows: list[dict]) -> str:
    """Where, when and with what the rows were measured, from the rows themselves."""

    def unique(values) -> str:
        return ", ".join(dict.fromkeys(str(v) for v in values))

    versions = unique(", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items()) for r in rows)
    peaks = unique(f"{r['peak_tflops']:g}" for r in rows if r.get("peak_tflops"))
    return (
        f"Rows: `{file}`. Device: {unique(r['device'] for r in rows)}; date: {unique(r['date'] for r in rows)}; "
        f"{versions}; {unique(r['dtype'] for r in rows)}, seq {unique(r['seq_len'] for r in rows)}"
        + (f"; MFU against {peaks} TFLOP/s dense bf16." if peaks else ".")
    )


def _commands(rows: list[dict], letters: dict[str, str]) -> str:
    lines = ["Runs (each row's `command`; `--results` / `--plot` left out):", ""]
    return "\n".join(lines + [f"- {letters[c]}: `{display_command(c)}`" for c in runs(rows)])


def _reference(run: list[dict]) -> dict | None:
    """What a run's ratios are against: its `ours` row, else its `ours-off` row (ours failed)."""
    for name in ("ours", "ours-off"):
        ref = next((r for r in run if r["variant"] == name), None)
        if ref is not None:
            return ref
    return None


def _ratio(row: dict, run: list[dict]) -> str:
    ref = _reference(run)
    if ref is None:
        return "none (no ours in its run)"
    if ref is row:
        return ""
    return f"{ref['tokens_per_s_per_gpu'] / row['tokens_per_s_per_gpu']:.2f}x ({ref['variant']} / this)"


def _by_preset(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: r["flops_per_token"])  # stable: measurement order within a preset


def _device(row: dict) -> str:
    return row["device"].removeprefix("NVIDIA ")


def train_table(file: str, rows: list[dict], letters: dict[str, str], with_device: bool = False) -> str:
    """Throughput, both MFUs, the step split, peak memory and same-run ratios of training rows."""
    grouped = runs(rows)
    head = ["preset", "run", "variant", "micro x accum", "steps", "tokens/s/GPU", "TFLOP/s", "MFU (full attn.)"]
    head += ["MFU (causal)", "step s (fwd / bwd / sync / opt)", "peak GB", "ours / this, same run"]
    if with_device:
        head.insert(1, "GPU")
    body = []
    for r in _by_preset(rows):
        cmd = r.get("command", "")
        cells = [_preset(r), letters[cmd], _variant(r), f"{r['micro_batch']} x {accumulation(r)}", str(r["steps"])]
        cells += [f"{r['tokens_per_s_per_gpu']:,.0f}", f"{r['tflops_per_gpu']:.1f}", _pct(r["mfu"])]
        cells += [_pct(causal_mfu(r)), _split(r), f"{r['peak_memory_gb']:.1f}", _ratio(r, grouped[cmd])]
        if with_device:
            cells.insert(1, _device(r))
        body.append(cells)
    return "\n\n".join([_provenance(file, rows), _table(head, body), _commands(rows, letters)])


def _is_ablation(run: list[dict]) -> bool:
    return any("+" in r["variant"] for r in run)


# --- renderers: one per marker ------------------------------------------------------------------


def render_train_h200(bench: Path) -> str:
    """Every preset on the H200; the lever ablations have their own table."""
    rows = load_rows(bench, "train_h200.jsonl")
    keep = [r for run in runs(rows).values() if not _is_ablation(run) for r in run]
    return train_table("train_h200.jsonl", keep, _letters(rows))


def render_train_h200_levers(bench: Path) -> str:
    """Each speed lever alone against all off, in the run that measured both."""
    every = load_rows(bench, "train_h200.jsonl")
    rows = [r for run in runs(every).values() if _is_ablation(run) for r in run]
    letters, grouped = _letters(every), runs(rows)
    head = ["preset", "run", "variant", "steps", "tokens/s/GPU", "vs ours-off, same run", "MFU (full attn.)"]
    head += ["MFU (causal)", "step s (fwd / bwd / sync / opt)", "peak GB"]
    body = []
    for r in rows:
        cmd = r["command"]
        off = next(x for x in grouped[cmd] if x["variant"] == "ours-off")
        change = "" if r is off else f"{100 * (r['tokens_per_s_per_gpu'] / off['tokens_per_s_per_gpu'] - 1):+.1f}%"
        cells = [_preset(r), letters[cmd], _variant(r), str(r["steps"]), f"{r['tokens_per_s_per_gpu']:,.0f}", change]
        cells += [_pct(r["mfu"]), _pct(causal_mfu(r)), _split(r), f"{r['peak_memory_gb']:.1f}"]
        body.append(cells)
    return "\n\n".join([_provenance("train_h200.jsonl", rows), _table(head, body), _commands(rows, letters)])


def render_train_h100(bench: Path) -> str:
    """The 2026-11-25 rows (H100; the 4B rows on an H200), before and with the speed levers."""
    rows = load_rows(bench, "train.jsonl")
    return train_table("train.jsonl", rows, _letters(rows), with_device=True)


def render_train_cpu(bench: Path) -> str:
    """The command on the CPU backend: that it runs, not how fast a GPU would be."""
    rows = load_rows(bench, "train_cpu.jsonl")
    letters, grouped = _letters(rows), runs(rows)
    head = ["preset", "run", "variant", "micro x accum", "steps", "tokens/s", "step s (fwd / bwd / sync / opt)"]
    head += ["ours / this, same run"]
    body = []
    for r in rows:
        cmd = r["command"]
        cells = [_preset(r), letters[cmd], _variant(r), f"{r['micro_batch']} x {accumulation(r)}", str(r["steps"])]
        flops_of(r)  # the formula still gives what the row measured with
        body.append(cells + [f"{r['tokens_per_s_per_gpu']:,.0f}", _split(r), _ratio(r, grouped[cmd])])
    return "\n\n".join([_provenance("train_cpu.jsonl", rows), _table(head, body), _commands(rows, letters)])


def _loss_reference(run: list[dict]) -> dict | None:
    """What a run's loss curves are held against: its `ours-off` row (the levers), else its `ours`
    row (opt-in features: +fp8, +blockwise, +filter)."""
    for name in ("ours-off", "ours"):
        ref = next((r for r in run if r["variant"] == name and r.get("losses")), None)
        if ref is not None:
            return ref
    return None


def _loss_rows(file: str, rows: list[dict]) -> list[list[str]]:
    letters, body = _letters(rows), []
    for cmd, run in runs(rows).items():
        off = _loss_reference(run)
        if off is None:
            continue
        for r in run:
            if r is off or not r["variant"].startswith("ours") or len(r.get("losses") or []) != len(off["losses"]):
                continue
            gaps = [abs(a - b) for a, b in zip(r["losses"], off["losses"], strict=True)]
            rel = [g / abs(b) for g, b in zip(gaps, off["losses"], strict=True)]
            half = max(1, len(rel) // 2)
            body.append(
                [
                    _device(r),
                    _preset(r),
                    f"`{file}` {letters[cmd]}",
                    f"{r['variant']} vs {off['variant']}",
                    str(len(gaps)),
                    f"{max(gaps):.2g} (step {gaps.index(max(gaps)) + 1})",
                    f"{_pct2g(max(rel[:half]))} / {_pct2g(max(rel))}",
                    f"{r['losses'][0]:.6f} / {off['losses'][0]:.6f}",
                    f"{r['losses'][-1]:.4f} / {off['losses'][-1]:.4f}",
                ]
            )
    return body


def _pct2g(x: float) -> str:
    return f"{100 * x:.2g}%"


LOSS_FILES = ("train.jsonl", "train_h200.jsonl", "train_cpu.jsonl")


def render_train_losses(bench: Path) -> str:
    """All on (or one lever on) against all off, and each opt-in feature against ours: same initial
    weights, same batches, every step."""
    head = ["device", "preset", "run", "variant vs reference", "steps (warm-up incl.)", "max abs. loss gap"]
    head += ["max rel. gap, first half / all steps", "first loss (this / reference)", "last loss (this / reference)"]
    body = []
    for file in LOSS_FILES:
        body += _loss_rows(file, load_rows(bench, file))
    files = ", ".join(f"`{f}`" for f in LOSS_FILES)
    return f"Rows: {files} (their `losses`: one per step, warm-up included).\n\n" + _table(head, body)


def render_adam_memory(bench: Path) -> str:
    """What AdamW at DP=1 holds before activations (bf16 weights, fp32 main weights, fp32 grads,
    two fp32 moments: 18 bytes per parameter), for the presets the rows measured."""
    from megatron_soda.model.flops import param_counts

    presets = dict.fromkeys(r["preset"] for f in ("train.jsonl", "train_h200.jsonl") for r in load_rows(bench, f))
    head = ["preset", "parameters (both embedding matrices)", "18 bytes/param"]
    body = []
    for p in sorted(presets, key=lambda p: param_counts(_model_config(p, ()))["total"]):
        n = param_counts(_model_config(p, ()))["total"]
        body.append([p.removeprefix("soda-").upper(), f"{n / 1e9:.2f}B", f"{18 * n / 1e9:.1f} GB"])
    return "From `configs/<preset>.yaml` (`megatron_soda.model.flops.param_counts`).\n\n" + _table(head, body)


# columns of the kernel tables, in this order; a file's table has those its rows hold
KERNEL_PEERS = (
    "blockwise",
    "blockwise+filter",
    "torch",
    "megatron-core",
    "liger-kernel",
    "cut-cross-entropy",
    "cut-cross-entropy-exact",
)
PEER_NAMES = {
    "liger-kernel": "Liger-Kernel",
    "blockwise": "ours blockwise",
    "blockwise+filter": "ours blockwise + filter",
    "cut-cross-entropy-exact": "cut-cross-entropy exact",
}
OPS = {
    "cross_entropy": "linear + CE",
    "ce_race": "linear + CE, fair race",
    "embedding": "embedding",
    "rmsnorm": "RMSNorm",
    "qk_norm": "QK-norm",
    "rope": "RoPE",
}


def _kernel_shape(entry: dict, op: str) -> tuple[str, str]:
    if op == "rope":
        return f"{entry['heads']} heads x {entry['head_dim']}", f"{entry['tokens']:,}"
    if op == "qk_norm":
        return str(entry["head_dim"]), f"{entry['tokens'] * entry['heads']:,} rows"
    if op == "rmsnorm":
        return str(entry["hidden"]), f"{entry['tokens']:,} rows"
    return str(entry["hidden"]), f"{entry['tokens']:,}"


def _kernel_rows(entries: list[dict]):
    """(op, entry, {impl: result}), op by op, shapes in the order the bench wrote them."""
    for op in OPS:
        for e in entries:
            if op in e:
                yield op, e, {x["impl"]: x for x in e[op]}


def render_kernels(file: str) -> Callable[[Path], str]:
    def render(bench: Path) -> str:
        entries = load_rows(bench, file)
        device = ", ".join(dict.fromkeys(e["device"] for e in entries if "device" in e))
        present = {impl for _, _, by in _kernel_rows(entries) for impl in by}
        peers = [p for p in KERNEL_PEERS if p in present]
        head = ["op", "hidden", "tokens", "ours ms"] + [f"{PEER_NAMES.get(p, p)} ms (x)" for p in peers]
        mem_head = ["op", "hidden", "tokens", "ours"] + [PEER_NAMES.get(p, p) for p in peers]
        body, mem = [], []
        for op, e, by in _kernel_rows(entries):
            ours = by["fused"]
            hidden, tokens = _kernel_shape(e, op)
            cells = [OPS[op], hidden, tokens, f"{1e3 * ours['seconds']:.2f}"]
            cells += [
                f"{1e3 * by[p]['seconds']:.2f} ({by[p]['speedup_of_fused']:.2f}x)" if p in by else "" for p in peers
            ]
            body.append(cells)
            row = [OPS[op], hidden, tokens, f"{ours['peak_mib']:,.0f}"]
            row += [
                f"{by[p]['peak_mib']:,.0f} ({ours['peak_mib'] / by[p]['peak_mib']:.2f}x)" if p in by else ""
                for p in peers
            ]
            mem.append(row)
        intro = (
            f"Rows: `{file}`" + (f" ({device})" if device else "") + ". Time of fwd+bwd, ms; (x) = that time / ours."
        )
        mem_intro = "Peak memory of the same calls, MiB; (x) = ours / that."
        return "\n\n".join([intro, _table(head, body), mem_intro, _table(mem_head, mem)])

    render.__name__ = f"render_kernels_{file}"
    return render


SELFCHECK_FILES = ("selfcheck_h100_bf16.jsonl", "selfcheck_h200_bf16.jsonl")
SELFCHECK_SKIP = ("rank", "seed", "tp", "ok", "wgrad_path", "dtype")


def render_selfcheck(bench: Path) -> str:
    """The kernels' parity (largest error against the torch reference) on each GPU, compiled, bf16."""
    rows = {f: load_rows(bench, f) for f in SELFCHECK_FILES}
    cols = [(f, i) for f in SELFCHECK_FILES for i in range(len(rows[f]))]
    head = ["check"] + [f"`{f}`" + (f" rank {rows[f][i]['rank']}" if len(rows[f]) > 1 else "") for f, i in cols]
    keys = list(dict.fromkeys(k for f in SELFCHECK_FILES for r in rows[f] for k in r if k not in SELFCHECK_SKIP))
    body = [[k] + [_num(rows[f][i].get(k)) for f, i in cols] for k in keys]
    body += [[k] + [str(rows[f][i].get(k)) for f, i in cols] for k in ("tp", "dtype", "wgrad_path", "ok")]
    return _table(head, body)


def _num(x) -> str:
    if x is None:
        return ""
    if isinstance(x, bool) or not isinstance(x, float):
        return str(x)
    return "0" if x == 0 else f"{x:.2g}"


def render_tokenize_h100(bench: Path) -> str:
    return _tokenize("tokenize_h100.json", bench)


def render_tokenize_cpu(bench: Path) -> str:
    return _tokenize("tokenize_cpu.json", bench)


def _tokenize(file: str, bench: Path) -> str:
    rows = load_rows(bench, file)
    head = ["batch", "clip s", "wall per batch s", "real-time factor", "tokens/s"]
    body = [
        [
            str(r["batch"]),
            f"{r['clip_seconds']:g}",
            f"{r['wall_s']:.3f}",
            _factor(r["realtime_factor"]),
            f"{r['tokens_per_s']:,.0f}",
        ]
        for r in rows
    ]
    devices = ", ".join(dict.fromkeys(f"{r['device']} ({r['codec']})" for r in rows))
    return f"Rows: `{file}`. Device (codec): {devices}.\n\n" + _table(head, body)


def _factor(x: float) -> str:
    return f"{x:,.0f}x" if x >= 100 else f"{x:.1f}x"


def render_readers_cpu(bench: Path) -> str:
    rows = load_rows(bench, "readers_cpu.json")
    head = ["corpus", "format", "records", "MB", "records/s", "MB/s", "audio-hours/s read"]
    head += ["decoded to 24 kHz: audio-hours/s", "real-time factor", "tokens/s"]
    body = []
    for r in rows:
        rtf = r.get("decoded_real_time_factor", r.get("real_time_factor"))
        cells = [r["corpus"], r["format"], _int(r.get("records")), _fixed(r.get("mb"), 1), f"{r['records_per_s']:,.0f}"]
        cells += [_int(r.get("mb_per_s")), _fixed(r.get("audio_hours_per_s"), 2)]
        cells += [_fixed(r.get("decoded_audio_hours_per_s"), 3), _int(rtf, "x"), _int(r.get("tokens_per_s"))]
        body.append(cells)
    return "Rows: `readers_cpu.json`.\n\n" + _table(head, body)


def _int(x, suffix: str = "") -> str:
    return "" if x is None else f"{x:,.0f}{suffix}"


def _fixed(x, digits: int) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def render_loader_cpu(bench: Path) -> str:
    rows = load_rows(bench, "loader_cpu.jsonl")
    letters = _letters(rows)
    head = ["run", "micro batch", "workers", "checksums", "tokens/s", "tokens/s per worker", "seq"]
    body = [
        [
            letters[r["command"]],
            str(r["micro_batch"]),
            f"{r['workers']}" + (" (in process)" if r["workers"] == 0 else ""),
            "on" if r["checksums"] else "off",
            f"{r['tokens_per_s'] / 1e6:.1f}M",
            f"{r['tokens_per_s_per_worker'] / 1e6:.1f}M",
            str(r["seq_len"]),
        ]
        for r in rows
    ]
    where = "; ".join(dict.fromkeys(f"{r['date']}, {r['machine']}" for r in rows))
    runs_list = "\n".join(
        f"- {letters[c]} (load average {run[0]['load_average_1min_before']:g} just before): `{c}`"
        for c, run in runs(rows).items()
    )
    return f"Rows: `loader_cpu.jsonl` ({where}).\n\n" + _table(head, body) + "\n\nRuns:\n\n" + runs_list


def render_loader_s3_cpu(bench: Path) -> str:
    """One rank's loader from a local S3 server (cold cache without / with the prefetcher, warm)
    next to the same set on local disk, each ratio within one invocation (one row's `command`)."""
    rows = load_rows(bench, "loader_s3_cpu.jsonl")
    letters = _letters(rows)
    head = ["run", "workers", "samples / step", "source", "cache", "prefetch steps", "tokens/s", "of local disk"]
    body = []
    for command, run in runs(rows).items():
        local = {r["workers"]: r["tokens_per_s"] for r in run if r["cache"] is None}
        for r in run:
            body.append(
                [
                    letters[command],
                    f"{r['workers']}" + (" (in process)" if r["workers"] == 0 else ""),
                    str(r["global_batch"]),
                    r["source"],
                    r["cache"] or "",
                    str(r["prefetch_steps"]) if r["cache"] else "",
                    f"{r['tokens_per_s'] / 1e6:.2f}M" + (" (wrapped: partly warm)" if r.get("wrapped") else ""),
                    _pct(r["tokens_per_s"] / local[r["workers"]]) if r["cache"] else "",
                ]
            )
    where = "; ".join(dict.fromkeys(f"{r['date']}, {r['machine']}, {r['store']}" for r in rows))
    goal = []
    for command, run in runs(rows).items():
        best = max(r["tokens_per_s"] for r in run if r["cache"] == "cold" and r["prefetch_steps"])
        verdict = "met" if best >= 1e6 else "not met"
        goal.append(
            f"- {letters[command]} (load average {run[0]['load_average_1min_before']:g} just before; seq "
            f"{run[0]['seq_len']}, micro batch {run[0]['micro_batch']}): `{command}`; best cold cache with "
            f"the prefetcher {best / 1e6:.2f}M tokens/s per rank: the >= 1M goal {verdict}"
        )
    return f"Rows: `loader_s3_cpu.jsonl` ({where}).\n\n" + _table(head, body) + "\n\nRuns:\n\n" + "\n".join(goal)


def render_startup_cpu(bench: Path) -> str:
    """`soda bench startup` of two checkouts on one machine: each command's median wall seconds per
    checkout (column), `python -c "import torch"` as the yardstick."""
    rows = load_rows(bench, "startup_cpu.jsonl")
    checkouts = list(dict.fromkeys(r["checkout"] for r in rows))
    seconds = {(r["command"], r["checkout"]): r["median_s"] for r in rows}
    head = ["command", *(f"{c} (median s)" for c in checkouts)]
    body = [
        [f"`{cmd}`", *(f"{seconds[cmd, c]:.2f}" if (cmd, c) in seconds else "" for c in checkouts)]
        for cmd in dict.fromkeys(r["command"] for r in rows)
    ]
    where = "; ".join(dict.fromkeys(f"{r['date']}, {r['machine']}, {r['repeats']} runs each" for r in rows))
    return f"Rows: `startup_cpu.jsonl` ({where}).\n\n" + _table(head, body)


RENDERERS: dict[str, Callable[[Path], str]] = {
    "train_h200": render_train_h200,
    "train_h200_levers": render_train_h200_levers,
    "train_losses": render_train_losses,
    "train_h100": render_train_h100,
    "train_cpu": render_train_cpu,
    "adam_memory": render_adam_memory,
    "kernels_h100": render_kernels("kernels_h100.json"),
    "kernels_h200": render_kernels("kernels_h200.json"),
    "selfcheck": render_selfcheck,
    "tokenize_h100": render_tokenize_h100,
    "tokenize_cpu": render_tokenize_cpu,
    "readers_cpu": render_readers_cpu,
    "loader_cpu": render_loader_cpu,
    "loader_s3_cpu": render_loader_s3_cpu,
    "startup_cpu": render_startup_cpu,
}


# --- the doc ------------------------------------------------------------------------------------


def markers(text: str) -> list[str]:
    """The report regions a doc holds, in order."""
    return [m.group(2) for m in REGION.finditer(text)]


def render_doc(text: str, bench: Path) -> tuple[str, list[str]]:
    """(the doc with every region rendered, the names of the regions that changed)."""
    unknown = [name for name in markers(text) if name not in RENDERERS]
    if unknown:
        raise UserError(f"report region {unknown[0]!r} has no renderer (known: {', '.join(RENDERERS)})")
    changed: list[str] = []

    def fill(m: re.Match) -> str:
        body = RENDERERS[m.group(2)](Path(bench)).strip("\n") + "\n"
        if body != m.group(3):
            changed.append(m.group(2))
        return m.group(1) + body + m.group(4)

    return REGION.sub(fill, text), changed


def report_job(cfg: ReportConfig) -> int:
    """`soda bench report`: rewrite the doc's tables from the rows, or (--check) say which differ."""
    doc = Path(cfg.doc)
    if not doc.is_file():
        raise UserError(f"--doc {doc}: not found")
    text = doc.read_text()
    new, changed = render_doc(text, Path(cfg.bench_dir))
    missing = [name for name in RENDERERS if name not in markers(text)]
    for name in missing:
        print(f"{doc}: no region <!-- report: {name} --> (its table is not in the doc)")
    if cfg.check:
        for name in changed:
            print(f"{doc}: table {name!r} differs from what the rows in {cfg.bench_dir} give (run soda bench report)")
        if not changed and not missing:
            print(f"{doc}: all {len(markers(text))} tables match the rows in {cfg.bench_dir}")
        return 1 if changed or missing else 0
    if new != text:
        doc.write_text(new)
    print(f"{doc}: {len(changed)} of {len(markers(text))} tables rewritten from {cfg.bench_dir}")
    return 0
