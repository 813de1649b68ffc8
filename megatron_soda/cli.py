"""`soda <subcommand>`: the one entry point for user-facing jobs.

Each subcommand is one function of the module that does the job, taking that module's config
dataclass; the options are built from the dataclass (flag = field name with dashes, the field's
default and type, help from its metadata), so a default is declared once, where the job is.
`soda train` and `soda finetune` take `--section.key value` overrides of the run config instead.

Errors a user can fix (bad paths, bad settings, mismatched layouts: `UserError`, ValueError) end as
one line on stderr and exit code 2; anything else is a bug and keeps its traceback (SODA_DEBUG=1
keeps it for user errors too).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import types
import typing
from dataclasses import MISSING

from megatron_soda.config import USER_ERRORS, quiet_library_warnings

# name -> (module, config class, job function, help, extra flags go to the job). Nested dicts are
# subcommand groups. Modules are imported only for the command that runs.
COMMANDS: dict = {
    "corpus": (
        "megatron_soda.tokenization.tiny_corpus",
        "CorpusConfig",
        "corpus_job",
        "make the bundled tiny espeak-ng corpus (demo and tests)",
        False,
    ),
    "tokenizer": (
        "megatron_soda.tokenization.text_tokenizer",
        "TokenizerConfig",
        "tokenizer_job",
        "build the SODA tokenizer (text tokenizer + delimiters + audio tokens)",
        False,
    ),
    "prepare": (
        "megatron_soda.tokenization.prepare",
        "PrepareConfig",
        "prepare_job",
        "tokenize audio/transcripts/text into packed WebDataset shards",
        False,
    ),
    "inspect": (
        "megatron_soda.tools.inspect",
        "InspectConfig",
        "inspect_job",
        "a shard set (decode a few samples) or a checkpoint (config, shapes)",
        False,
    ),
    "export-hf": (
        "megatron_soda.checkpoints_tools.hf_export",
        "ExportConfig",
        "export_job",
        "megatron checkpoint (any layout) -> Hugging Face Qwen3 folder",
        False,
    ),
    "import-hf": (
        "megatron_soda.checkpoints_tools.hf_import",
        "ImportConfig",
        "import_job",
        "Hugging Face Qwen3 folder -> megatron checkpoint (init_from)",
        False,
    ),
    "bench": {
        "loader": (
            "megatron_soda.tools.bench.loader",
            "LoaderBenchConfig",
            "bench_job",
            "training data loader tokens/s per worker",
            False,
        ),
        "kernels": (
            "megatron_soda.tools.bench.kernels",
            "KernelBenchConfig",
            "bench_job",
            "fused embedding / linear+CE / RMSNorm / RoPE vs megatron-core, torch and peers (fwd+bwd)",
            False,
        ),
        "train": (
            "megatron_soda.tools.bench.train",
            "TrainBenchConfig",
            "bench_job",
            "training tokens/s, TFLOP/s, MFU, step split and peak memory; ours vs transformers, kernels "
            "and speed levers off (extra --section.key value flags override the preset, as in `soda train`)",
            True,
        ),
        "readers": (
            "megatron_soda.tools.bench.readers",
            "ReadersBenchConfig",
            "bench_job",
            "soda prepare's corpus-file readers (JSONL, .gz, .zst, Parquet): records/s, MB/s, audio-hours/s",
            False,
        ),
        "tokenize": (
            "megatron_soda.tools.bench.tokenize",
            "TokenizeBenchConfig",
            "bench_job",
            "Mimi encoding throughput (audio-seconds per wall-second), batched",
            False,
        ),
    },
    "plot": ("megatron_soda.tools.plots", "PlotConfig", "plot_job", "loss curves of a training run as a PNG", False),
    "generate": (
        "megatron_soda.generate",
        "GenerateConfig",
        "generate_job",
        "continue audio/text prompts (asr, tts, s2st, continue) -> WAV + text",
        False,
    ),
    "eval": (
        "megatron_soda.evals",
        "EvalConfig",
        "eval_job",
        "likelihood benchmarks, ASR (WER), S2ST (ASR-BLEU) -> JSON + Markdown report",
        False,
    ),
    "launch": {
        "slurm": (
            "megatron_soda.launch.slurm",
            "SlurmJob",
            "slurm_job",
            "sbatch a training run: srun + torchrun, USR1 -> checkpoint -> requeue "
            "(extra --section.key value flags override the config)",
            True,
        ),
        "prepare": (
            "megatron_soda.launch.slurm",
            "PrepareArray",
            "prepare_array_job",
            "sbatch a job array of `soda prepare` over disjoint slices (extra flags go to soda prepare)",
            True,
        ),
        "isoflop": (
            "megatron_soda.tools.isoflop.run",
            "IsoflopArray",
            "launch_array_job",
            "sbatch a planned IsoFLOP grid as a job array: one resumable run per task, runs.csv gathered "
            "(extra flags go to every run)",
            True,
        ),
    },
    "isoflop": {
        "plan": (
            "megatron_soda.tools.isoflop.plan",
            "PlanConfig",
            "plan_job",
            "budgets x widths -> training configs + plan.csv",
            False,
        ),
        "run": (
            "megatron_soda.tools.isoflop.run",
            "RunConfig",
            "run_job",
            "train the planned grid (resumable) and write runs.csv (extra flags go to every run)",
            True,
        ),
        "fit": (
            "megatron_soda.tools.isoflop.run",
            "FitConfig",
            "fit_job",
            "fit N*, D* power laws (+ parametric L(N, D)) and plot",
            False,
        ),
    },
}


# --- options from a config dataclass --------------------------------------------------------------


def _unwrap(tp):
    """(base type, item type for lists, optional) of a field's annotation."""
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if typing.get_origin(tp) is list:
        return list, typing.get_args(tp)[0], optional
    return tp, None, optional


def _comma_list(item: type):
    def parse(text: str) -> list:
        return [item(x) for x in text.split(",") if x.strip()]

    parse.__name__ = f"comma list of {item.__name__}"
    return parse


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per field of `cls`. Metadata: help, flag (another name), positional, choices,
    metavar, action "append" / nargs (lists given as repeated flags / several values; other lists
    are comma-separated), cli False (not an option). A field without a default is required."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        base, item, _ = _unwrap(hints[f.name])
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        default = f.default if f.default is not MISSING else (f.default_factory() if has_default else None)
        kw: dict = {"help": meta.get("help")}
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        if meta.get("positional"):
            parser.add_argument(f.name, type=base if base is not list else str, **kw)
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if base is bool:
            if default:  # on by default: the flag turns it off
                parser.add_argument(flag.replace("--", "--no-", 1), dest=f.name, action="store_false", **kw)
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", **kw)
            continue
        if base is list:
            if meta.get("action") == "append":
                kw.update(action="append", type=item)
            elif "nargs" in meta:
                kw.update(nargs=meta["nargs"], type=item)
            else:
                kw["type"] = _comma_list(item)
                if default:
                    kw["help"] = f"{kw['help'] or 'comma list'} (default {','.join(str(x) for x in default)})"
        else:
            kw["type"] = base
        if has_default:
            kw["default"] = default
        else:
            kw["required"] = True
        parser.add_argument(flag, dest=f.name, **kw)


def config_from_args(cls, ns: argparse.Namespace):
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True) is not False]
    return cls(**{n: getattr(ns, n) for n in names})


def _add_commands(sub, table: dict, path: tuple[str, ...]) -> None:
    for name, spec in table.items():
        if isinstance(spec, dict):
            p = sub.add_parser(name, help=f"{name} jobs")
            _add_commands(p.add_subparsers(dest="_".join((*path, name)), required=True), spec, (*path, name))
            continue
        module, cls_name, fn, help_text, _ = spec
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_spec=spec)
        add_config_args(p, getattr(importlib.import_module(module), cls_name))


def _wants(argv: list[str]) -> tuple[str, ...]:
    """The subcommand path named on the command line (only those modules are imported)."""
    node, path = COMMANDS, ()
    for a in argv:
        if not isinstance(node, dict) or a not in node:
            break
        path, node = (*path, a), node[a]
    return path


# --- train / finetune: run-config overrides -----------------------------------------------------


def train_command(argv: list[str]) -> int:
    """`soda train [--nproc N] --config ... [--section.key value ...]` (training/spawn.py starts the ranks)."""
    from megatron_soda.training import spawn

    try:
        nproc, rest = spawn.split_nproc(argv)
    except ValueError as e:
        print(f"soda train: error: {e}", file=sys.stderr)
        return 2
    return spawn.train(nproc, rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_library_warnings()  # before anything imports megatron-core (building the parser does)
    if argv and argv[0] == "train":
        return train_command(argv[1:])
    if argv and argv[0] == "finetune":
        from megatron_soda.training.finetune import main as finetune_main

        return finetune_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="soda",
        description="megatron-soda: SODA audio foundation models",
        epilog="soda train --config configs/<preset>.yaml [--nproc N] "
        "[--section.key value ...]: train (see `soda train --help`); "
        "soda finetune --init-from RUN --run-dir DIR ...: fine-tune (see `soda finetune --help`)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = _wants(argv)
    table = {k: v for k, v in COMMANDS.items() if not wanted or k == wanted[0]}  # --help lists every command
    _add_commands(sub, table, ())
    spec_of = COMMANDS
    for name in wanted:
        spec_of = spec_of[name]
    passes_rest = isinstance(spec_of, tuple) and spec_of[4]
    args, rest = parser.parse_known_args(argv) if passes_rest else (parser.parse_args(argv), [])
    module, cls_name, fn_name, _, _ = args._spec
    mod = importlib.import_module(module)
    job = getattr(mod, fn_name)
    try:
        cfg = config_from_args(getattr(mod, cls_name), args)
        job(cfg, rest) if passes_rest else job(cfg)
    except KeyboardInterrupt:
        print("soda: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("SODA_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"soda {' '.join(wanted) or args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
