"""`soda <subcommand>`: the one entry point for user-facing jobs.

Errors a user can fix (bad paths, bad settings, mismatched layouts) end as one line on stderr and
exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tokenization.documents import FORMATS

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError, OSError)


def _add_corpus(sub) -> None:
    p = sub.add_parser("corpus", help="make the bundled tiny espeak-ng corpus (demo and tests)")
    p.add_argument("--out", default="data/tiny")
    p.add_argument("--utterances", type=int, default=160)
    p.add_argument("--text-docs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--s2st",
        type=int,
        default=0,
        metavar="PAIRS",
        help="instead: a French->English speech-translation corpus of PAIRS pairs (same voice both sides)",
    )


def _cmd_corpus(a) -> None:
    from tokenization.tiny_corpus import make_corpus, make_s2st_corpus

    if a.s2st:
        print(f"tiny S2ST corpus: {make_s2st_corpus(a.out, a.s2st, a.seed)} ({a.s2st} fr->en pairs)")
        return
    manifest = make_corpus(a.out, a.utterances, a.text_docs, a.seed)
    print(
        f"tiny corpus: {manifest} ({a.utterances} utterances) and {Path(a.out) / 'text'} ({a.text_docs} text documents)"
    )


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="build the SODA tokenizer (text tokenizer + delimiters + audio tokens)")
    p.add_argument("--base", help="HF tokenizer name or path to extend (production: a Llama-3 tokenizer)")
    p.add_argument("--train-tiny", metavar="TEXT_FILE", help="instead, train a small BPE on this text file (tests)")
    p.add_argument("--vocab-size", type=int, default=1024, help="with --train-tiny")
    p.add_argument("--out", required=True)


def _cmd_tokenizer(a) -> None:
    from tokenization.text_tokenizer import extend_tokenizer, load_tokenizer, save_tokenizer, train_tiny_bpe

    if bool(a.base) == bool(a.train_tiny):
        raise ValueError("tokenizer: give exactly one of --base NAME_OR_PATH or --train-tiny TEXT_FILE")
    if a.train_tiny:
        lines = Path(a.train_tiny).read_text(encoding="utf-8").splitlines()
        base = train_tiny_bpe(lines, a.vocab_size)
    else:
        base = load_tokenizer(a.base)
    tok, layout = extend_tokenizer(base)
    save_tokenizer(tok, a.out)
    print(
        f"SODA tokenizer -> {a.out}: text {layout.text_vocab_size}, delimiters {layout.text_vocab_size}.."
        f"{layout.audio_end}, audio {layout.audio_offset}..{layout.vocab_size - 1}, total {layout.vocab_size}"
    )


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize audio/transcripts/text into packed WebDataset shards")
    p.add_argument("--input", action="append", required=True, help="JSONL manifest or directory (repeatable)")
    p.add_argument("--output", required=True)
    p.add_argument("--tokenizer", required=True, help="HF tokenizer name/path (extended on the fly if plain)")
    p.add_argument("--codec", default="kyutai/mimi", help="Mimi name/path, or random:<seed> for a random codec")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--formats", default="text_first,audio_first", help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--num-codebooks", type=int, default=8, help="codebooks kept: 1 = semantic only ... 8")
    p.add_argument("--files-per-shard", type=int, default=256)
    p.add_argument("--batch-seconds", type=float, default=240.0, help="audio per codec batch (longest clip x count)")
    p.add_argument(
        "--max-seconds", type=float, default=60.0, help="longer paired files are skipped, audio-only chunked"
    )
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--rank", type=int, default=None, help="this task's share (default: SLURM_ARRAY_TASK_ID or 0)")
    p.add_argument(
        "--world-size", type=int, default=None, help="number of tasks (default: SLURM_ARRAY_TASK_COUNT or 1)"
    )
    p.add_argument("--no-progress", action="store_true")


def _cmd_prepare(a) -> None:
    import os

    from tokenization.prepare import PrepareConfig, prepare, print_summary

    rank = a.rank if a.rank is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
    world = a.world_size if a.world_size is not None else int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    cfg = PrepareConfig(
        inputs=a.input,
        output=a.output,
        tokenizer=a.tokenizer,
        codec=a.codec,
        device=a.device,
        seq_len=a.seq_len,
        formats=a.formats,
        num_codebooks=a.num_codebooks,
        files_per_shard=a.files_per_shard,
        batch_seconds=a.batch_seconds,
        max_seconds=a.max_seconds,
        num_workers=a.num_workers,
        rank=rank,
        world_size=world,
    )
    summary = prepare(cfg, progress=not a.no_progress)
    if summary.get("pending_shards"):
        print(
            f"rank {rank} done; {summary['pending_shards']} shard(s) of other ranks still missing: "
            "the last rank to finish writes index.json (or re-run this command)"
        )
    else:
        print_summary(summary, Path(a.output))


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="a shard set (decode a few samples) or a checkpoint (config, shapes)")
    p.add_argument("path", help="a `soda prepare` output, or a run dir / checkpoint")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--chars", type=int, default=300, help="characters of each decoded sample to print")


def _cmd_inspect(a) -> None:
    if (Path(a.path) / "index.json").is_file():
        from megatron_soda.inspect_shards import inspect

        inspect(a.path, a.samples, a.chars)
    else:
        from checkpoints_tools.inspect_checkpoint import inspect_checkpoint

        inspect_checkpoint(a.path)


def _add_export(sub) -> None:
    p = sub.add_parser("export-hf", help="megatron checkpoint (any layout) -> Hugging Face Qwen3 folder")
    p.add_argument("checkpoint", help="run dir, its checkpoints/ or one iter_* directory")
    p.add_argument("out")
    p.add_argument("--tokenizer", help="SODA tokenizer to include (default: the training shards' copy)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--verify", action="store_true", help="compare logits and greedy output with transformers")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _cmd_export(a) -> None:
    from checkpoints_tools.hf_export import export_hf

    report = export_hf(a.checkpoint, a.out, a.tokenizer, a.dtype, a.verify, a.max_shard_gb, a.force)
    print(
        f"exported {report['checkpoint']} (step {report['step']}) -> {a.out}"
        + ("" if report["tokenizer"] else " (no tokenizer found: pass --tokenizer)")
    )
    if "verify" in report:
        v = report["verify"]
        print(
            f"verify: max |logit diff| {v['max_abs_logit_diff']:.2e} (tolerance {v['tolerance']:g}, logits up to "
            f"{v['logit_scale']:.2f}), greedy 20 tokens identical: {v['greedy_identical']}"
        )
        Path(a.out, "export_verify.json").write_text(json.dumps(v, indent=1))
        if not v["ok"]:
            raise RuntimeError("export verification failed: the Hugging Face model does not reproduce ours")


def _add_import(sub) -> None:
    p = sub.add_parser("import-hf", help="Hugging Face Qwen3 folder -> megatron checkpoint (init_from)")
    p.add_argument("hf_dir")
    p.add_argument("out", help="a run directory; its checkpoints/ is what --checkpoint.init_from takes")
    p.add_argument("--tokenizer", help="resize the vocabulary to this SODA tokenizer's layout")
    p.add_argument("--seed", type=int, default=0, help="for the new vocabulary rows")
    p.add_argument("--force", action="store_true")


def _cmd_import(a) -> None:
    from checkpoints_tools.hf_import import import_hf

    r = import_hf(a.hf_dir, a.out, a.tokenizer, a.seed, a.force)
    resized = f" (vocabulary {r['resized_from']} -> {r['vocab']})" if r["vocab"] != r["resized_from"] else ""
    print(
        f"imported {a.hf_dir} -> {r['checkpoint']}{resized}; "
        f"train from it with --checkpoint.init_from {r['checkpoint']}"
    )


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print numbers")
    bsub = p.add_subparsers(dest="bench", required=True)
    lp = bsub.add_parser("loader", help="training data loader tokens/s per worker")
    lp.add_argument("--shards", help="a shard set (default: a synthetic seq-4096 set)")
    lp.add_argument("--workers", default="0,1,2", help="comma list of worker counts")
    lp.add_argument("--micro-batch", type=int, default=8)
    lp.add_argument("--seconds", type=float, default=3.0)
    lp.add_argument("--json", help="also write the rows here")
    kp = bsub.add_parser("kernels", help="fused embedding / linear+CE vs megatron-core and torch (fwd+bwd)")
    kp.add_argument("--hidden", default="576,1024,2048,2560", help="comma list of hidden sizes")
    kp.add_argument("--tokens", default="8192,32768", help="comma list of tokens per micro-batch")
    kp.add_argument("--tp", type=int, default=1, help="vocab rows per rank = 144,644 / TP")
    kp.add_argument("--vocab", type=int, default=None, help="override the vocabulary (small shapes on CPU)")
    kp.add_argument("--reps", type=int, default=5)
    kp.add_argument("--json", help="also write the rows here")
    tp = bsub.add_parser(
        "train",
        help="training tokens/s, TFLOP/s, MFU, step split and peak memory; ours vs transformers and kernels off",
        description="Extra --section.key value flags override the preset, as in `soda train` "
        "(e.g. --parallel.tp 2 --train.micro_batch_size 4 --train.seq_length 4096 --parallel.recompute full).",
    )
    tp.add_argument("--config", help="preset YAML (configs/soda-135m.yaml ...)")
    tp.add_argument("--nproc", type=int, default=1, help="ranks for our variants (TP x PP x DP); baselines use one")
    tp.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    tp.add_argument("--steps", type=int, default=10, help="measured steps (median reported)")
    tp.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    tp.add_argument(
        "--variants",
        default="ours,ours-nokernels,hf",
        help="comma list of ours, ours-nokernels, ours-off (speed levers off), ours-off+<lever>[+<lever>] "
        "(levers: graphs, wgrad, norm, rope, adam), hf, hf-compile (transformers + torch.compile)",
    )
    tp.add_argument(
        "--baseline-micro-batch",
        type=int,
        default=0,
        help="micro-batch of the transformers baselines (same global batch; default: ours'), for when "
        "theirs does not fit at ours' size",
    )
    tp.add_argument("--results", default="bench/results/train.jsonl", help="JSON lines, appended")
    tp.add_argument("--plot", default="bench/results/train.png", help="bar chart of the results file")
    tp.add_argument("--label", default="", help="name of this configuration in the table and plot")
    tp.add_argument("--profile", help="write torch.profiler traces + top operators per variant here")
    zp = bsub.add_parser("tokenize", help="Mimi encoding throughput (audio-seconds per wall-second), batched")
    zp.add_argument("--codec", default="kyutai/mimi", help="HF name/path, or random:<seed> (random weights)")
    zp.add_argument("--device", default="cuda" if _cuda() else "cpu")
    zp.add_argument("--batch", default="1,8,32", help="comma list of clips per batch")
    zp.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    zp.add_argument("--reps", type=int, default=3)
    zp.add_argument("--audio", help="a speech file to tile (default: seeded noise, same compute)")
    zp.add_argument("--json", help="also write the rows here")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cmd_bench(a, rest: list[str]) -> None:
    if a.bench != "train" and rest:
        raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
    if a.bench == "train":
        from megatron_soda.benchmarks.train import check_variant, run_suite

        variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        if not variants:
            raise ValueError("--variants: none given")
        for v in variants:
            try:
                check_variant(v)
            except ValueError as e:
                raise ValueError(f"--variants: {e}") from None
        rows = run_suite(
            a.config,
            rest,
            variants,
            a.nproc,
            a.device,
            a.steps,
            a.warmup,
            a.results,
            a.plot or None,
            a.label,
            a.profile,
            command="soda bench train " + " ".join(sys.argv[3:]),
            baseline_micro_batch=a.baseline_micro_batch,
        )
    elif a.bench == "tokenize":
        from megatron_soda.benchmarks.tokenize import run as run_tokenize

        rows = run_tokenize(a.codec, a.device, [int(b) for b in a.batch.split(",")], a.seconds, a.reps, a.audio)
    elif a.bench == "loader":
        from megatron_soda.benchmarks.loader import run

        rows = run(a.shards, [int(w) for w in a.workers.split(",")], a.micro_batch, a.seconds)
    else:
        from megatron_soda.benchmarks.kernels import run as run_kernels

        rows = run_kernels(
            [int(x) for x in a.hidden.split(",")], [int(x) for x in a.tokens.split(",")], a.tp, a.reps, a.vocab
        )
    if getattr(a, "json", None):
        Path(a.json).write_text(json.dumps(rows, indent=1))


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue audio/text prompts (asr, tts, s2st, continue) -> WAV + text")
    p.add_argument("model", help="an exported HF folder, or a run directory / checkpoint (exported on the fly)")
    p.add_argument("--task", default="continue", choices=["continue", "asr", "tts", "s2st"])
    p.add_argument("--audio", nargs="*", default=[], help="prompt audio files (one per prompt; batched)")
    p.add_argument("--text", nargs="*", default=[], help="prompt texts (one per prompt)")
    p.add_argument("--out", default="generations")
    p.add_argument(
        "--codec", default="kyutai/mimi", help="Mimi name/path or random:<seed> (must match the training data)"
    )
    p.add_argument("--tokenizer", help="default: the model folder's / checkpoint's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--temperature", type=float, default=0.9, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--max-seconds", type=float, default=10.0, help="longest audio segment generated")
    p.add_argument("--max-text-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)


def _cmd_generate(a) -> None:
    from megatron_soda.generate import main_cli

    main_cli(a)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="likelihood benchmarks, ASR (WER), S2ST (ASR-BLEU) -> JSON + Markdown report")
    p.add_argument("model", help="an exported HF folder, or a run directory / checkpoint")
    p.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="KIND:FILE.jsonl",
        help="minimal_pairs | salmon | storycloze | multiple_choice | asr | s2st, with its JSONL (repeatable)",
    )
    p.add_argument("--out", default="eval", help="writes OUT/report.json and OUT/report.md")
    p.add_argument("--codec", default="kyutai/mimi")
    p.add_argument("--tokenizer")
    p.add_argument("--device", default="cpu")
    p.add_argument("--asr", default="self", help="S2ST transcriber: self | hf:<model> | module:function")
    p.add_argument("--max-seconds", type=float, default=10.0)


def _cmd_eval(a) -> None:
    from megatron_soda.evals import markdown, run

    tasks = []
    for t in a.task:
        kind, sep, path = t.partition(":")
        if not sep or not path:
            raise ValueError(f"--task {t!r}: expected KIND:FILE.jsonl")
        tasks.append((kind, path))
    report = run(a.model, tasks, a.codec, a.device, a.tokenizer, a.asr, a.max_seconds)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    md = markdown(report)
    (out / "report.md").write_text(md)
    print(md)
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="loss curves of a training run as a PNG")
    p.add_argument("run_dir")
    p.add_argument("--out", help="default: RUN_DIR/loss.png")


def _cmd_plot(a) -> None:
    from megatron_soda.plots import ascii_curve, plot_loss

    print(ascii_curve(a.run_dir))
    print(f"plot: {plot_loss(a.run_dir, a.out)}")


def _add_launch(sub) -> None:
    p = sub.add_parser("launch", help="render and submit SLURM jobs (training, tokenization arrays)")
    lsub = p.add_subparsers(dest="launch", required=True)
    t = lsub.add_parser("slurm", help="sbatch a training run: srun + torchrun, USR1 -> checkpoint -> requeue")
    t.add_argument("--config", required=True)
    t.add_argument("--nodes", type=int, default=1)
    t.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes (CPU backend)")
    t.add_argument("--tasks-per-node", type=int, default=0, help="ranks per CPU node (with --gpus-per-node 0)")
    t.add_argument("--time", default="24:00:00")
    t.add_argument("--partition", default="")
    t.add_argument("--account", default="")
    t.add_argument("--job-name", default="soda")
    t.add_argument("--run-dir", required=True)
    t.add_argument("--venv", default=".venv", help="python environment on the nodes ('' for the PATH's python)")
    t.add_argument("--container", default="", help="pyxis/enroot image instead of the venv")
    t.add_argument("--signal-grace", type=int, default=120, help="seconds of warning before the time limit")
    t.add_argument("--port", type=int, default=29500)
    t.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    a = lsub.add_parser("prepare", help="sbatch a job array of `soda prepare` over disjoint slices")
    a.add_argument("--tasks", type=int, default=8)
    a.add_argument("--time", default="12:00:00")
    a.add_argument("--partition", default="")
    a.add_argument("--account", default="")
    a.add_argument("--cpus-per-task", type=int, default=8)
    a.add_argument("--gpus-per-task", type=int, default=0)
    a.add_argument("--log-dir", default="logs")
    a.add_argument("--venv", default=".venv")
    a.add_argument("--dry-run", action="store_true")


def _cmd_launch(a, rest: list[str]) -> None:
    from launch.slurm import PrepareArray, SlurmJob, render_prepare, render_train, submit

    if a.launch == "slurm":
        job = SlurmJob(
            config=a.config,
            overrides=rest,
            nodes=a.nodes,
            gpus_per_node=a.gpus_per_node,
            tasks_per_node=a.tasks_per_node,
            time=a.time,
            partition=a.partition,
            account=a.account,
            job_name=a.job_name,
            run_dir=a.run_dir,
            venv=a.venv,
            container=a.container,
            signal_grace_s=a.signal_grace,
            port=a.port,
        )
        script, path = render_train(job), Path(a.run_dir) / "slurm" / "train.sbatch"
    else:
        arr = PrepareArray(
            prepare_args=rest,
            tasks=a.tasks,
            time=a.time,
            partition=a.partition,
            account=a.account,
            cpus_per_task=a.cpus_per_task,
            gpus_per_task=a.gpus_per_task,
            log_dir=a.log_dir,
            venv=a.venv,
        )
        script, path = render_prepare(arr), Path(a.log_dir) / "prepare.sbatch"
    if a.dry_run:
        print(script)
        return
    job_id = submit(script, path)
    print(f"submitted {path} as job {job_id}")


def _add_isoflop(sub) -> None:
    p = sub.add_parser("isoflop", help="the scaling-law study: plan a grid, run it, fit and plot it")
    isub = p.add_subparsers(dest="isoflop", required=True)
    pl = isub.add_parser("plan", help="budgets x widths -> training configs + plan.csv")
    pl.add_argument("--budgets", default=",".join(f"{c:g}" for c in [3e18, 9e18, 1.8e19, 3e19, 9e19, 1.8e20, 3e20]))
    pl.add_argument("--widths", default="512,768,1024,1280,1536,1792,2048")
    pl.add_argument("--head-dim", type=int, default=128)
    pl.add_argument("--seq-len", type=int, default=4096)
    pl.add_argument("--vocab", type=int, default=144_644)
    pl.add_argument("--global-batch", type=int, default=None, help="fixed batch (default: the sweep's rule)")
    pl.add_argument("--micro-batch", type=int, default=1)
    pl.add_argument("--flops", default="6nd", choices=["6nd", "attention"])
    pl.add_argument("--base-config", default=None)
    pl.add_argument("--out", required=True)
    rn = isub.add_parser("run", help="train the planned grid (resumable) and write runs.csv")
    rn.add_argument("--plan", required=True, help="the directory `soda isoflop plan` wrote")
    rn.add_argument("--base-config", required=True, help="data, device and the rest of each run's config")
    rn.add_argument("--out", required=True)
    rn.add_argument("--nproc", type=int, default=1)
    ft = isub.add_parser("fit", help="fit N*, D* power laws (+ parametric L(N, D)) and plot")
    ft.add_argument("--csv", required=True, help="columns compute, params (non-embedding N), tokens, loss")
    ft.add_argument("--out", required=True)
    ft.add_argument("--bootstrap", type=int, default=500)
    ft.add_argument("--predict", default="", help="comma list of budgets to predict N*, D*, loss for")


def _cmd_isoflop(a, rest: list[str]) -> None:
    from megatron_soda import isoflop as iso

    if a.isoflop == "plan":
        rows = iso.plan(
            [float(x) for x in a.budgets.split(",")],
            [int(x) for x in a.widths.split(",")],
            a.vocab,
            a.seq_len,
            a.head_dim,
            a.global_batch,
            a.flops,
        )
        path = iso.write_plan(rows, Path(a.out), a.base_config, a.seq_len, a.micro_batch)
        print(
            f"{len(rows)} runs planned ({a.flops}: C = 6 N D with N non-embedding"
            if a.flops == "6nd"
            else f"{len(rows)} runs planned (C = training FLOPs incl. LM head and attention",
            end="",
        )
        print(f") -> {path}")
        for r in rows:
            print(
                f"  C {r['compute']:.1e}  d {r['width']:>5}  L {r['num_layers']:>2}  N {r['params'] / 1e6:9.3f}M  "
                f"D {r['tokens'] / 1e6:10.2f}M  batch {r['batch']:>4}  steps {r['steps']:>7}  lr {r['lr']:.2e}"
            )
    elif a.isoflop == "run":
        path = iso.run_grid(Path(a.plan), a.base_config, Path(a.out), a.nproc, rest)
        print(f"runs -> {path}; fit with: soda isoflop fit --csv {path} --out {a.out}")
    else:
        result = iso.write_fit(iso.read_csv(a.csv), Path(a.out), a.bootstrap)
        lo, hi = result["n_exponent_ci95"]
        dlo, dhi = result["d_exponent_ci95"]
        print(f"{result['flops_convention']}")
        print(
            f"N* ~ C^{result['n_exponent']:.3f} (95% CI {lo:.3f}..{hi:.3f}), "
            f"D* ~ C^{result['d_exponent']:.3f} (95% CI {dlo:.3f}..{dhi:.3f}), "
            f"D/N exponent ratio {result['exponent_ratio_d_over_n']:.2f}"
        )
        print(f"{'C':>10} {'N*':>12} {'D*':>12} {'L*':>8}")
        for b in result["budgets"]:
            flag = "  (edge: left out)" if b["edge"] else ""
            print(f"{b['compute']:10.2e} {b['n_opt']:12.4g} {b['d_opt']:12.4g} {b['loss_opt']:8.4f}{flag}")
        par = result["parametric"]
        if "alpha" in par:
            print(
                f"parametric L = {par['E']:.3f} + {par['A']:.3g}/N^{par['alpha']:.3f} "
                f"+ {par['B']:.3g}/D^{par['beta']:.3f} "
                f"-> N* ~ C^{par['n_exponent']:.3f}, D* ~ C^{par['d_exponent']:.3f}"
            )
        for c in [float(x) for x in a.predict.split(",") if x]:
            p = iso.predict(result, c)
            print(
                f"predict C {c:.2e}: N* {p['n_opt']:.4g}, D* {p['d_opt']:.4g} "
                f"({p['tokens_per_param']:.1f} tokens/param), loss {p['loss']:.4f}"
            )
        print(f"fit -> {Path(a.out) / 'fit.json'}; plots: {', '.join(result['plots'])}")


COMMANDS = {
    "corpus": (_add_corpus, _cmd_corpus),
    "tokenizer": (_add_tokenizer, _cmd_tokenizer),
    "prepare": (_add_prepare, _cmd_prepare),
    "inspect": (_add_inspect, _cmd_inspect),
    "bench": (_add_bench, _cmd_bench),
    "plot": (_add_plot, _cmd_plot),
    "generate": (_add_generate, _cmd_generate),
    "eval": (_add_eval, _cmd_eval),
    "export-hf": (_add_export, _cmd_export),
    "import-hf": (_add_import, _cmd_import),
    "launch": (_add_launch, _cmd_launch),
    "isoflop": (_add_isoflop, _cmd_isoflop),
}


def train_command(argv: list[str]) -> int:
    """`soda train [--nproc N] --config ... [--section.key value ...]`.

    --nproc N spawns N local ranks through torchrun; under SLURM or an outer torchrun (RANK or
    SLURM_PROCID set) the existing environment is used and this process is one rank.
    """
    import os
    import subprocess

    nproc = 1
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--nproc":
            if i + 1 >= len(argv) or not argv[i + 1].isdigit():
                print("soda train: error: --nproc takes a number of local processes", file=sys.stderr)
                return 2
            nproc, i = int(argv[i + 1]), i + 2
        elif argv[i].startswith("--nproc="):
            nproc, i = int(argv[i].split("=", 1)[1]), i + 1
        else:
            rest.append(argv[i])
            i += 1
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if nproc > 1 and not launched:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks on one host share its cores
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "megatron_soda.train",
            *rest,
        ]
        return subprocess.call(cmd)
    from megatron_soda.train import main as train_main

    return train_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        return train_command(argv[1:])
    if argv and argv[0] == "finetune":
        from megatron_soda.finetune import main as finetune_main

        return finetune_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="soda",
        description="megatron-soda: SODA audio foundation models",
        epilog="soda train --config configs/<preset>.yaml [--nproc N] "
        "[--section.key value ...]: train (see `soda train --help`); "
        "soda finetune --init-from RUN --run-dir DIR ...: fine-tune (see `soda finetune --help`)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    if argv and argv[0] in ("launch", "isoflop", "bench"):  # flags after the command's own go to the job / runs
        args, rest = parser.parse_known_args(argv)
    else:
        args, rest = parser.parse_args(argv), []
    import warnings

    # megatron-core warns at import about missing TE/apex (the CPU fallback is intended here)
    warnings.filterwarnings("ignore", module=r"megatron\.core.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        if args.command in ("launch", "isoflop", "bench"):
            COMMANDS[args.command][1](args, rest)
        else:
            COMMANDS[args.command][1](args)
    except KeyboardInterrupt:
        print("soda: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("SODA_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"soda {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
