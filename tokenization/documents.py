"""SODA document formats: how utterances and transcripts become one token stream.

A document is one source (a recording and its utterances, in order) wrapped in BOS ... EOS. Paired
documents are emitted in every requested order, as the paper stores both text-first and
audio-first copies; audio-only and text-only copies are the ablation formats (S, S+A) and the
plain-text component of the mixture.

Task formats (fine-tuning) come with a loss mask: 1 on what the model must produce once given the
task's prompt, 0 on the prompt. ASR and TTS use the paper's evaluation prompts
(`<|audio_start|>audio<|audio_end|><|text_start|>` -> text; `<|text_start|>text<|text_end|><|audio_start|>`
-> audio); S2ST is source speech -> [source text] -> [target text] -> target speech, as the paper's
CVSS-T fine-tuning, with everything after the source speech as the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_soda.config import ConfigError
from megatron_soda.tokenization.vocab import SodaLayout

PRETRAIN_FORMATS = ("text_first", "audio_first", "audio_only", "text_only")
PAIRED_TASK_FORMATS = ("asr", "tts")
S2ST_FORMATS = ("s2st", "s2st_tgt_text", "s2st_direct")
TASK_FORMATS = PAIRED_TASK_FORMATS + S2ST_FORMATS
FORMATS = PRETRAIN_FORMATS + TASK_FORMATS


@dataclass
class Utterance:
    text_ids: np.ndarray | None  # transcript tokens (no BOS/EOS), None when there is no transcript
    audio_ids: np.ndarray | None  # flat SODA audio ids, None for text-only input


def parse_formats(spec: str | list[str]) -> list[str]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise ConfigError(f"formats: expected a comma list of {', '.join(FORMATS)}, got {spec!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"formats: {spec!r} names a format twice")
    return names


def _concat(parts: list) -> np.ndarray:
    return np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p in parts])


def build_document(utterances: list[Utterance], fmt: str, layout: SodaLayout) -> np.ndarray | None:
    """Token ids of one document in one format; None when the format does not apply to it."""
    L = layout
    has_audio = all(u.audio_ids is not None for u in utterances)
    has_text = all(u.text_ids is not None for u in utterances)
    parts: list = [[L.bos_id]]
    if fmt in ("text_first", "audio_first"):
        if not (has_audio and has_text):
            return None
        for u in utterances:
            text = [[L.text_start], u.text_ids, [L.text_end]]
            audio = [[L.audio_start], u.audio_ids, [L.audio_end]]
            parts += text + audio if fmt == "text_first" else audio + text
    elif fmt == "audio_only":
        if not has_audio:
            return None
        for u in utterances:
            parts += [[L.audio_start], u.audio_ids, [L.audio_end]]
    elif fmt == "text_only":
        if not has_text:
            return None
        if len(utterances) != 1:
            # transcripts must be joined as text before tokenizing, or words would fuse at the seams
            raise ValueError("text_only takes one utterance holding the whole document's text")
        parts.append(utterances[0].text_ids)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    parts.append([L.eos_id])
    return _concat(parts)


def build_task_documents(
    utterances: list[Utterance], fmt: str, layout: SodaLayout
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss mask) documents of one task format; [] when the format does not apply.

    ASR/TTS make one document per utterance (each is one example); S2ST takes the source and the
    target utterance of a translation pair.
    """
    L = layout
    if fmt in PAIRED_TASK_FORMATS:
        out = []
        for u in utterances:
            if u.audio_ids is None or u.text_ids is None:
                continue
            audio = [L.audio_start, *u.audio_ids, L.audio_end]
            text = [L.text_start, *u.text_ids, L.text_end]
            if fmt == "asr":  # prompt ends with <|text_start|>
                segs = [([L.bos_id, *audio, L.text_start], 0), ([*text[1:], L.eos_id], 1)]
            else:  # tts: prompt ends with <|audio_start|>
                segs = [([L.bos_id, *text, L.audio_start], 0), ([*audio[1:], L.eos_id], 1)]
            out.append(_with_mask(segs))
        return out
    if fmt in S2ST_FORMATS:
        if len(utterances) != 2 or any(u.audio_ids is None or u.text_ids is None for u in utterances):
            return []
        src, tgt = utterances
        prompt = [L.bos_id, L.audio_start, *src.audio_ids, L.audio_end]
        target: list = []
        if fmt == "s2st":
            target += [L.text_start, *src.text_ids, L.text_end]
        if fmt in ("s2st", "s2st_tgt_text"):
            target += [L.text_start, *tgt.text_ids, L.text_end]
        target += [L.audio_start, *tgt.audio_ids, L.audio_end, L.eos_id]
        return [_with_mask([(prompt, 0), (target, 1)])]
    raise ValueError(f"unknown task format {fmt!r}")


def _with_mask(segments: list[tuple[list, int]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([np.asarray(seg, dtype=np.int64) for seg, _ in segments])
    mask = np.concatenate([np.full(len(seg), m, dtype=np.int64) for seg, m in segments])
    return ids, mask
