"""docs/PERFORMANCE.md's numbers are its rows': the tables render from docs/bench and the commands it
prints for rerunning are ones the CLI and scripts/gpu_check.sh accept today."""

import json
import math
import re
import shlex
from pathlib import Path

import pytest

from megatron_soda.cli import COMMANDS, build_parser, main
from megatron_soda.config import UserError, load_config
from megatron_soda.model.flops import flops_per_token
from megatron_soda.options import parse_command
from megatron_soda.tools.bench import report

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "PERFORMANCE.md"
BENCH = ROOT / "docs" / "bench"


def test_check_passes_on_the_committed_doc(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(["bench", "report", "--check"]) == 0, capsys.readouterr().out


def test_check_fails_when_one_number_changes_and_report_restores_it(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(ROOT)
    text = DOC.read_text()
    start = text.index("<!-- report: train_h200 -->")
    m = re.compile(r"\d+\.\d%").search(text, start)  # the first MFU of the H200 table
    changed = text[: m.start()] + str(int(m.group()[0]) + 1 if m.group()[0] != "9" else 1) + text[m.start() + 1 :]
    copy = tmp_path / "PERFORMANCE.md"
    copy.write_text(changed)
    assert main(["bench", "report", "--check", "--doc", str(copy)]) == 1
    assert "'train_h200' differs" in capsys.readouterr().out
    assert copy.read_text() == changed  # --check writes nothing
    assert main(["bench", "report", "--doc", str(copy)]) == 0
    assert copy.read_text() == text


def test_every_renderer_has_one_region_and_every_region_a_renderer():
    names = report.markers(DOC.read_text())
    assert len(names) == len(set(names))
    assert set(names) == set(report.RENDERERS)


def test_unknown_region_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no renderer"):
        report.render_doc("<!-- report: nope -->\n<!-- /report -->\n", BENCH)


def test_causal_mfu_is_below_the_full_matrix_mfu_by_the_flops_ratio(monkeypatch):
    monkeypatch.chdir(ROOT)
    ours = {}
    for row in report.load_rows(BENCH, "train_h200.jsonl"):
        model = load_config(f"configs/{row['preset']}.yaml").model
        full = flops_per_token(model, row["seq_len"])
        causal = flops_per_token(model, row["seq_len"], causal=True)
        assert row["flops_per_token"] == full
        got = report.causal_mfu(row)
        assert got < row["mfu"]
        assert math.isclose(got, row["mfu"] * causal / full, rel_tol=1e-12)
        if row["variant"] == "ours":
            ours.setdefault(row["preset"], []).append(round(100 * got, 1))
    assert ours == {"soda-135m": [31.5, 31.4], "soda-1.7b": [48.0], "soda-600m": [40.2], "soda-4b": [47.9]}


def test_a_row_whose_flops_disagree_with_the_formula_fails_loudly(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    rows = report.load_rows(BENCH, "train_h200.jsonl")
    rows[0]["flops_per_token"] *= 1.01
    (tmp_path / "train_h200.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="flops_per_token"):
        report.render_train_h200(tmp_path)


def _cells(table: str, preset: str, variant: str) -> list[list[str]]:
    lines = [ln.strip("|").split(" | ") for ln in table.splitlines() if ln.startswith("| ")]
    return [[c.strip() for c in cells] for cells in lines if cells[0].strip() == preset and variant in cells]


def test_ratios_only_within_one_invocation_and_micro_batches_from_the_rows(monkeypatch):
    monkeypatch.chdir(ROOT)
    table = report.render_train_h200(BENCH)
    head = [c.strip() for c in table.split("\n\n")[1].splitlines()[0].strip("|").split("|")]
    col = {name: i for i, name in enumerate(head)}
    (hf135,) = _cells(table, "135M", "transformers Qwen3")
    assert hf135[col["micro x accum"]] == "2 x 8"  # run with --baseline-micro-batch 2, in its own invocation
    assert hf135[col["ours / this, same run"]].startswith("none")
    (hf17,) = _cells(table, "1.7B", "transformers Qwen3")
    assert hf17[col["micro x accum"]] == "1 x 16"
    assert hf17[col["ours / this, same run"]] == "1.97x (ours / this)"


# --- the commands the doc prints ----------------------------------------------------------------


def _code_spans(text: str) -> list[str]:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    inline = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [" ".join(s.split()) for s in blocks + inline]


def _gpu_check_parts() -> set[str]:
    """The parts the top-level `case $part in` of scripts/gpu_check.sh handles (nested cases skipped)."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    parts, depth = set(), 0
    for line in text[text.index("case $part in") :].splitlines()[1:]:
        code = line.split("#")[0]
        if re.search(r"\bcase\b", code):
            depth += 1
        if depth == 0 and (m := re.match(r"\s*([\w.-]+)\)", code)):
            parts.add(m.group(1))
        if re.search(r"\besac\b", code):
            if depth == 0:
                break
            depth -= 1
    return parts


def test_the_parts_parser_reads_the_script():
    assert {"smoke", "perf", "perf2", "kernels", "train", "tokenize"} <= _gpu_check_parts()
    assert "135m" not in _gpu_check_parts()  # the preset case inside `train)` is not a part


def _commands(prefix: str) -> list[list[str]]:
    out = []
    for span in _code_spans(DOC.read_text()):
        if prefix not in span or "<" in span or "$" in span:  # placeholders and shell variables
            continue
        for line in re.split(r"\s(?:&&|;|\|)\s", span):
            if prefix in line:
                out.append(shlex.split(line))
    return out


def test_every_gpu_check_command_in_the_doc_names_parts_and_variables_the_script_has():
    parts, script = _gpu_check_parts(), (ROOT / "scripts" / "gpu_check.sh").read_text()
    variables = set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", script))
    found = 0
    for words in _commands("scripts/gpu_check.sh"):
        at = words.index("scripts/gpu_check.sh")
        env = [w.split("=", 1)[0] for w in words[:at]]
        assert all(re.fullmatch(r"[A-Z_]+=.*", w) for w in words[:at]), words
        assert set(env) <= variables, (words, set(env) - variables)
        assert set(words[at + 1 :]) <= parts, (words, set(words[at + 1 :]) - parts)
        found += bool(words[at + 1 :])
    assert found >= 4


def test_every_soda_bench_command_in_the_doc_parses():
    found = 0
    for words in _commands("soda bench"):
        argv = words[words.index("soda") + 1 :]
        assert argv[0] == "bench" and argv[1] in COMMANDS["bench"], words
        spec = COMMANDS["bench"][argv[1]]
        parser = build_parser(("bench", argv[1]))
        parse_command(parser, argv, spec.run_config, spec.passthrough)  # raises on an unknown flag or value
        found += len(argv) > 2
    assert found >= 15  # the rows' commands under every training table, and the others'


def test_the_bench_chart_of_the_committed_rows_has_its_headline_and_ablation_figures(tmp_path):
    from megatron_soda.tools.plots import plot_bench

    rows = report.load_rows(ROOT / "docs" / "bench", "train_h200.jsonl")
    out = plot_bench(rows + report.load_rows(ROOT / "docs" / "bench", "train_cpu_long.jsonl"), tmp_path / "t.png")
    assert out.stat().st_size > 20_000 and (tmp_path / "t_levers.png").stat().st_size > 20_000


def test_kernel_tables_show_the_columns_their_rows_hold_and_the_fair_race(tmp_path):
    """A file of the fair race with the blockwise kernel: its columns and the race's op appear, in the
    peers' order; a file without them (the committed ones) keeps its columns."""

    def impl(name: str, seconds: float) -> dict:
        return {"impl": name, "seconds": seconds, "peak_mib": 100.0, "speedup_of_fused": seconds / 0.01}

    race = [impl("fused", 0.01), impl("torch", 0.02), impl("blockwise", 0.008), impl("cut-cross-entropy-exact", 0.009)]
    (tmp_path / "k.json").write_text(json.dumps([{"hidden": 576, "tokens": 8192, "ce_race": race}]))
    table = report.render_kernels("k.json")(tmp_path)
    head = table.split("\n\n")[1].splitlines()[0]
    assert head.index("ours blockwise ms") < head.index("torch ms") < head.index("cut-cross-entropy exact ms")
    assert "| linear + CE, fair race | 576 | 8,192 | 10.00 | 8.00 (0.80x) | 20.00 (2.00x) | 9.00 (0.90x) |" in table
    assert "blockwise" not in report.render_kernels("kernels_h200.json")(BENCH)
