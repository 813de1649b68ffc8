"""The registries that drive dispatch and help: `soda eval`'s tasks and `soda prepare`'s corpus-file
readers. What --help lists, what is dispatched and what an error names all come from one table, so
a task or format added there is offered, run and refused everywhere at once. No model, no codec."""

from __future__ import annotations

import json

import pytest

from megatron_soda import evals
from megatron_soda.cli import main
from megatron_soda.config import UserError
from megatron_soda.tokenization import inputs, readers
from megatron_soda.tools.bench import readers as bench_readers


def _no_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the command line was checked")


def test_every_eval_task_has_a_scorer_and_is_in_the_help(capsys):
    assert set(evals.PAIR_ALIASES) <= set(evals.TASKS)  # the benchmarks by name are tasks of their own
    assert all(callable(t.score) and t.summary for t in evals.TASKS.values())
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse's line wrapping undone
    for name, t in evals.TASKS.items():
        assert f"{name} ({t.summary})" in text


def test_eval_tasks_dispatch_to_their_scorers(monkeypatch):
    calls = []
    monkeypatch.setattr(evals, "eval_pairs", lambda sc, items, name, by=None, lower=False: calls.append((by, lower)))
    monkeypatch.setattr(evals, "eval_choice", lambda sc, items, name, key: calls.append(key))
    monkeypatch.setattr(evals, "eval_asr", lambda sc, items, name: calls.append("asr"))
    for kind in ("minimal_pairs", "tblimp", "swuggy", "salmon", "storycloze", "multiple_choice", "asr"):
        evals.TASKS[kind].score(None, [], kind, "self", "")
    assert calls == [(None, False), (None, True), (None, False), ("task", False), "prompt", "context", "asr"]
    assert evals.TASKS["tts"].score is evals.eval_tts and evals.TASKS["s2st"].score is evals.eval_s2st


def test_an_unknown_eval_task_is_refused_naming_the_known_ones(monkeypatch):
    import megatron_soda.generate

    with pytest.raises(UserError) as e:
        evals.lookup_task("nosuch")
    assert all(name in str(e.value) for name in evals.TASKS)
    monkeypatch.setattr(megatron_soda.generate, "load_model", _no_model)
    with pytest.raises(evals.EvalDataError, match="--task nosuch: expected one of minimal_pairs"):
        evals.run("model", [("nosuch", "x.jsonl")], None, "cpu", None, "self", None)


def test_soda_eval_refuses_an_unknown_task_in_one_line_before_any_model(monkeypatch, capsys, tmp_path):
    import megatron_soda.generate

    monkeypatch.setattr(megatron_soda.generate, "load_model", _no_model)
    assert main(["eval", "--task", "nosuch:x.jsonl", str(tmp_path / "some_folder")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("soda eval: error: --task nosuch: expected one of ")
    assert err.endswith(", ".join(evals.TASKS))


def test_the_reader_registry_is_what_prepare_reads_and_lists(capsys, tmp_path):
    assert readers.RECORD_SUFFIXES == tuple(readers.READERS)
    for suffix in readers.RECORD_SUFFIXES:
        (tmp_path / f"corpus{suffix}").write_bytes(b"")
        assert readers.reader_of(tmp_path / f"CORPUS{suffix.upper()}") is readers.READERS[suffix]
        assert readers.is_record_file(tmp_path / f"corpus{suffix}")
    assert readers.reader_of(tmp_path / "notes.txt") is None
    assert inputs.CORPUS_SUFFIXES == tuple(s for s in readers.RECORD_SUFFIXES if s != ".jsonl")

    assert main(["prepare", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"corpus file ({'/'.join(inputs.CORPUS_SUFFIXES)})" in text
    with pytest.raises(inputs.InputError) as e:  # a UserError: one line
        inputs.discover([str(tmp_path / "missing")], paired_needed=False)
    assert isinstance(e.value, UserError)
    assert all(f"{s} ({readers.READERS[s].name})" in str(e.value) for s in inputs.CORPUS_SUFFIXES)


def test_the_readers_bench_writes_and_reads_every_registered_format(tmp_path):
    assert set(bench_readers.WRITERS) == set(readers.RECORD_SUFFIXES)
    records = [{"text": f"document {i}", "id": f"d{i}"} for i in range(3)]
    for suffix, write in bench_readers.WRITERS.items():
        path = tmp_path / f"corpus{suffix}"
        write(records, path)
        back = [rec for _, rec in readers.read_records(path)]
        assert [r["text"] for r in back] == [r["text"] for r in records], suffix


def test_a_manifest_of_any_name_reads_as_jsonl(tmp_path):
    path = tmp_path / "manifest.list"
    path.write_text(json.dumps({"text": "a"}) + "\n\n[1]\n")
    assert list(readers.read_records(path)) == [(1, {"text": "a"}), (3, "not a JSON object")]


def test_errors_for_bad_input_are_user_errors():
    from megatron_soda.checkpoints_tools.qwen3_mapping import MappingError
    from megatron_soda.tokenization.text_tokenizer import TokenizerError

    for cls in (MappingError, inputs.InputError, TokenizerError, evals.EvalDataError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)
