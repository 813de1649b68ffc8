"""`soda eval`: the paper's benchmarks as a harness over data in the benchmarks' own shapes.

Each task reads a JSONL file (paths relative to it), one item per line:

  minimal_pairs  sWUGGY / sBLIMP / tWUGGY / tBLIMP:  {"positive": X, "negative": X}
  salmon         SALMon acoustic consistency:         {"positive": X, "negative": X, "task": "speaker"}
  storycloze     spoken or text StoryCloze:           {"prompt": X, "endings": [X, X], "label": 0}
  multiple_choice HellaSwag-style:                    {"context": X, "endings": [X, ...], "label": 2}
  asr            LibriSpeech-style:                    {"audio": "a.wav", "text": "reference"}
  s2st           CVSS-style:                           {"source_audio": "a.wav", "target_text": "reference"}

where X is {"audio": "file.wav"} or {"text": "..."} (a bare string is text). Scoring follows the
paper's evaluation harness: an audio candidate is `<|audio_start|>...<|audio_end|>`
after BOS, scored by the mean log-prob of its audio tokens (delimiters excluded); a text candidate
by its summed log-prob (and, for multiple choice, also per byte: lm-eval-harness's acc_norm, the
"HellaSwag-norm" of the paper's peers). Accuracy = how often the right candidate scores highest.
ASR prompts `<|audio_start|>{audio}<|audio_end|><|text_start|>`, WER with jiwer after lower-casing
and stripping punctuation. S2ST generates the target speech and transcribes it with a pluggable ASR
(`--asr self`: this model's own ASR prompt on the generated tokens; `--asr hf:<whisper name>`:
a transformers ASR pipeline on the decoded audio; `--asr module:function(audio, rate) -> str`),
then BLEU with sacrebleu.
"""

from __future__ import annotations

import importlib
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_soda.config import UserError
from megatron_soda.tokenization.codec import MIMI_HF_NAME

TASKS = ("minimal_pairs", "salmon", "storycloze", "multiple_choice", "asr", "s2st")


class EvalDataError(UserError, ValueError):
    pass


def read_items(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such task file")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{n}: not JSON ({e})") from None
    if not items:
        raise EvalDataError(f"{path}: no items")
    return items


def normalize_text(s: str) -> str:
    """Lower-case, drop punctuation, squeeze spaces (the paper's ASR scoring)."""
    s = s.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", s).strip()


class Scorer:
    """Log-likelihoods of token sequences under the model, batched (right padding)."""

    def __init__(self, model, tok, layout, codec, base: Path, batch_size: int = 8) -> None:
        self.model, self.tok, self.L, self.codec, self.base, self.batch_size = (
            model,
            tok,
            layout,
            codec,
            base,
            batch_size,
        )
        self._audio_cache: dict[str, np.ndarray] = {}

    def audio_ids(self, rel: str) -> np.ndarray:
        from megatron_soda.generate import audio_prompt_ids

        if rel not in self._audio_cache:
            self._audio_cache[rel] = audio_prompt_ids([str(self.base / rel)], self.codec, self.L)[0]
        return self._audio_cache[rel]

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def segment(self, x, where: str) -> tuple[list[int], str]:
        """A candidate/prompt -> (ids as it sits in a sequence, 'audio' | 'text')."""
        if isinstance(x, str):
            x = {"text": x}
        if not isinstance(x, dict) or not ({"audio", "text"} & set(x)):
            raise EvalDataError(f"{where}: expected {{'audio': path}} or {{'text': str}}, got {x!r}")
        if "audio" in x:
            return [self.L.audio_start, *map(int, self.audio_ids(x["audio"])), self.L.audio_end], "audio"
        return self.text_ids(x["text"]), "text"

    @torch.no_grad()
    def logprobs(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """Per-token log p(token_t | tokens_<t) for t >= 1 of each sequence."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i : i + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.L.eos_id, dtype=torch.long)
            att = torch.zeros_like(ids)
            for j, s in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
                att[j, : len(s)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu().numpy()
            out += [lp[j, : len(s) - 1] for j, s in enumerate(chunk)]
        return out

    def continuation_scores(self, prefix: list[int], conts: list[tuple[list[int], str]]) -> list[dict]:
        """Score each continuation after BOS + prefix: sum and mean over its scored tokens (audio: the
        audio ids only; text: all)."""
        seqs = [[self.L.bos_id, *prefix, *c] for c, _ in conts]
        res = []
        for (c, kind), lp in zip(conts, self.logprobs(seqs), strict=True):
            tail = lp[len(lp) - len(c) :]
            if kind == "audio":
                keep = self.L.is_audio(np.asarray(c))
                tail = tail[keep]
            res.append({"sum": float(tail.sum()), "mean": float(tail.mean()), "n": int(len(tail))})
        return res


def _score(kind: str, r: dict) -> float:
    return r["mean"] if kind == "audio" else r["sum"]


def eval_pairs(sc: Scorer, items: list[dict], name: str, by: str | None = None) -> dict:
    correct, groups = [], {}
    for n, it in enumerate(items):
        where = f"{name} item {n}"
        for key in ("positive", "negative"):
            if key not in it:
                raise EvalDataError(f"{where}: missing field '{key}'")
        pos, neg = sc.segment(it["positive"], where), sc.segment(it["negative"], where)
        rp, rn = sc.continuation_scores([], [pos, neg])
        ok = _score(pos[1], rp) > _score(neg[1], rn)
        correct.append(ok)
        if by:
            groups.setdefault(str(it.get(by, "all")), []).append(ok)
    out = {"accuracy": float(np.mean(correct)), "items": len(items)}
    if by:
        out["by_" + by] = {k: float(np.mean(v)) for k, v in sorted(groups.items())}
    return out


def eval_choice(sc: Scorer, items: list[dict], name: str, prompt_key: str) -> dict:
    acc, acc_norm = [], []
    for n, it in enumerate(items):
        where = f"{name} item {n}"
        if prompt_key not in it or "endings" not in it or "label" not in it:
            raise EvalDataError(f"{where}: needs '{prompt_key}', 'endings' and 'label'")
        prefix, _ = sc.segment(it[prompt_key], where)
        conts = [sc.segment(e, where) for e in it["endings"]]
        if not 0 <= int(it["label"]) < len(conts):
            raise EvalDataError(f"{where}: label {it['label']} outside its {len(conts)} endings")
        res = sc.continuation_scores(prefix, conts)
        scores = [_score(k, r) for (_, k), r in zip(conts, res, strict=True)]
        acc.append(int(np.argmax(scores)) == int(it["label"]))
        if all(k == "text" for _, k in conts):  # per byte of the ending text
            lens = [max(1, len((e if isinstance(e, str) else e["text"]).encode())) for e in it["endings"]]
            normed = [r["sum"] / b for r, b in zip(res, lens, strict=True)]
            acc_norm.append(int(np.argmax(normed)) == int(it["label"]))
    out = {"accuracy": float(np.mean(acc)), "items": len(items)}
    if acc_norm:
        out["accuracy_norm"] = float(np.mean(acc_norm))
    return out


def _generate(sc: Scorer, prompts: list[list[int]], task: str, max_seconds: float = 10.0):
    from megatron_soda.generate import SamplingConfig, generate

    s = SamplingConfig(temperature=0.0, max_seconds=max_seconds)
    out = []
    for i in range(0, len(prompts), sc.batch_size):
        out += generate(sc.model, sc.tok, sc.L, prompts[i : i + sc.batch_size], task, s, sc.codec)
    return out


def eval_asr(sc: Scorer, items: list[dict], name: str) -> dict:
    import jiwer

    from megatron_soda.generate import build_prompt

    for n, it in enumerate(items):
        if "audio" not in it or "text" not in it:
            raise EvalDataError(f"{name} item {n}: needs 'audio' and 'text'")
    prompts = [build_prompt("asr", sc.L, sc.audio_ids(it["audio"]), None) for it in items]
    hyps = [normalize_text(g.text) for g in _generate(sc, prompts, "asr")]
    refs = [normalize_text(it["text"]) for it in items]
    return {
        "wer": float(jiwer.wer(refs, hyps)),
        "items": len(items),
        "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps, strict=True))[:5]],
    }


def load_asr(spec: str, sc: Scorer):
    """`self`, `hf:<model>` or `module:function` -> callable(Generated) -> transcript."""
    from megatron_soda.generate import build_prompt

    if spec == "self":

        def own(g):
            audio = [x for s in g.segments if s["kind"] == "audio" for x in s["ids"]]
            if not audio:
                return ""
            ids = np.asarray(audio[: len(audio) - len(audio) % sc.L.codebooks])
            return _generate(sc, [build_prompt("asr", sc.L, ids, None)], "asr")[0].text

        return own
    if spec.startswith("hf:"):
        from transformers import pipeline

        pipe = pipeline("automatic-speech-recognition", model=spec[3:])
        return lambda g: (
            pipe({"raw": g.audio, "sampling_rate": sc.codec.sample_rate})["text"] if g.audio is not None else ""
        )
    mod, _, fn = spec.partition(":")
    if not fn:
        raise EvalDataError(f"--asr {spec!r}: expected self, hf:<model> or module:function")
    f = getattr(importlib.import_module(mod), fn)
    return lambda g: f(g.audio, sc.codec.sample_rate) if g.audio is not None else ""


def eval_s2st(sc: Scorer, items: list[dict], name: str, asr: str, max_seconds: float) -> dict:
    import sacrebleu

    from megatron_soda.generate import build_prompt

    for n, it in enumerate(items):
        if "source_audio" not in it or "target_text" not in it:
            raise EvalDataError(f"{name} item {n}: needs 'source_audio' and 'target_text'")
    prompts = [build_prompt("s2st", sc.L, sc.audio_ids(it["source_audio"]), None) for it in items]
    gens = _generate(sc, prompts, "s2st", max_seconds)
    transcribe = load_asr(asr, sc)
    hyps = [normalize_text(transcribe(g)) for g in gens]
    refs = [normalize_text(it["target_text"]) for it in items]
    texts = [normalize_text(re.sub(r"<language>\w+</language>", " ", g.text)) for g in gens]
    return {
        "asr_bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
        "asr": asr,
        "items": len(items),
        "whole_frames": all(
            g.frames * sc.L.codebooks == sum(len(s["ids"]) for s in g.segments if s["kind"] == "audio") for g in gens
        ),
        "mean_seconds": float(np.mean([g.seconds for g in gens])),
        "generated_text": texts[:5],
        "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps, strict=True))[:5]],
    }


def run(
    model_src: str,
    tasks: list[tuple[str, str]],
    codec: str,
    device: str,
    tokenizer: str | None,
    asr: str,
    max_seconds: float,
) -> dict:
    from megatron_soda.generate import load_model
    from megatron_soda.tokenization.codec import MimiCodec

    for kind, _ in tasks:
        if kind not in TASKS:
            raise EvalDataError(f"--task {kind}: expected one of {', '.join(TASKS)}")
    model, tok, layout = load_model(model_src, device, tokenizer)
    mimi = MimiCodec.load(codec, device)
    report = {"model": model_src, "codec": codec, "tasks": {}}
    for kind, path in tasks:
        items = read_items(path)
        sc = Scorer(model, tok, layout, mimi, Path(path).parent)
        name = f"{kind}:{Path(path).name}"
        if kind == "minimal_pairs":
            r = eval_pairs(sc, items, name)
        elif kind == "salmon":
            r = eval_pairs(sc, items, name, by="task")
        elif kind == "storycloze":
            r = eval_choice(sc, items, name, "prompt")
        elif kind == "multiple_choice":
            r = eval_choice(sc, items, name, "context")
        elif kind == "asr":
            r = eval_asr(sc, items, name)
        else:
            r = eval_s2st(sc, items, name, asr, max_seconds)
        report["tasks"][name] = r
    return report


@dataclass
class EvalConfig:
    model: str = field(metadata={"positional": True, "help": "an exported HF folder, or a run directory / checkpoint"})
    task: list[str] = field(
        metadata={
            "action": "append",
            "metavar": "KIND:FILE.jsonl",
            "help": "minimal_pairs | salmon | storycloze | multiple_choice | asr | s2st, with its JSONL (repeatable)",
        }
    )
    out: str = field(default="eval", metadata={"help": "writes OUT/report.json and OUT/report.md"})
    codec: str = MIMI_HF_NAME
    tokenizer: str | None = None
    device: str = "cpu"
    asr: str = field(default="self", metadata={"help": "S2ST transcriber: self | hf:<model> | module:function"})
    max_seconds: float = 10.0


def eval_job(cfg: EvalConfig) -> dict:
    """`soda eval`: likelihood benchmarks, ASR (WER), S2ST (ASR-BLEU) -> OUT/report.json + report.md."""
    tasks = []
    for t in cfg.task:
        kind, sep, path = t.partition(":")
        if not sep or not path:
            raise EvalDataError(f"--task {t!r}: expected KIND:FILE.jsonl")
        tasks.append((kind, path))
    report = run(cfg.model, tasks, cfg.codec, cfg.device, cfg.tokenizer, cfg.asr, cfg.max_seconds)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    md = markdown(report)
    (out / "report.md").write_text(md)
    print(md)
    print(f"report: {out / 'report.json'}, {out / 'report.md'}")
    return report


def markdown(report: dict) -> str:
    lines = [f"# soda eval: {report['model']}", "", "| task | items | metric | value |", "|---|---|---|---|"]
    for name, r in report["tasks"].items():
        for metric in ("accuracy", "accuracy_norm", "wer", "asr_bleu"):
            if metric in r:
                v = r[metric]
                shown = f"{100 * v:.1f}%" if metric.startswith("acc") or metric == "wer" else f"{v:.2f}"
                lines.append(f"| {name} | {r['items']} | {metric} | {shown} |")
        for group, v in r.get("by_task", {}).items():
            lines.append(f"| {name} / {group} | | accuracy | {100 * v:.1f}% |")
    return "\n".join(lines) + "\n"
