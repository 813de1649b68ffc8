import re

from megatron_soda.cli import main


def test_bench_loader_prints_tokens_per_second(capsys, tmp_path):
    assert main(["bench", "loader", "--seconds", "0.3", "--workers", "0,1", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s*(\d+)(?: \(main\))?\s+(on|off)\s+([\d,]+)\s+([\d,]+)$", out, flags=re.M)
    assert [r[:2] for r in rows] == [("0", "on"), ("0", "off"), ("1", "on"), ("1", "off")]  # checksums on / off
    assert all(int(r[2].replace(",", "")) > 0 for r in rows)
    assert "goal >= 20,000,000 tokens/s per core" in out


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
    assert "total" in capsys.readouterr().out
    assert main(["tokenizer", "--out", str(tmp_path / "x")]) == 2  # neither --base nor --train-tiny


def test_every_subcommand_takes_its_defaults_from_its_config_dataclass():
    """The CLI declares no default of its own: parsing a subcommand with only its required
    arguments gives the config dataclass's defaults, for every subcommand."""
    import argparse
    import dataclasses
    import importlib

    from megatron_soda import cli

    def leaves(table, path=()):
        for name, spec in table.items():
            if isinstance(spec, dict):
                yield from leaves(spec, (*path, name))
            else:
                yield (*path, name), spec

    for path, (module, cls_name, fn, _, _) in leaves(cli.COMMANDS):
        cls = getattr(importlib.import_module(module), cls_name)
        assert callable(getattr(importlib.import_module(module), fn)), path
        parser = argparse.ArgumentParser()
        cli.add_config_args(parser, cls)
        argv = []
        for a in parser._actions:
            if a.required or not a.option_strings and a.dest != "help":
                argv += ([a.option_strings[0]] if a.option_strings else []) + ["1"]
        cfg = cli.config_from_args(cls, parser.parse_args(argv))
        for f in dataclasses.fields(cls):
            if (
                f.metadata.get("cli", True) is False
                or f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                continue
            want = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(cfg, f.name) == want, (path, f.name)
