"""In-run downstream evaluation (training/downstream.py): the training ranks score `soda eval`'s
likelihood tasks with the megatron model itself, and must give soda eval's numbers on an HF export
of the same weights, in one process as under TP2 x PP2 and CP2 x DP2. Also `--dtype` of generate /
eval and `soda bench generate` on the CPU.

The checkpoint is a tiny model after 2 real training steps: what its answers are does not matter,
only that both implementations score every candidate alike. Each candidate's log-prob agrees to
TOL (fp32; different kernels and batch shapes), so the accuracies are equal as long as no item's
candidates lie within TOL of each other, which the test checks of its items first.

Run as a module (`python -m tests.test_downstream SPEC.json`, under torchrun for several ranks), this
file is one rank of the in-run side: a Trainer built as `soda train` builds it, the checkpoint's
weights, DownstreamEval.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launch import ROOT, env, run_train, soda

TOL = 1e-5  # per candidate score (a mean or sum of fp32 log-probs)
MARGIN = 20 * TOL  # every item's best candidate leads the next by more: accuracies cannot differ
RUNS = [(1, [(1, 1, 1)]), (4, [(2, 2, 1), (1, 1, 2)])]  # ranks, [(TP, PP, CP)]: one process group each


def _crop(src: Path, dst: Path, seconds: float) -> None:
    import soundfile as sf

    x, rate = sf.read(str(src))
    sf.write(str(dst), x[: int(seconds * rate)], rate)


def _write(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def task_files(corpus: Path, root: Path) -> dict[str, Path]:
    """Small task files of every in-run kind from the tiny corpus: text and audio candidates."""
    (root / "audio").mkdir(parents=True)
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows[:4]):
        _crop(corpus / r["audio"], root / "audio" / f"a{i}.wav", 0.4 + 0.08 * i)  # 5 to 8 frames
    a = [{"audio": f"audio/a{i}.wav"} for i in range(4)]
    text = [r["text"] for r in rows[4:7]]
    pairs = [{"positive": t, "negative": " ".join(reversed(t[:-1].split())) + "."} for t in text]
    pairs += [{"positive": a[0], "negative": a[1]}, {"positive": "Who", "negative": {"text": "WHO painted it?"}}]
    salmon = [
        {"positive": a[0], "negative": a[1], "task": "speaker"},
        {"positive": a[2], "negative": a[3], "task": "speaker"},
        {"positive": a[3], "negative": a[0], "task": "sentiment"},
    ]
    story = [
        {"prompt": a[0], "endings": [a[1], a[2], a[3]], "label": 0},
        {"prompt": {"text": text[0][:20]}, "endings": [text[0][20:], text[1][20:]], "label": 0},
    ]
    words = text[2].split()
    mc = [
        {
            "context": " ".join(words[:3]),
            "endings": [" " + " ".join(words[3:]), " the of a", " " + text[1]],
            "label": 0,
        },
        {"context": "Who", "endings": [" painted it?", " it painted?"], "label": 1},
    ]
    return {
        "minimal_pairs": _write(root / "pairs.jsonl", pairs),
        "tblimp": root / "pairs.jsonl",  # the same file, its text lower-cased
        "salmon": _write(root / "salmon.jsonl", salmon),
        "storycloze": _write(root / "story.jsonl", story),
        "multiple_choice": _write(root / "mc.jsonl", mc),
    }


def bad_task_files(root: Path) -> dict[str, list[str]]:
    """eval.tasks that must be refused before any step, each with what its one line says."""
    root.mkdir()
    missing = _write(root / "missing.jsonl", [{"positive": "a", "negative": "b"}, {"positive": "a"}])
    long = _write(root / "long.jsonl", [{"positive": " ".join(["word"] * 400), "negative": "b"}])
    no_audio = _write(root / "noaudio.jsonl", [{"positive": {"audio": "absent.wav"}, "negative": "b"}])
    return {
        f"{missing}:2: missing field 'negative'": [f"minimal_pairs:{missing}"],
        "more than train.seq_length 256 + 1": [f"swuggy:{long}"],
        "absent.wav: no such audio file": [f"salmon:{no_audio}"],
        "asr samples speech or text": [f"asr:{missing}"],
        "expected one of minimal_pairs": [f"nosuch:{missing}"],
    }


@dataclass
class Trained:
    run: Path  # a tiny run after 2 training steps: its checkpoint
    hf: Path  # its `soda export-hf` (once `report()` returned)
    specs: list[str]  # eval.tasks / soda eval --task
    bad: dict[str, list[str]]  # refused task lists, by what the refusal says
    thread: threading.Thread
    outcome: dict  # the thread's: {"report": ...} or {"error": ...}

    def report(self) -> dict:
        """soda eval's report on the export: waits for the thread that exports and evaluates."""
        self.thread.join()
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["report"]


@pytest.fixture(scope="module")
def trained(prepared, corpus, tmp_path_factory) -> Trained:
    """A tiny checkpoint after 2 training steps and task files; `soda export-hf` then `soda eval`
    run in a thread, beside the in-run side (which needs only the checkpoint): 2 cores both busy."""
    root = tmp_path_factory.mktemp("downstream")
    run, hf = root / "run", root / "hf"
    specs = [f"{kind}:{path}" for kind, path in task_files(corpus, root / "tasks").items()]
    # scored in the loop too, after the second step: the weights the checkpoint holds
    run_train(run, prepared, 1, "--train.steps", "2", "--eval.interval", "2", "--eval.tasks", json.dumps(specs))
    outcome: dict = {}

    def export_and_eval() -> None:
        try:
            soda("export-hf", str(run), str(hf))
            # no --codec: the export's soda.json names the codec
            soda("eval", str(hf), "--out", str(root / "eval"), *[a for s in specs for a in ("--task", s)])
            outcome["report"] = json.loads((root / "eval" / "report.json").read_text())
        except BaseException as e:  # noqa: BLE001 - raised again by Trained.report()
            outcome["error"] = e

    thread = threading.Thread(target=export_and_eval, daemon=True)
    thread.start()
    return Trained(run, hf, specs, bad_task_files(root / "bad"), thread, outcome)


def in_run(trained: Trained, tmp_path: Path, nproc: int, layouts: list[tuple[int, int, int]]) -> list[dict]:
    """DownstreamEval on `nproc` ranks, in each (TP, PP, CP) layout: every rank's metrics, reports and refusals."""
    from megatron_soda.parallel.processes import rank_env, torchrun

    out = tmp_path / f"out{nproc}"
    spec = {"run": str(trained.run), "layouts": layouts, "tasks": trained.specs, "bad": trained.bad, "out": str(out)}
    path = tmp_path / f"spec{nproc}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "tests.test_downstream", str(path)]
    if nproc > 1:
        cmd = torchrun(nproc, "tests.test_downstream", [str(path)])
    r = subprocess.run(cmd, capture_output=True, text=True, env=rank_env(nproc, env()), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads((out / f"rank{k}.json").read_text()) for k in range(nproc)]


def logged_row(run: Path, step: int) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if r.get("step") == step)


def _margins(report: dict) -> list[float]:
    """Per item, how far its best candidate leads the next."""
    return [sorted(s)[-1] - sorted(s)[-2] for s in report["scores"]]


@pytest.mark.slow  # a trained model, the codec, export and eval processes
def test_in_run_scores_equal_soda_eval_on_the_export_in_any_layout(trained, tmp_path):
    # one process; then 4 ranks: TP2 x PP2, and CP2 x DP2 (items split over DP, sums over CP)
    runs = [(nproc, layouts, in_run(trained, tmp_path, nproc, layouts)) for nproc, layouts in RUNS]
    report = trained.report()
    want = report["tasks"]
    assert report["dtype"] == "fp32" and report["codec"] == "random:0"  # --dtype auto on the CPU; the shards' codec
    assert len(want) == len(trained.specs) == 5
    for name, w in want.items():  # the items are clear cases for a comparison at TOL
        assert min(_margins(w)) > MARGIN, (name, w["scores"])
    for nproc, layouts, ranks in runs:
        for i, layout in enumerate(layouts):
            for r in ranks:  # every rank gets the same numbers (but its own time)
                assert r["layouts"][i]["metrics"].pop("eval/time_s") > 0
                assert r["layouts"][i]["metrics"] == ranks[0]["layouts"][i]["metrics"]
            got, metrics = ranks[0]["layouts"][i]["reports"], ranks[0]["layouts"][i]["metrics"]
            tp, pp, cp = layout
            assert ranks[0]["layouts"][i]["layout"] == [tp, pp, cp, nproc // (tp * pp * cp)]  # [..., DP]
            assert set(got) == set(want), (got.keys(), want.keys())
            for name, w in want.items():
                g = got[name]
                assert g["items"] == w["items"]
                for a, b in zip(g["scores"], w["scores"], strict=True):
                    assert len(a) == len(b) and all(abs(x - y) <= TOL for x, y in zip(a, b, strict=True)), (name, a, b)
                for key in ("accuracy", "accuracy_norm", "by_task"):
                    assert g.get(key) == w.get(key), (layout, name, key, g.get(key), w.get(key))  # equal, not close
                    if isinstance(w.get(key), float):
                        assert metrics[f"eval/{name}/{key}"] == w[key]
                for group, v in w.get("by_task", {}).items():
                    assert metrics[f"eval/{name}/by_task/{group}"] == v
            assert all(isinstance(v, float) for v in metrics.values())  # a flat row of scalars
            if layout == (1, 1, 1):  # the loop's scores at step 2, in metrics.jsonl: these
                row = logged_row(trained.run, 2)
                assert {k: row[k] for k in metrics} == metrics
                from megatron_soda.tools.plots import plot_loss  # its accuracy panel reads these rows

                assert plot_loss(trained.run, tmp_path / "loss.png").stat().st_size > 10_000
            assert "eval/salmon:salmon.jsonl/by_task/speaker" in metrics
            # tblimp is minimal_pairs on lower-cased text: the text items score apart, the audio item alike
            lower, plain = got["tblimp:pairs.jsonl"]["scores"], got["minimal_pairs:pairs.jsonl"]["scores"]
            assert abs(lower[3][0] - plain[3][0]) < TOL / 100 and abs(lower[4][1] - plain[4][1]) > MARGIN
        # a task file that does not parse, does not fit or names what the ranks cannot score: the same
        # one line on every rank, before any step
        for said in trained.bad:
            for r in ranks:
                _, message = r["errors"][said]
                assert said in message and "\n" not in message, (said, message)


def test_the_in_run_task_list_is_checked_without_a_model(tmp_path):
    from megatron_soda.config import ConfigError
    from megatron_soda.training.downstream import parse_task_specs
    from megatron_soda.training.likelihood import LIKELIHOOD_TASKS, read_task_file

    good = _write(tmp_path / "a.jsonl", [{"positive": "a", "negative": "b"}])
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "a.jsonl", [{"positive": "a", "negative": "b"}])
    assert parse_task_specs([f"swuggy:{good}", f"sblimp:{good}"]) == [("swuggy", str(good)), ("sblimp", str(good))]
    for specs, said in (
        ([str(good)], "expected KIND:FILE.jsonl"),
        ([f"tts:{good}"], "tts samples speech or text"),
        ([f"swuggy:{good}", f"swuggy:{tmp_path / 'sub' / 'a.jsonl'}"], "a second task named swuggy:a.jsonl"),
    ):
        with pytest.raises(ConfigError, match=said):
            parse_task_specs(specs)
    assert read_task_file(good, LIKELIHOOD_TASKS["tblimp"].check) == [{"positive": "a", "negative": "b"}]


@pytest.mark.slow
def test_dtype_auto_is_fp32_on_cpu_bf16_on_cuda_and_loads_with_sdpa(trained):
    import torch

    from megatron_soda.config import UserError
    from megatron_soda.evals import Scorer
    from megatron_soda.generate import load_model, model_dtype

    trained.report()  # the export is there
    hf = trained.hf
    assert (model_dtype("auto", "cpu"), model_dtype("auto", "cuda:1"), model_dtype("fp32", "cuda")) == (
        "fp32",
        "bf16",
        "fp32",
    )
    with pytest.raises(UserError, match="--dtype fp16: expected one of auto, fp32, bf16"):
        model_dtype("fp16", "cpu")
    fp32, bf16 = load_model(str(hf)), load_model(str(hf), dtype="bf16")
    assert fp32.model.dtype == torch.float32 and bf16.model.dtype == torch.bfloat16
    assert fp32.model.config._attn_implementation == "sdpa" == bf16.model.config._attn_implementation
    L = fp32.layout
    req = [((L.bos_id, L.text_start), tuple(Scorer(None, fp32.tok, L, None, hf).text_ids("Her brother carried it.")))]
    a, b = (Scorer(x.model, x.tok, L, None, hf).logprob_sums(req)[0] for x in (fp32, bf16))
    assert a < 0 and abs(a - b) < 0.05 * abs(a), (a, b)  # bf16 is close, not equal


@pytest.mark.slow
def test_bench_generate_times_exact_lengths_on_cpu(trained, tmp_path):
    from megatron_soda.config import UserError
    from megatron_soda.tools.bench.generate import GenerateBenchConfig, bench_job

    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text('{"earlier": "row"}\n')
    shape = dict(device="cpu", new_tokens=6, prompt_tokens=34, reps=1)
    bench_job(GenerateBenchConfig(config="configs/tiny.yaml", batch=[1, 4], json=str(rows_file), **shape))
    lines = rows_file.read_text().splitlines()
    assert lines[0] == '{"earlier": "row"}' and len(lines) == 3  # appended
    rows = [json.loads(x) for x in lines[1:]]
    assert [r["batch"] for r in rows] == [1, 4] and all(r["tokens_per_s"] > 0 for r in rows)
    assert all(r["new_tokens"] == 6 and r["prompt_tokens"] == 34 and r["dtype"] == "fp32" for r in rows)
    assert rows[1]["tokens_per_s"] == pytest.approx(4 * 6 / rows[1]["seconds"])
    assert {"date", "versions", "device", "parameters"} <= set(rows[0])
    trained.report()  # the export is there
    (row,) = bench_job(GenerateBenchConfig(model=str(trained.hf), batch=[2], **shape))  # an exported folder
    assert row["batch"] == 2 and row["model"] == str(trained.hf)
    with pytest.raises(UserError, match="one of --model"):
        bench_job(GenerateBenchConfig())


# --- one rank of the in-run side (python -m tests.test_downstream SPEC.json) ----------------------


def rank_main(spec_path: str) -> None:
    """For each of the spec's layouts in turn (one process group): build the Trainer as `soda train`
    does, load the checkpoint's weights, score the tasks with DownstreamEval; after the first, try
    each bad task list. Writes this rank's results."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_soda.config import UserError, load_config, quiet_library_warnings, validate
    from megatron_soda.parallel.setup import init_distributed, teardown
    from megatron_soda.tokenization.shard_format import read_index
    from megatron_soda.training.checkpoint import load_weights
    from megatron_soda.training.downstream import DownstreamEval
    from megatron_soda.training.trainer import build_trainer

    quiet_library_warnings()
    spec = json.loads(Path(spec_path).read_text())
    init_distributed("cpu")
    result: dict = {"layouts": [], "errors": {}}
    try:
        for tp, pp, cp in spec["layouts"]:
            overrides = {"parallel": {"tp": tp, "pp": pp, "cp": cp}, "eval": {"interval": 1, "tasks": spec["tasks"]}}
            cfg = load_config(str(Path(spec["run"]) / "config.yaml"), overrides)
            validate(cfg, dist.get_world_size())
            layout = read_index(cfg.data.paths[0]).layout
            trainer = build_trainer(cfg, layout)
            load_weights(spec["run"], trainer.modules)
            downstream = DownstreamEval(cfg, trainer, layout)
            assert downstream.enabled and downstream.due(3)
            metrics = downstream.run()
            result["layouts"].append(
                {"layout": [tp, pp, cp, trainer.dp], "metrics": metrics, "reports": downstream.reports}
            )
            if not result["errors"]:
                for said, tasks in spec["bad"].items():
                    cfg.eval.tasks = tasks
                    try:
                        DownstreamEval(cfg, trainer, layout)
                        result["errors"][said] = None
                    except UserError as e:
                        result["errors"][said] = [type(e).__name__, str(e)]
            ps.destroy_model_parallel()  # the next layout's groups
        out = Path(spec["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    finally:
        teardown()


if __name__ == "__main__":
    rank_main(sys.argv[1])
