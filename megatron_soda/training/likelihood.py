"""The likelihood tasks of `soda eval` and of the in-run evaluation: their item checks, how a
candidate becomes token ids, the scorers and `LIKELIHOOD_TASKS`.

One copy of the scoring is what makes `soda eval` (evals.py, on an export) and the training ranks
(downstream.py, on the megatron model) give the same numbers; it sits in training/ because training
sits below evaluation in the rooms (docs/ARCHITECTURE.md). A scorer asks a log-prob backend for the
summed log-prob of each (context, continuation) token sequence; evals.py's `Scorer` is the
transformers backend, downstream.py's `MegatronLogProbs` the megatron one. How a candidate is scored
follows the authors' scripts (evals.py says it in full): after BOS (and the prompt), in its
delimiters; the opening delimiter is context and the closing one is left out (nothing after the
scored tokens changes their log-probs, the model being causal), so the scored tokens are exactly the
candidate's audio or text tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from megatron_soda.config import UserError

if TYPE_CHECKING:
    import numpy as np

# the minimal-pair benchmarks by their names (LIKELIHOOD_TASKS entries of their own): whether the
# text is lower-cased, as the authors score tBLIMP
PAIR_ALIASES = {"swuggy": False, "sblimp": False, "twuggy": False, "tblimp": True}
GENERATION_TASKS = ("asr", "tts", "s2st")  # soda eval's others: they sample, which the training ranks do not


class EvalDataError(UserError, ValueError):
    pass


# --- task files: items and what each task reads from one -------------------------------------------


def read_task_file(path: str | Path, check: Callable[[dict], str | None] | None = None) -> list[dict]:
    """The items of a JSONL task file, each checked by `check` (types included: a string where a
    list of endings belongs would be scored per character), so a bad line is one error naming file,
    line and field before any model loads."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path}: no such task file")
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{n}: not JSON ({e})") from None
            problem = "not a JSON object" if not isinstance(item, dict) else check(item) if check else None
            if problem:
                raise EvalDataError(f"{path}:{n}: {problem}")
            items.append(item)
    if not items:
        raise EvalDataError(f"{path}: no items")
    return items


CANDIDATE = "a non-empty string (text), {'text': string} or {'audio': path}"


def candidate_problem(x, field: str) -> str | None:
    """A candidate / prompt as `TaskTokens.segment` reads it (an empty text would score no token)."""
    inner = (x["audio"] if "audio" in x else x.get("text")) if isinstance(x, dict) else x
    if isinstance(inner, str) and inner.strip():
        return None
    return f"field '{field}' must be {CANDIDATE}, got {json.dumps(x)[:80]}"


def pair_problem(item: dict) -> str | None:
    for key in ("positive", "negative"):
        if key not in item:
            return f"missing field '{key}'"
        problem = candidate_problem(item[key], key)
        if problem:
            return problem
    return None


def choice_problem(prompt_key: str) -> Callable[[dict], str | None]:
    def problem(item: dict) -> str | None:
        for key in (prompt_key, "endings", "label"):
            if key not in item:
                return f"missing field '{key}' (needs '{prompt_key}', 'endings' and 'label')"
        endings, label = item["endings"], item["label"]
        if not isinstance(endings, list) or len(endings) < 2:
            return f"field 'endings' must be a list of at least 2 candidates, got {json.dumps(endings)[:80]}"
        for i, e in enumerate(endings):
            bad = candidate_problem(e, f"endings[{i}]")
            if bad:
                return bad
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            return f"field 'label' must be an integer index of its {len(endings)} endings, got {json.dumps(label)}"
        return candidate_problem(item[prompt_key], prompt_key)

    return problem


# --- candidates as token ids ---------------------------------------------------------------------

# Prompt audio longer than this is decoded and encoded in pieces of this length (MimiCodec.encode_file),
# as `soda prepare` cuts long audio at its default --max-seconds.
PROMPT_PIECE_SECONDS = 60.0


def audio_prompt_ids(paths: list[str], codec, layout, piece_seconds: float = PROMPT_PIECE_SECONDS) -> list[np.ndarray]:
    """The audio ids of each file: short clips in one batch, a long one in `piece_seconds` pieces
    (memory: a 10-minute file in one piece takes 8 GB)."""
    from megatron_soda.tokenization.audio_io import AudioSkip, audio_seconds, load_audio

    ids: dict[int, np.ndarray] = {}
    short: list[int] = []
    clips = []
    for i, p in enumerate(paths):
        try:
            total = audio_seconds(p)
            if total is not None and total > piece_seconds:
                ids[i] = layout.codes_to_ids(codec.encode_file(p, total, piece_seconds)[0])
            else:
                clips.append(load_audio(p, codec.sample_rate).samples)
                short.append(i)
        except AudioSkip as e:
            raise UserError(f"{p}: unusable audio ({e.reason})") from None
    ids.update(zip(short, (layout.codes_to_ids(c) for c in codec.encode(clips)), strict=True))
    return [ids[i] for i in range(len(paths))]


class TaskTokens:
    """How a task file's candidates and prompts become token ids: text through the tokenizer, audio
    (paths relative to the task file's folder `base`) through the codec, one clip at a time (as
    batched, MimiCodec's codes do not depend on the batch) and once per file."""

    def __init__(self, tok, layout, codec, base: Path) -> None:
        self.tok, self.L, self.codec, self.base = tok, layout, codec, Path(base)
        self._audio_cache: dict[str, np.ndarray] = {}

    def audio_ids(self, rel: str) -> np.ndarray:
        if rel not in self._audio_cache:
            path = self.base / rel
            if not path.is_file():
                raise EvalDataError(f"{path}: no such audio file")
            self._audio_cache[rel] = audio_prompt_ids([str(path)], self.codec, self.L)[0]
        return self._audio_cache[rel]

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def segment(self, x, where: str, wrap_text: bool = False, lower: bool = False) -> tuple[list[int], str]:
        """A candidate/prompt -> (ids as it sits in a sequence, 'audio' | 'text'); audio always sits
        in its delimiters, text with `wrap_text` (minimal pairs, as the authors score them)."""
        if isinstance(x, str):
            x = {"text": x}
        if not isinstance(x, dict) or not ({"audio", "text"} & set(x)):
            raise EvalDataError(f"{where}: expected {{'audio': path}} or {{'text': str}}, got {x!r}")
        if "audio" in x:
            return [self.L.audio_start, *map(int, self.audio_ids(x["audio"])), self.L.audio_end], "audio"
        ids = self.text_ids(x["text"].lower() if lower else x["text"])
        return ([self.L.text_start, *ids, self.L.text_end] if wrap_text else ids), "text"


@dataclass(frozen=True)
class Candidate:
    """One scored sequence: the tokens it is conditioned on and the tokens whose log-probs it sums."""

    context: tuple[int, ...]  # BOS, the prompt, the candidate's opening delimiter
    continuation: tuple[int, ...]  # the candidate's audio or text tokens
    kind: str  # 'audio' | 'text'


Request = tuple[Sequence[int], Sequence[int]]  # (context, continuation)


class LogProbs(Protocol):
    """A log-prob backend: the transformers model (evals.Scorer) or the megatron one (MegatronLogProbs)."""

    def logprob_sums(self, requests: list[Request]) -> list[float]:
        """Per request, sum over the continuation of log p(token | context and the tokens before it)."""
        ...


def candidate(sc: TaskTokens, prefix: list[int], seg: tuple[list[int], str], where: str) -> Candidate:
    """A segment after BOS and `prefix`: one in its delimiters opens in the context and its closing
    delimiter is left out, so exactly its audio or text tokens are scored (the module docstring)."""
    ids, kind = seg
    L = sc.L
    opened = bool(ids) and ids[0] in (L.text_start, L.audio_start)
    inner = ids[1:-1] if opened else ids
    if not inner:
        raise EvalDataError(f"{where}: a candidate with no {kind} tokens to score")
    return Candidate((L.bos_id, *prefix, *ids[:1]) if opened else (L.bos_id, *prefix), tuple(inner), kind)


def requests(groups: list[list[Candidate]]) -> list[Request]:
    return [(c.context, c.continuation) for g in groups for c in g]


def scored(groups: list[list[Candidate]], sums: list[float]) -> list[list[dict]]:
    """The sums of `requests(groups)` back per item: sum and mean log-prob of each candidate."""
    out, at = [], 0
    for g in groups:
        part = zip(g, sums[at : at + len(g)], strict=True)
        out.append(
            [{"sum": s, "mean": s / len(c.continuation), "n": len(c.continuation), "kind": c.kind} for c, s in part]
        )
        at += len(g)
    return out


def score_candidates(sc: LogProbs, groups: list[list[Candidate]]) -> list[list[dict]]:
    return scored(groups, sc.logprob_sums(requests(groups)) if groups else [])


def pair_candidates(sc: TaskTokens, items: list[dict], name: str, lower: bool = False) -> list[list[Candidate]]:
    """Minimal pairs: each candidate alone after BOS, in its delimiters."""
    out = []
    for n, it in enumerate(items):
        where = f"{name} item {n}"
        for key in ("positive", "negative"):
            if key not in it:
                raise EvalDataError(f"{where}: missing field '{key}'")
        out.append(
            [
                candidate(sc, [], sc.segment(it[k], where, wrap_text=True, lower=lower), where)
                for k in ("positive", "negative")
            ]
        )
    return out


def pair_metrics(items: list[dict], res: list[list[dict]], by: str | None = None) -> dict:
    """By the mean log-prob of each candidate's tokens: accuracy (and per value of item field `by`)."""
    import numpy as np

    correct, groups = [], {}
    for it, (rp, rn) in zip(items, res, strict=True):
        ok = rp["mean"] > rn["mean"]
        correct.append(ok)
        if by:
            groups.setdefault(str(it.get(by, "all")), []).append(ok)
    out = {"accuracy": float(np.mean(correct)), "items": len(items)}
    if by:
        out["by_" + by] = {k: float(np.mean(v)) for k, v in sorted(groups.items())}
    out["scores"] = [[r["mean"] for r in pair] for pair in res]  # per item: positive, negative
    return out


def choice_candidates(sc: TaskTokens, items: list[dict], name: str, prompt_key: str) -> list[list[Candidate]]:
    """Story and multiple-choice endings, each after BOS and the prompt."""
    out = []
    for n, it in enumerate(items):
        where = f"{name} item {n}"
        if prompt_key not in it or "endings" not in it or "label" not in it:
            raise EvalDataError(f"{where}: needs '{prompt_key}', 'endings' and 'label'")
        prefix, _ = sc.segment(it[prompt_key], where)
        conts = [sc.segment(e, where) for e in it["endings"]]
        if not 0 <= int(it["label"]) < len(conts):
            raise EvalDataError(f"{where}: label {it['label']} outside its {len(conts)} endings")
        out.append([candidate(sc, prefix, c, where) for c in conts])
    return out


def choice_metrics(items: list[dict], res: list[list[dict]]) -> dict:
    """Audio endings by their mean log-prob, text ones by the sum, and all-text items also per byte
    of the ending (lm-eval-harness's acc_norm)."""
    import numpy as np

    acc, acc_norm, scores = [], [], []
    for it, rs in zip(items, res, strict=True):
        s = [r["mean"] if r["kind"] == "audio" else r["sum"] for r in rs]
        scores.append(s)
        acc.append(int(np.argmax(s)) == int(it["label"]))
        if all(r["kind"] == "text" for r in rs):
            lens = [max(1, len((e if isinstance(e, str) else e["text"]).encode())) for e in it["endings"]]
            normed = [r["sum"] / b for r, b in zip(rs, lens, strict=True)]
            acc_norm.append(int(np.argmax(normed)) == int(it["label"]))
    out = {"accuracy": float(np.mean(acc)), "items": len(items)}
    if acc_norm:
        out["accuracy_norm"] = float(np.mean(acc_norm))
    out["scores"] = scores  # per item, per ending: what the accuracy compares
    return out


def eval_pairs(sc, items: list[dict], name: str, by: str | None = None, lower: bool = False) -> dict:
    """Minimal pairs with a scorer that is both TaskTokens and LogProbs (evals.Scorer)."""
    return pair_metrics(items, score_candidates(sc, pair_candidates(sc, items, name, lower)), by)


def eval_choice(sc, items: list[dict], name: str, prompt_key: str) -> dict:
    return choice_metrics(items, score_candidates(sc, choice_candidates(sc, items, name, prompt_key)))


@dataclass(frozen=True)
class LikelihoodTask:
    summary: str  # one line for `soda eval --help`
    scorer: Literal["pairs", "choice"]
    check: Callable[[dict], str | None]  # an item -> what is wrong with it, or None
    lower: bool = False  # pairs: the text lower-cased (tBLIMP)
    by: str | None = None  # pairs: the accuracy also per value of this item field (SALMon's task)
    prompt_key: str = ""  # choice: the item field holding the prompt

    def candidates(self, sc: TaskTokens, items: list[dict], name: str) -> list[list[Candidate]]:
        if self.scorer == "pairs":
            return pair_candidates(sc, items, name, self.lower)
        return choice_candidates(sc, items, name, self.prompt_key)

    def metrics(self, items: list[dict], res: list[list[dict]]) -> dict:
        return pair_metrics(items, res, self.by) if self.scorer == "pairs" else choice_metrics(items, res)


LIKELIHOOD_TASKS: dict[str, LikelihoodTask] = {
    "minimal_pairs": LikelihoodTask(
        "sWUGGY/sBLIMP/tWUGGY/tBLIMP {positive, negative}: accuracy", "pairs", pair_problem
    ),
    **{
        name: LikelihoodTask(f"= minimal_pairs{', text lower-cased' if lower else ''}", "pairs", pair_problem, lower)
        for name, lower in PAIR_ALIASES.items()
    },
    "salmon": LikelihoodTask(
        "SALMon {positive, negative, task}: accuracy, also per task", "pairs", pair_problem, by="task"
    ),
    "storycloze": LikelihoodTask(
        "{prompt, endings, label}: accuracy", "choice", choice_problem("prompt"), prompt_key="prompt"
    ),
    "multiple_choice": LikelihoodTask(
        "{context, endings, label}: accuracy and per-byte accuracy",
        "choice",
        choice_problem("context"),
        prompt_key="context",
    ),
}


def flat_metrics(name: str, report: dict) -> dict[str, float]:
    """A task's report as the step row's scalars: `eval/<kind>:<file>/accuracy` (and
    `.../accuracy_norm`, `.../by_task/<task>`): keys metrics.jsonl, TensorBoard and W&B all take."""
    out = {}
    for key, value in report.items():
        if isinstance(value, float):
            out[f"eval/{name}/{key}"] = value
        elif isinstance(value, dict):
            out.update({f"eval/{name}/{key}/{k}": v for k, v in value.items() if isinstance(v, float)})
    return out
