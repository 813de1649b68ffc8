"""SODA document formats: how utterances and transcripts become one token stream.

A document is one source (a recording and its utterances, in order) wrapped in BOS ... EOS. Paired
documents are emitted in every requested order, as the paper stores both text-first and
audio-first copies; audio-only and text-only copies are the ablation formats (S, S+A) and the
plain-text component of the mixture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenization.vocab import SodaLayout

FORMATS = ("text_first", "audio_first", "audio_only", "text_only")


@dataclass
class Utterance:
    text_ids: np.ndarray | None  # transcript tokens (no BOS/EOS), None when there is no transcript
    audio_ids: np.ndarray | None  # flat SODA audio ids, None for text-only input


def parse_formats(spec: str | list[str]) -> list[str]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise ValueError(f"formats: expected a comma list of {', '.join(FORMATS)}, got {spec!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"formats: {spec!r} names a format twice")
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
