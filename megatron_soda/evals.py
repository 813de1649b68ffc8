"""`soda eval`: the paper's benchmarks as a harness over data in the benchmarks' own shapes.

Each task reads a JSONL file (paths relative to it), one item per line:

  minimal_pairs  sWUGGY / sBLIMP / tWUGGY / tBLIMP:  {"positive": X, "negative": X}
                 (also by name: swuggy, sblimp, twuggy, tblimp; tblimp lower-cases its text)
  salmon         SALMon acoustic consistency:         {"positive": X, "negative": X, "task": "speaker"}
  storycloze     spoken or text StoryCloze:           {"prompt": X, "endings": [X, X], "label": 0}
  multiple_choice HellaSwag-style:                    {"context": X, "endings": [X, ...], "label": 2}
  asr            LibriSpeech-style:                    {"audio": "a.wav", "text": "reference"}
  tts            seed-tts-eval-style:                  {"text": "target", "prompt_audio": "ref.wav",
                                                        "prompt_text": "ref transcript"}
  s2st           CVSS-style:                           {"source_audio": "a.wav", "target_text": "reference"}

where X is {"audio": "file.wav"} or {"text": "..."} (a bare string is text). Scoring follows the
authors' evaluation scripts. A minimal-pair candidate is wrapped in its delimiters after BOS
(`<|audio_start|>...<|audio_end|>` or `<|text_start|>...<|text_end|>`) and scored by the mean
log-prob of its audio or text tokens (delimiters excluded). Story and multiple-choice endings are
scored after their prompt: audio by the mean, text by the summed log-prob and, for multiple choice,
also per byte (lm-eval-harness's acc_norm, the "HellaSwag-norm" of the paper's peers). Accuracy =
how often the right candidate scores highest.
ASR prompts `<|audio_start|>{audio}<|audio_end|><|text_start|>` and decodes greedily; WER with jiwer
after lower-casing and stripping punctuation. TTS prompts with the reference voice
(`<|text_start|>{ref text}<|text_end|><|audio_start|>{ref audio}<|audio_end|><|text_start|>{text}
<|text_end|><|audio_start|>`) and S2ST with the source speech; both sample the speech (the authors'
settings: temperature 0.9, top-p 0.8, up to 15 s for TTS), transcribe it with a pluggable ASR
(`--asr self`: this model's own ASR prompt on the generated tokens; `--asr hf:<whisper name>`: a
transformers ASR pipeline on the decoded audio; `--asr module:function(audio, rate) -> str`) for WER
(TTS) or BLEU (S2ST, sacrebleu), and with `--speaker` report speaker similarity: the cosine of speaker
embeddings of the generated and the reference (TTS) or source (S2ST) speech (`hf:<name>`: a
transformers x-vector model such as microsoft/wavlm-base-plus-sv; the paper used seed-tts-eval's
WavLM-large verification model, so absolute values differ; `module:function(audio, rate) -> vector`).

The likelihood tasks (item checks, candidates as token ids, scorers: `LIKELIHOOD_TASKS`) live in
training/likelihood.py, shared with the in-run evaluation (training/downstream.py), which scores them
with the megatron model; here are their
transformers backend (`Scorer.logprob_sums`), the generation tasks and the report. Each report
lists what every candidate scored (`scores`), so two runs of a task compare item by item. The model
runs in `--dtype` (auto: bf16 on cuda, fp32 on cpu) with SDPA attention.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from megatron_soda.tokenization.codec import MIMI_HF_NAME
from megatron_soda.training.likelihood import (
    LIKELIHOOD_TASKS,
    PAIR_ALIASES,  # noqa: F401 (soda eval's names for the minimal-pair benchmarks)
    EvalDataError,
    Request,
    TaskTokens,
    eval_choice,
    eval_pairs,
    read_task_file,
)

if TYPE_CHECKING:
    import numpy as np


def read_items(path: str | Path, kind: str | None = None) -> list[dict]:
    """The items of a task file; with `kind`, each checked against what that task reads (types
    included: a string where a list of endings belongs would be scored per character), so a bad
    line is one error naming file, line and field before any model loads."""
    return read_task_file(path, lookup_task(kind).check if kind is not None else None)


# --- what each generation task reads from an item: None when usable, else what is wrong ----------


def _string_problem(item: dict, field: str, non_empty: bool = True) -> str | None:
    if field not in item:
        return f"missing field '{field}'"
    x = item[field]
    if not isinstance(x, str) or (non_empty and not x.strip()):
        return f"field '{field}' must be a {'non-empty ' if non_empty else ''}string, got {json.dumps(x)[:80]}"
    return None


def _fields_problem(*fields: str) -> Callable[[dict], str | None]:
    def problem(item: dict) -> str | None:
        return next((p for p in (_string_problem(item, f) for f in fields) if p), None)

    return problem


def _tts_problem(item: dict) -> str | None:
    if ("prompt_audio" in item) != ("prompt_text" in item):
        return "needs 'prompt_audio' with 'prompt_text' (the voice and its transcript), or neither"
    fields = ("text", "prompt_audio", "prompt_text") if "prompt_audio" in item else ("text",)
    return _fields_problem(*fields)(item)


def normalize_text(s: str) -> str:
    """Lower-case, drop punctuation, squeeze spaces (the paper's ASR scoring)."""
    s = s.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", s).strip()


class Scorer(TaskTokens):
    """The transformers backend of the likelihood tasks (summed log-probs of token sequences,
    batched with right padding) and the model the generation tasks sample from."""

    def __init__(self, model, tok, layout, codec, base: Path, batch_size: int = 8, sampling=None) -> None:
        from megatron_soda.generate import SamplingConfig

        super().__init__(tok, layout, codec, base)
        self.model = model
        self.batch_size = batch_size
        self.sampling = sampling or SamplingConfig(temperature=0.9, top_p=0.8, max_seconds=15.0)

    def logprob_sums(self, requests: list[Request]) -> list[float]:
        """Per (context, continuation): the sum of log p(token | what precedes it) over the continuation."""
        import torch

        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(requests), self.batch_size):
            chunk = [(len(c), [*c, *x]) for c, x in requests[i : i + self.batch_size]]
            width = max(len(s) for _, s in chunk)
            ids = torch.full((len(chunk), width), self.L.eos_id, dtype=torch.long)
            att = torch.zeros_like(ids)
            for j, (_, s) in enumerate(chunk):
                ids[j, : len(s)] = torch.tensor(s)
                att[j, : len(s)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
                logits = logits[..., : self.L.vocab_size].float()  # a padded vocabulary's extra rows are no tokens
                lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(device))[..., 0]
            lp = lp.double().cpu()
            out += [float(lp[j, n - 1 : len(s) - 1].sum()) for j, (n, s) in enumerate(chunk)]  # label t: token t + 1
        return out


def _generate(sc: Scorer, prompts: list[list[int]], task: str, sample: bool = False):
    """Greedy for text (ASR), the configured sampling for speech (TTS, S2ST)."""
    from megatron_soda.generate import SamplingConfig, generate

    s = sc.sampling if sample else SamplingConfig(temperature=0.0, max_seconds=sc.sampling.max_seconds)
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
    import numpy as np

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


def load_speaker(spec: str, sc: Scorer):
    """`hf:<x-vector model>` or `module:function` -> callable(audio, rate) -> embedding (np.ndarray)."""
    import numpy as np

    if spec.startswith("hf:"):
        import soxr
        import torch
        from transformers import AutoFeatureExtractor, WavLMForXVector

        try:
            fe = AutoFeatureExtractor.from_pretrained(spec[3:])
            enc = WavLMForXVector.from_pretrained(spec[3:]).eval()
        except (OSError, ValueError) as e:
            raise EvalDataError(f"--speaker {spec}: cannot load a transformers x-vector model ({e})") from None

        @torch.no_grad()
        def embed(audio: np.ndarray, rate: int) -> np.ndarray:
            x = soxr.resample(audio.astype(np.float32), rate, fe.sampling_rate) if rate != fe.sampling_rate else audio
            inputs = fe(x, sampling_rate=fe.sampling_rate, return_tensors="pt")
            return enc(**inputs).embeddings[0].numpy()

        return embed
    mod, _, fn = spec.partition(":")
    if not fn:
        raise EvalDataError(f"--speaker {spec!r}: expected hf:<model> or module:function")
    f = getattr(importlib.import_module(mod), fn)
    return lambda audio, rate: np.asarray(f(audio, rate), dtype=np.float64)


def speaker_similarity(embed, a: np.ndarray, b: np.ndarray, rate: int) -> float:
    """Cosine of the two clips' speaker embeddings."""
    import numpy as np

    ea, eb = (np.asarray(embed(x, rate), dtype=np.float64).ravel() for x in (a, b))
    return float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb) + 1e-12))


def _similarities(sc: Scorer, speaker: str, gens, refs: list[str]) -> dict:
    """Mean speaker similarity of each generation to its reference clip (generations without audio count 0)."""
    import numpy as np

    if not speaker:
        return {}
    from megatron_soda.tokenization.audio_io import load_audio

    embed = load_speaker(speaker, sc)
    rate = sc.codec.sample_rate
    sims = [
        speaker_similarity(embed, g.audio, load_audio(str(sc.base / r), rate).samples, rate)
        if g.audio is not None and len(g.audio)
        else 0.0
        for g, r in zip(gens, refs, strict=True)
    ]
    return {"speaker_sim": float(np.mean(sims)), "speaker": speaker}


def eval_tts(sc: Scorer, items: list[dict], name: str, asr: str, speaker: str) -> dict:
    """Voice-conditioned TTS: WER of the transcribed speech, speaker similarity to the reference."""
    import jiwer
    import numpy as np

    from megatron_soda.generate import build_prompt

    prompts = []
    for n, it in enumerate(items):
        if "text" not in it or ("prompt_audio" in it) != ("prompt_text" in it):
            raise EvalDataError(f"{name} item {n}: needs 'text', and 'prompt_audio' with 'prompt_text' (or neither)")
        ref = it.get("prompt_audio")
        prompts.append(
            build_prompt(
                "tts",
                sc.L,
                sc.audio_ids(ref) if ref else None,
                sc.text_ids(it["text"]),
                sc.text_ids(it["prompt_text"]) if ref else None,
            )
        )
    gens = _generate(sc, prompts, "tts", sample=True)
    transcribe = load_asr(asr, sc)
    hyps = [normalize_text(transcribe(g)) for g in gens]
    refs = [normalize_text(it["text"]) for it in items]
    out = {
        "wer": float(jiwer.wer(refs, hyps)),
        "asr": asr,
        "items": len(items),
        "terminated": float(np.mean([g.ended for g in gens])),
        "mean_seconds": float(np.mean([g.seconds for g in gens])),
        "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps, strict=True))[:5]],
    }
    if all("prompt_audio" in it for it in items):
        out.update(_similarities(sc, speaker, gens, [it["prompt_audio"] for it in items]))
    return out


def eval_s2st(sc: Scorer, items: list[dict], name: str, asr: str, speaker: str = "") -> dict:
    import numpy as np
    import sacrebleu

    from megatron_soda.generate import build_prompt

    for n, it in enumerate(items):
        if "source_audio" not in it or "target_text" not in it:
            raise EvalDataError(f"{name} item {n}: needs 'source_audio' and 'target_text'")
    prompts = [build_prompt("s2st", sc.L, sc.audio_ids(it["source_audio"]), None) for it in items]
    gens = _generate(sc, prompts, "s2st", sample=True)
    transcribe = load_asr(asr, sc)
    hyps = [normalize_text(transcribe(g)) for g in gens]
    refs = [normalize_text(it["target_text"]) for it in items]
    texts = [normalize_text(re.sub(r"<language>\w+</language>", " ", g.text)) for g in gens]
    return {
        "asr_bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
        "asr": asr,
        "items": len(items),
        **_similarities(sc, speaker, gens, [it["source_audio"] for it in items]),
        "whole_frames": all(
            g.frames * sc.L.codebooks == sum(len(s["ids"]) for s in g.segments if s["kind"] == "audio") for g in gens
        ),
        "mean_seconds": float(np.mean([g.seconds for g in gens])),
        "generated_text": texts[:5],
        "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps, strict=True))[:5]],
    }


@dataclass(frozen=True)
class Task:
    summary: str  # one line for `soda eval --help`
    score: Callable[..., dict]  # (scorer, items, name, asr, speaker) -> the task's metrics
    check: Callable[[dict], str | None] = lambda item: None  # an item -> what is wrong with it, or None


def _pairs(lower: bool = False, by: str | None = None) -> Callable[..., dict]:
    return lambda sc, items, name, asr, speaker: eval_pairs(sc, items, name, by=by, lower=lower)


def _choice(prompt_key: str) -> Callable[..., dict]:
    return lambda sc, items, name, asr, speaker: eval_choice(sc, items, name, prompt_key)


def _likelihood(t) -> Callable[..., dict]:
    return _pairs(t.lower, t.by) if t.scorer == "pairs" else _choice(t.prompt_key)


# Every task `--task KIND:FILE` accepts: dispatch, --help and the refusal of an unknown KIND all read it.
TASKS: dict[str, Task] = {
    **{kind: Task(t.summary, _likelihood(t), t.check) for kind, t in LIKELIHOOD_TASKS.items()},
    "asr": Task(
        "{audio, text}: WER, greedy",
        lambda sc, items, name, asr, speaker: eval_asr(sc, items, name),
        _fields_problem("audio", "text"),
    ),
    "tts": Task("{text, prompt_audio, prompt_text}: WER of --asr, speaker similarity", eval_tts, _tts_problem),
    "s2st": Task(
        "{source_audio, target_text}: ASR-BLEU, speaker similarity",
        eval_s2st,
        _fields_problem("source_audio", "target_text"),
    ),
}


def lookup_task(kind: str) -> Task:
    """The registered task `kind`; anything else is refused (never scored as some other task)."""
    if kind not in TASKS:
        raise EvalDataError(f"--task {kind}: expected one of {', '.join(TASKS)}")
    return TASKS[kind]


def run(
    model_src: str,
    tasks: list[tuple[str, str]],
    codec: str | None,
    device: str,
    tokenizer: str | None,
    asr: str,
    sampling,
    speaker: str = "",
    dtype: str = "auto",
) -> dict:
    from megatron_soda.generate import load_model, model_dtype
    from megatron_soda.tokenization.codec import MimiCodec

    # every task and task file is checked before a model loads
    scorers = [(kind, path, lookup_task(kind), read_items(path, kind)) for kind, path in tasks]
    loaded = load_model(model_src, device, tokenizer, dtype)
    model, tok, layout = loaded.model, loaded.tok, loaded.layout
    codec = loaded.pick_codec(codec)
    mimi = MimiCodec.load(codec, device)
    report = {
        "model": model_src,
        "codec": codec,
        "dtype": model_dtype(dtype, device),
        "sampling": dataclasses.asdict(sampling),
        "tasks": {},
    }
    for kind, path, t, items in scorers:
        sc = Scorer(model, tok, layout, mimi, Path(path).parent, sampling=sampling)
        name = f"{kind}:{Path(path).name}"
        report["tasks"][name] = t.score(sc, items, name, asr, speaker)
    return report


@dataclass
class EvalConfig:
    model: str = field(metadata={"positional": True, "help": "an exported HF folder, or a run directory / checkpoint"})
    task: list[str] = field(
        metadata={
            "action": "append",
            "metavar": "KIND:FILE.jsonl",
            "help": "a task and its JSONL (repeatable); KIND is one of: "
            + "; ".join(f"{name} ({t.summary})" for name, t in TASKS.items()),
        }
    )
    out: str = field(default="eval", metadata={"help": "writes OUT/report.json and OUT/report.md"})
    codec: str | None = field(
        default=None, metadata={"help": f"default: the codec the training shards recorded, else {MIMI_HF_NAME}"}
    )
    tokenizer: str | None = None
    device: str = "cpu"
    dtype: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"help": "model weights and compute: auto is bf16 on cuda, fp32 on cpu"}
    )
    asr: str = field(default="self", metadata={"help": "TTS / S2ST transcriber: self | hf:<model> | module:function"})
    speaker: str = field(
        default="", metadata={"help": "TTS / S2ST speaker similarity: hf:<x-vector model> | module:function"}
    )
    temperature: float = field(default=0.9, metadata={"help": "speech sampling (TTS, S2ST); text and ASR are greedy"})
    top_p: float = 0.8
    top_k: int = 0
    max_seconds: float = field(default=15.0, metadata={"help": "longest generated speech (the authors: 1,500 tokens)"})
    seed: int = 0


def eval_job(cfg: EvalConfig) -> dict:
    """`soda eval`: likelihood benchmarks, ASR (WER), TTS (WER, speaker similarity), S2ST (ASR-BLEU)
    -> OUT/report.json + report.md."""
    tasks = []
    for t in cfg.task:
        kind, sep, path = t.partition(":")
        if not sep or not path:
            raise EvalDataError(f"--task {t!r}: expected KIND:FILE.jsonl")
        lookup_task(kind)
        tasks.append((kind, path))
    if not cfg.max_seconds > 0:
        raise EvalDataError(f"--max-seconds: the longest speech generated must be > 0 s, got {cfg.max_seconds:g}")
    from megatron_soda.generate import SamplingConfig

    sampling = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_seconds, seed=cfg.seed)
    report = run(cfg.model, tasks, cfg.codec, cfg.device, cfg.tokenizer, cfg.asr, sampling, cfg.speaker, cfg.dtype)
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
        for metric in ("accuracy", "accuracy_norm", "wer", "asr_bleu", "speaker_sim"):
            if metric in r:
                v = r[metric]
                shown = f"{100 * v:.1f}%" if metric.startswith("acc") or metric == "wer" else f"{v:.3f}"
                lines.append(f"| {name} | {r['items']} | {metric} | {shown} |")
        for group, v in r.get("by_task", {}).items():
            lines.append(f"| {name} / {group} | | accuracy | {100 * v:.1f}% |")
    return "\n".join(lines) + "\n"
