import re

import pytest

from megatron_soda.cli import main


def test_bench_loader_prints_tokens_per_second(capsys, tmp_path):
    assert main(["bench", "loader", "--seconds", "0.3", "--workers", "0,1", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s*(\d+)(?: \(main\))?\s+(on|off)\s+([\d,]+)\s+([\d,]+)$", out, flags=re.M)
    assert [r[:2] for r in rows] == [("0", "on"), ("0", "off"), ("1", "on"), ("1", "off")]  # checksums on / off
    assert all(int(r[2].replace(",", "")) > 0 for r in rows)
    assert "goal >= 20,000,000 tokens/s per core" in out


@pytest.mark.slow
def test_inspect_decodes_samples(prepared, capsys):
    assert main(["inspect", str(prepared), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "<BOS><|text_start|>" in out and "[audio: " in out and "144644" not in out
    assert "--- sample 1" in out


def test_tokenizer_command(tmp_path, corpus, capsys):
    assert (
        main(
            [
                "tokenizer",
                "--train-tiny",
                str(corpus / "sentences.txt"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "text 300, delimiters 300..303, audio 304..16687, total 16688" in out, out
    from megatron_soda.tokenization.text_tokenizer import load_soda_tokenizer

    tok, layout = load_soda_tokenizer(str(tmp_path / "tok"))  # the folder holds what it said
    assert (layout.text_vocab_size, layout.vocab_size, len(tok)) == (300, 16_688, 16_688)
    assert tok.convert_tokens_to_ids("<|audio_end|>") == 303 == layout.audio_end
    assert main(["tokenizer", "--out", str(tmp_path / "x")]) == 2  # neither --base nor --train-tiny


def test_every_subcommand_takes_its_defaults_from_its_config_dataclass():
    """The CLI declares no default of its own: parsing a subcommand with only its required
    arguments gives the config dataclass's defaults, for every subcommand."""
    import dataclasses

    from megatron_soda import cli
    from megatron_soda.options import Parser, add_dataclass_options, dataclass_from_args

    for path, command in cli.leaves():
        cls = cli.load(command.config)
        assert callable(cli.load(command.job)), path
        parser = Parser()
        add_dataclass_options(parser, cls)
        argv = []
        for a in parser._actions:
            if a.required or not a.option_strings and a.dest != "help":
                argv += ([a.option_strings[0]] if a.option_strings else []) + ["1"]
        cfg = dataclass_from_args(cls, parser.parse_args(argv))
        for f in dataclasses.fields(cls):
            if (
                f.metadata.get("cli", True) is False
                or f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                continue
            want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(cfg, f.name) == want, (path, f.name)


HEAVY = ("torch", "megatron", "transformers", "scipy", "matplotlib", "pyarrow", "tensorboard")
IMPORT_PROBE = """
import contextlib, io, json, sys
from megatron_soda import cli
heavy = set(json.loads(sys.argv[1]))
report = {}
for argv in json.loads(sys.argv[2]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = cli.main(argv)
    report[" ".join(argv)] = [rc, sorted({m.split(".")[0] for m in sys.modules} & heavy), err.getvalue()]
print(json.dumps(report))
"""


def _probe(*argvs: list[str]) -> dict:
    """Run `soda ARGV` for each argv in one fresh interpreter; (exit code, heavy modules loaded so far, stderr)."""
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, json.dumps(HEAVY), json.dumps(list(argvs))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_help_and_refusals_import_no_heavy_library():
    """`soda --help`, every `soda <cmd> --help` and one-line refusals that need no model answer
    without importing torch, megatron-core or transformers (what made every command take ~5 s)."""
    from megatron_soda import cli

    helps = [["--help"]] + [[*path, "--help"] for path, _ in cli.leaves()]
    refusals = [
        ["import-hf", "/nonexistent", "x"],
        ["train", "--config", "configs/tiny.yaml", "--data.paths", "[/nonexistent]"],
        ["train", "--config", "configs/tiny.yaml", "--model.hiden_size", "8"],
        ["train", "--nproc", "two"],
    ]
    report = _probe(*helps, *refusals)
    for argv, (rc, heavy, err) in report.items():
        assert heavy == [], f"soda {argv} imported {heavy}"
        if argv.endswith("--help"):
            assert rc == 0, (argv, err)
        else:
            assert rc == 2 and err.count("\n") == 1 and "error:" in err, (argv, err)


def test_soda_help_lists_every_subcommand_and_train_help_every_setting(capsys):
    import dataclasses

    from megatron_soda import cli
    from megatron_soda.config import SodaConfig

    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"    {name} " in out or f"    {name}\n" in out, name
    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--nproc" in out and "--run-dir" in out
    for section in ("model", "parallel", "optim", "train", "data", "checkpoint"):
        for f in dataclasses.fields(getattr(SodaConfig(), section)):
            assert f"--{section}.{f.name}" in out, f"{section}.{f.name}"
    assert cli.main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--init-from" in out and "--optim.lr" in out and "--model." not in out


def test_one_parser_for_train_both_spellings_and_one_line_errors(capsys):
    """`--train.micro-batch-size` and `--train.micro_batch_size` both parse; abbreviations do not;
    every error is one line naming the key."""
    from megatron_soda import cli
    from megatron_soda.config import load_config
    from megatron_soda.options import Parser, add_run_config_options, parse_command

    parser = Parser(prog="soda train")
    add_run_config_options(parser)
    _, overrides, _ = parse_command(
        parser, ["--train.micro-batch-size", "4", "--optim.lr=1e-3", "--run-dir", "r"], True, False
    )
    cfg = load_config(None, overrides)
    assert (cfg.train.micro_batch_size, cfg.optim.lr, cfg.run_dir) == (4, 1e-3, "r")
    for argv, message in (
        (["--train.step", "3"], "unknown config key 'train.step'"),
        (["--train.steps", "many"], "train.steps: expected int, got 'many'"),
        (["--parallel.recompute", "some"], "parallel.recompute: expected none, selective or full, got 'some'"),
        (["--nproc", "2", "oops"], "unrecognized arguments: oops"),
    ):
        assert cli.main(["train", "--config", "configs/tiny.yaml", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
