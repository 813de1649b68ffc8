"""`soda <subcommand>`: the one entry point for user-facing jobs (and for every training rank).

Each subcommand is one entry of COMMANDS: its config dataclass (the options, megatron_soda/options.py)
and its job function, named as "module:attribute" so that only the command being run is imported.
`soda --help` imports none of them, `soda <cmd> --help` only the module holding that command's
config, which keeps torch, megatron-core and transformers out (tests/test_cli.py holds the import
set). Commands that shape a training run also take `--section.key VALUE` overrides of the run
config, passed to the job as a nested dict.

Errors go through `config.report_error`: a UserError is one line and exit code 2, anything else is
a bug and keeps its traceback (SODA_DEBUG=1 keeps it for user errors too).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from megatron_soda.config import quiet_library_warnings, report_error


@dataclass(frozen=True)
class Command:
    help: str
    config: str  # "module:Class": its fields are the options; the module must be light to import
    job: str  # "module:function", called with the config (and the overrides / the rest, below)
    run_config: bool = False  # takes --section.key overrides of a run config: job(config, overrides)
    sections: tuple[str, ...] = ("model", "parallel", "optim", "train", "data", "checkpoint", "eval")
    run_dir: bool = False  # --run-dir is a run-config override (else the command's own option, if any)
    withheld: str = ""  # why a run-config section left out of `sections` cannot be set here
    passthrough: bool = False  # unparsed flags go to the job: job(config, rest)


COMMANDS: dict = {
    "train": Command(
        "train a model, or resume its run directory (--nproc N local ranks)",
        "megatron_soda.training.spawn:TrainCommand",
        "megatron_soda.training.spawn:train_job",
        run_config=True,
        run_dir=True,
    ),
    "finetune": Command(
        "fine-tune a pretrained checkpoint on task shard sets (prompt tokens out of the loss)",
        "megatron_soda.training.finetune:FinetuneCommand",
        "megatron_soda.training.finetune:finetune_job",
        run_config=True,
        sections=("parallel", "optim", "train", "data", "checkpoint", "eval"),
        run_dir=True,
        withheld="--model.* cannot change in a fine-tune: the architecture is the pretrained checkpoint's",
    ),
    "corpus": Command(
        "make the bundled tiny espeak-ng corpus (demo and tests)",
        "megatron_soda.tokenization.tiny_corpus:CorpusConfig",
        "megatron_soda.tokenization.tiny_corpus:corpus_job",
    ),
    "tokenizer": Command(
        "build the SODA tokenizer (text tokenizer + delimiters + audio tokens)",
        "megatron_soda.tokenization.text_tokenizer:TokenizerConfig",
        "megatron_soda.tokenization.text_tokenizer:tokenizer_job",
    ),
    "prepare": Command(
        "tokenize audio/transcripts/text into packed WebDataset shards",
        "megatron_soda.tokenization.prepare:PrepareConfig",
        "megatron_soda.tokenization.prepare:prepare_job",
    ),
    "inspect": Command(
        "a shard set (decode a few samples) or a checkpoint (config, shapes)",
        "megatron_soda.tools.inspect:InspectConfig",
        "megatron_soda.tools.inspect:inspect_job",
    ),
    "export-hf": Command(
        "megatron checkpoint (any layout) -> Hugging Face Qwen3 folder",
        "megatron_soda.checkpoints_tools.hf_export:ExportConfig",
        "megatron_soda.checkpoints_tools.hf_export:export_job",
    ),
    "import-hf": Command(
        "Hugging Face Qwen3 folder -> megatron checkpoint (init_from)",
        "megatron_soda.checkpoints_tools.hf_import:ImportConfig",
        "megatron_soda.checkpoints_tools.hf_import:import_job",
    ),
    "bench": {
        "loader": Command(
            "training data loader tokens/s per worker",
            "megatron_soda.tools.bench.loader:LoaderBenchConfig",
            "megatron_soda.tools.bench.loader:bench_job",
        ),
        "kernels": Command(
            "fused embedding / linear+CE / RMSNorm / RoPE vs megatron-core, torch and peers (fwd+bwd)",
            "megatron_soda.tools.bench.kernels:KernelBenchConfig",
            "megatron_soda.tools.bench.kernels:bench_job",
        ),
        "train": Command(
            "training tokens/s, TFLOP/s, MFU, step split and peak memory; ours vs transformers, kernels "
            "and speed levers off (--section.key flags override the preset, as in `soda train`)",
            "megatron_soda.tools.bench.train:TrainBenchConfig",
            "megatron_soda.tools.bench.train:bench_job",
            run_config=True,
        ),
        "readers": Command(
            "soda prepare's corpus-file readers (every registered format): records/s, MB/s, audio-hours/s",
            "megatron_soda.tools.bench.readers:ReadersBenchConfig",
            "megatron_soda.tools.bench.readers:bench_job",
        ),
        "report": Command(
            "render docs/PERFORMANCE.md's measurement tables from the rows in docs/bench (--check: do they match)",
            "megatron_soda.tools.bench.report:ReportConfig",
            "megatron_soda.tools.bench.report:report_job",
        ),
        "generate": Command(
            "generation tokens/s at batch 1 and 64 (transformers' Qwen3 with a KV cache, bf16 on GPU)",
            "megatron_soda.tools.bench.generate:GenerateBenchConfig",
            "megatron_soda.tools.bench.generate:bench_job",
        ),
        "startup": Command(
            "how long soda takes to answer --help and a refusal (median wall seconds, fresh processes)",
            "megatron_soda.tools.bench.startup:StartupBenchConfig",
            "megatron_soda.tools.bench.startup:bench_job",
        ),
        "tokenize": Command(
            "Mimi encoding throughput (audio-seconds per wall-second), batched",
            "megatron_soda.tools.bench.tokenize:TokenizeBenchConfig",
            "megatron_soda.tools.bench.tokenize:bench_job",
        ),
    },
    "plan": Command(
        "which parallel layouts fit a preset on N GPUs and how fast: predicted memory, step time, MFU",
        "megatron_soda.tools.plan:PlanConfig",
        "megatron_soda.tools.plan:plan_job",
        run_config=True,
    ),
    "plot": Command(
        "loss curves of a training run as a PNG",
        "megatron_soda.tools.plots:PlotConfig",
        "megatron_soda.tools.plots:plot_job",
    ),
    "generate": Command(
        "continue audio/text prompts (asr, tts, s2st, continue) -> WAV + text",
        "megatron_soda.generate:GenerateConfig",
        "megatron_soda.generate:generate_job",
    ),
    "eval": Command(
        "likelihood benchmarks, ASR (WER), TTS, S2ST (ASR-BLEU) -> JSON + Markdown report",
        "megatron_soda.evals:EvalConfig",
        "megatron_soda.evals:eval_job",
    ),
    "launch": {
        "slurm": Command(
            "sbatch a training run: srun + torchrun, USR1 -> checkpoint -> requeue "
            "(--section.key flags override the config)",
            "megatron_soda.launch.slurm:SlurmJob",
            "megatron_soda.launch.slurm:slurm_job",
            run_config=True,
        ),
        "prepare": Command(
            "sbatch a job array of `soda prepare` over disjoint slices (extra flags go to soda prepare)",
            "megatron_soda.launch.slurm:PrepareArray",
            "megatron_soda.launch.slurm:prepare_array_job",
            passthrough=True,
        ),
        "isoflop": Command(
            "sbatch a planned IsoFLOP grid as a job array: one resumable run per task, runs.csv gathered "
            "(--section.key flags go to every run)",
            "megatron_soda.tools.isoflop.run:IsoflopArray",
            "megatron_soda.tools.isoflop.run:launch_array_job",
            run_config=True,
        ),
    },
    "isoflop": {
        "plan": Command(
            "budgets x widths -> training configs + plan.csv",
            "megatron_soda.tools.isoflop.plan:PlanConfig",
            "megatron_soda.tools.isoflop.plan:plan_job",
        ),
        "run": Command(
            "train the planned grid (resumable) and write runs.csv (--section.key flags go to every run)",
            "megatron_soda.tools.isoflop.run:RunConfig",
            "megatron_soda.tools.isoflop.run:run_job",
            run_config=True,
        ),
        "fit": Command(
            "fit N*, D* power laws (+ parametric L(N, D)) and plot",
            "megatron_soda.tools.isoflop.run:FitConfig",
            "megatron_soda.tools.isoflop.run:fit_job",
        ),
    },
}


def load(name: str):
    """ "module:attribute" -> the attribute (importing only that module)."""
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def leaves(table: dict = COMMANDS, path: tuple[str, ...] = ()):
    """(path, Command) of every subcommand, groups walked."""
    for name, spec in table.items():
        if isinstance(spec, dict):
            yield from leaves(spec, (*path, name))
        else:
            yield (*path, name), spec


def _wanted(argv: list[str]) -> tuple[str, ...]:
    """The subcommand path named on the command line (only that one's module is imported)."""
    node, path = COMMANDS, ()
    for a in argv:
        if not isinstance(node, dict) or a not in node:
            break
        path, node = (*path, a), node[a]
    return path


def build_parser(wanted: tuple[str, ...]):
    """The parser of `soda`: every subcommand listed with its help; options only for `wanted`."""
    from megatron_soda.options import Parser, add_dataclass_options, add_run_config_options

    parser = Parser(prog="soda", description="megatron-soda: SODA audio foundation models")

    def add(sub, table: dict, path: tuple[str, ...]) -> None:
        for name, spec in table.items():
            here = (*path, name)
            if isinstance(spec, dict):
                p = sub.add_parser(name, help=f"{name} jobs: " + ", ".join(spec), description=f"soda {name} jobs")
                add(p.add_subparsers(dest=" ".join(here), metavar="JOB", required=True), spec, here)
                continue
            usage = f"soda {' '.join(here)} [-h] [options] [--section.key VALUE ...]" if spec.run_config else None
            p = sub.add_parser(name, help=spec.help, description=spec.help, usage=usage)
            if here == wanted:
                add_dataclass_options(p, load(spec.config))
                if spec.run_config:
                    add_run_config_options(p, spec.sections, spec.run_dir)

    add(parser.add_subparsers(dest="command", metavar="COMMAND", required=True), COMMANDS, ())
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_library_warnings()  # before anything imports megatron-core
    wanted = _wanted(argv)
    prog = " ".join(("soda", *wanted))
    try:
        from megatron_soda.options import dataclass_from_args, parse_command

        spec = COMMANDS
        for name in wanted:
            spec = spec[name]
        command = spec if isinstance(spec, Command) else None
        parser = build_parser(wanted if command else ())
        if command is None:
            parser.parse_args(argv)  # --help, or the one-line error naming what is missing
            return 2
        ns, overrides, rest = parse_command(
            parser, argv, command.run_config, command.passthrough, command.sections, command.withheld
        )
        cfg = dataclass_from_args(load(command.config), ns)
        job = load(command.job)
        if command.run_config:
            result = job(cfg, overrides)
        elif command.passthrough:
            result = job(cfg, rest)
        else:
            result = job(cfg)
    except SystemExit as e:  # argparse's --help
        return e.code if isinstance(e.code, int) else 0
    except BaseException as e:  # noqa: BLE001 - the one printer decides what to show
        return report_error(e, prog)
    return result if type(result) is int else 0  # jobs return an exit code, or what they made


if __name__ == "__main__":
    sys.exit(main())
