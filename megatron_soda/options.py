"""Command-line options built from config dataclasses: the one parser of every `soda` command.

A command's options are the fields of its config dataclass (flag = field name with dashes, the
field's default, type and help); commands that start or shape a training run also take one
`--section.key VALUE` option per field of the run config (`SodaConfig`), typed and with the field's
help, grouped by section in `--help`. So a default is declared once, where the config is, and
`soda train --help` lists every setting a preset can hold.

Values of `--section.key` options are read as YAML (`[a, b]`, `true`, `1e-3`) and checked against
the field's type by `load_config`, which names the key in its error. Every parse error is one line
(`OptionError`), not argparse's usage block.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING
from typing import Literal

from megatron_soda.config import SodaConfig, UserError, check_overrides, parse_overrides

RUN_SECTIONS = ("model", "parallel", "optim", "train", "data", "checkpoint", "eval")
_OVERRIDE = "override:"  # dest prefix of the --section.key options


class OptionError(UserError):
    """A command line argparse could not take (unknown flag, missing or badly typed value)."""


class Parser(argparse.ArgumentParser):
    """argparse, with every error as an OptionError (one line, printed by `report_error`)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--train.step` must not quietly mean `--train.steps`
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise OptionError(f"{message} (see {self.prog} --help)")


def _unwrap(tp):
    """(base type, item type for lists, Literal choices or None) of a field's annotation."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return str, None, list(typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return list, typing.get_args(tp)[0], None
    return tp, None, None


def _comma_list(item: type):
    def parse(text: str) -> list:
        return [item(x) for x in text.split(",") if x.strip()]

    parse.__name__ = f"comma list of {item.__name__}"
    return parse


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """One argument per field of `cls`. Metadata: help, flag (another name), positional, choices,
    metavar, action "append" / nargs (lists given as repeated flags / several values; other lists
    are comma-separated), cli False (not an option). A field without a default is required."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        base, item, choices = _unwrap(hints[f.name])
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        default = f.default if f.default is not MISSING else (f.default_factory() if has_default else None)
        kw: dict = {"help": meta.get("help")}
        if "choices" in meta or choices:
            kw["choices"] = meta.get("choices", choices)
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


def dataclass_from_args(cls, ns: argparse.Namespace):
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True) is not False]
    return cls(**{n: getattr(ns, n) for n in names})


def _metavar(tp) -> str:
    base, item, choices = _unwrap(tp)
    if choices:
        return "|".join(choices)
    if base is list:
        return f"[{item.__name__}, ...]"
    return base.__name__ if isinstance(base, type) else "VALUE"


def add_run_config_options(parser: argparse.ArgumentParser, sections=RUN_SECTIONS, run_dir: bool = True) -> None:
    """`--section.key VALUE` for every field of the run config's `sections` (and `--run-dir`)."""
    cfg = SodaConfig()
    if run_dir:
        f = next(f for f in dataclasses.fields(cfg) if f.name == "run_dir")
        parser.add_argument(
            "--run-dir", dest=_OVERRIDE + "run_dir", metavar="DIR", default=argparse.SUPPRESS, help=f.metadata["help"]
        )
        parser.add_argument("--run_dir", dest=_OVERRIDE + "run_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for section in sections:
        obj = getattr(cfg, section)
        group = parser.add_argument_group(f"{section} (run config; values are YAML: 3, 1e-3, true, [a, b])")
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            default = getattr(obj, f.name)
            help_text = " ".join(x for x in (f.metadata.get("help", ""), f"(default {default!r})") if x)
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"{_OVERRIDE}{section}.{f.name}",
                metavar=_metavar(hints[f.name]),
                default=argparse.SUPPRESS,
                help=help_text,
            )


def _dotted_spelling(argv: list[str]) -> list[str]:
    """`--train.micro-batch-size` is `--train.micro_batch_size` (both spellings always parsed)."""
    out = []
    for a in argv:
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            key, eq, value = a[2:].partition("=")
            a = "--" + key.replace("-", "_") + eq + value
        out.append(a)
    return out


def parse_command(
    parser: argparse.ArgumentParser,
    argv: list[str],
    run_config: bool,
    passthrough: bool,
    sections=RUN_SECTIONS,
    withheld: str = "",
):
    """Parse `argv`; returns (namespace, run-config overrides as a nested dict, unparsed rest).
    An unknown `--section.key` is a ConfigError naming the key and the known ones; one of a section
    the command does not offer is refused with `withheld` (why it cannot be set there)."""
    argv = _dotted_spelling(argv) if run_config else argv
    ns, rest = parser.parse_known_args(argv)
    if rest and not passthrough:
        dotted = [a for a in rest if a.startswith("--") and "." in a]
        if run_config and dotted:
            section = dotted[0][2:].split(".", 1)[0]
            if section in RUN_SECTIONS and section not in sections:
                raise OptionError(withheld or f"--{section}.* cannot be set in {parser.prog}")
            check_overrides(parse_overrides(rest))  # names the unknown key and what is known
        raise OptionError(f"unrecognized arguments: {' '.join(rest)} (see {parser.prog} --help)")
    flat = []
    for dest, value in list(vars(ns).items()):
        if dest.startswith(_OVERRIDE):
            flat += [f"--{dest[len(_OVERRIDE) :]}", value]
            delattr(ns, dest)
    return ns, parse_overrides(flat), rest
