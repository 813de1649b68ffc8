"""The SODA token-id layout: the one place that knows which id means what.

Released SODA checkpoints use: text ids 0..T-1 (Llama-3: T = 128,256), then four delimiters at
T..T+3, then 8 x 2048 audio ids (codebook k, code c -> T + 4 + k*2048 + c), frame-major. Every
other module asks this one, so a different text tokenizer (a tiny test BPE, Qwen3x) shifts all
ids consistently and a shard made under one layout can be told apart from another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from megatron_soda.config import UserError

DELIMITERS = ("<|text_start|>", "<|text_end|>", "<|audio_start|>", "<|audio_end|>")
PUA_BASE = 0xE000  # the released tokenizer's audio character base (codec-bpe "large" offset)
LLAMA3_TEXT_VOCAB = 128_256
MIMI_CODEBOOKS = 8
MIMI_CODEBOOK_SIZE = 2048


class LayoutMismatchError(UserError, ValueError):
    """Raised when data or a tokenizer was made under another token layout."""


@dataclass(frozen=True)
class SodaLayout:
    text_vocab_size: int = LLAMA3_TEXT_VOCAB
    bos_id: int = 128_000
    eos_id: int = 128_001
    codebooks: int = MIMI_CODEBOOKS
    codebook_size: int = MIMI_CODEBOOK_SIZE

    def __post_init__(self) -> None:
        if not 0 <= self.bos_id < self.text_vocab_size or not 0 <= self.eos_id < self.text_vocab_size:
            raise LayoutMismatchError(
                f"bos_id {self.bos_id} / eos_id {self.eos_id} must be text ids below {self.text_vocab_size}"
            )
        if not 1 <= self.codebooks <= 32 or self.codebook_size < 1:
            raise LayoutMismatchError(
                f"codebooks must be 1..32 and codebook_size >= 1, got {self.codebooks}, {self.codebook_size}"
            )

    # --- delimiters -------------------------------------------------------------------------
    @property
    def text_start(self) -> int:
        return self.text_vocab_size

    @property
    def text_end(self) -> int:
        return self.text_vocab_size + 1

    @property
    def audio_start(self) -> int:
        return self.text_vocab_size + 2

    @property
    def audio_end(self) -> int:
        return self.text_vocab_size + 3

    @property
    def delimiter_ids(self) -> dict[str, int]:
        return {name: self.text_vocab_size + i for i, name in enumerate(DELIMITERS)}

    # --- audio block ------------------------------------------------------------------------
    @property
    def audio_offset(self) -> int:
        return self.text_vocab_size + len(DELIMITERS)

    @property
    def audio_vocab_size(self) -> int:
        return self.codebooks * self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.audio_offset + self.audio_vocab_size

    def is_audio(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.audio_offset) & (ids < self.vocab_size)

    def is_text(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= 0) & (ids < self.text_vocab_size)

    def codebook_of(self, ids: np.ndarray) -> np.ndarray:
        """Codebook index of audio ids (-1 for anything else): per-codebook losses need it."""
        ids = np.asarray(ids, dtype=np.int64)
        k = (ids - self.audio_offset) // self.codebook_size
        return np.where(self.is_audio(ids), k, -1)

    def document_problem(self, ids: np.ndarray) -> str | None:
        """Why `ids` is not a well-formed SODA document under this layout, or None.

        For documents tokenized elsewhere (the released pre-tokenized corpora): a wrong tokenizer, a
        codec offset other than this layout's, or a document cut mid-span all show up here rather
        than as silent garbage in training. Checked: every id in the vocabulary; <|begin_of_text|>
        first and <|end_of_text|> last; text and audio delimiters in start/end pairs, never nested;
        audio ids inside audio spans only and nothing else there; each span whole frames, frame-major
        (codebook k at position k of every frame)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size < 2:
            return "fewer than 2 tokens"
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            return f"id {int(bad[0])} outside the {self.vocab_size}-id vocabulary"
        if ids[0] != self.bos_id or ids[-1] != self.eos_id:
            return "does not start with <|begin_of_text|> and end with <|end_of_text|>"
        for start, end, name in ((self.text_start, self.text_end, "text"), (self.audio_start, self.audio_end, "audio")):
            marks = ids[(ids == start) | (ids == end)]
            if marks.size % 2 or (marks[0::2] != start).any() or (marks[1::2] != end).any():
                return f"unbalanced <|{name}_start|> / <|{name}_end|> delimiters"
        starts, ends = ids == self.audio_start, ids == self.audio_end
        inside = ((np.cumsum(starts) - np.cumsum(ends)) == 1) & ~starts
        if (self.is_audio(ids) != inside).any():
            return "audio ids outside an audio span, or other ids inside one"
        text_inside = (np.cumsum(ids == self.text_start) - np.cumsum(ids == self.text_end)) == 1
        if (inside & text_inside).any():
            return "an audio span inside a text span"
        pos = np.arange(ids.size)
        span_start = np.maximum.accumulate(np.where(starts, pos, -1))
        offset = pos - span_start - 1  # position inside the span
        if (self.codebook_of(ids[inside]) != offset[inside] % self.codebooks).any():
            return f"audio ids not in frame-major order of {self.codebooks} codebooks"
        lengths = np.flatnonzero(ends) - np.flatnonzero(starts) - 1
        if (lengths % self.codebooks).any():
            return f"an audio span that is not whole frames of {self.codebooks} codebooks"
        return None

    def audio_id(self, codebook: int, code: int) -> int:
        if not 0 <= codebook < self.codebooks or not 0 <= code < self.codebook_size:
            raise ValueError(f"(codebook, code) = ({codebook}, {code}) outside {self.codebooks} x {self.codebook_size}")
        return self.audio_offset + codebook * self.codebook_size + code

    def codes_to_ids(self, codes: np.ndarray) -> np.ndarray:
        """[frames, K] codec codes (K <= codebooks) -> frame-major flat ids, codebook 0 first."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.ndim != 2 or not 1 <= codes.shape[1] <= self.codebooks:
            raise ValueError(f"codes must be [frames, 1..{self.codebooks}], got shape {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        k = np.arange(codes.shape[1], dtype=np.int64)
        return (self.audio_offset + k * self.codebook_size + codes).reshape(-1)

    def ids_to_codes(self, ids: np.ndarray, num_codebooks: int | None = None) -> np.ndarray:
        """Flat audio ids -> [frames, K]. A trailing partial frame is dropped (generation can stop
        mid-frame); a position holding another codebook's id is an error, not a silent remap."""
        k_count = num_codebooks or self.codebooks
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[: len(ids) - len(ids) % k_count]
        if not self.is_audio(ids).all():
            raise ValueError("ids_to_codes got non-audio ids")
        rel = (ids - self.audio_offset).reshape(-1, k_count)
        expected_k = np.arange(k_count)
        if not (rel // self.codebook_size == expected_k).all():
            raise ValueError("audio ids are not in frame-major codebook order 0..K-1")
        return rel % self.codebook_size

    # --- string (PUA) form, as the released tokenizer stores audio --------------------------
    def audio_chars(self) -> list[str]:
        return [chr(PUA_BASE + i) for i in range(self.audio_vocab_size)]

    def codes_to_str(self, codes: np.ndarray) -> str:
        ids = self.codes_to_ids(codes) - self.audio_offset
        return "".join(map(chr, (ids + PUA_BASE).tolist()))

    def str_to_codes(self, text: str, num_codebooks: int | None = None) -> np.ndarray:
        rel = np.fromiter((ord(ch) - PUA_BASE for ch in text), dtype=np.int64, count=len(text))
        if rel.size and (rel.min() < 0 or rel.max() >= self.audio_vocab_size):
            raise ValueError("string holds characters outside the audio code range")
        return self.ids_to_codes(rel + self.audio_offset, num_codebooks)

    # --- storage ---------------------------------------------------------------------------
    @property
    def storage_dtype(self) -> np.dtype:
        """Smallest unsigned dtype that holds every id plus the padding sentinel (its max value)."""
        return np.dtype(np.uint16) if self.vocab_size < np.iinfo(np.uint16).max else np.dtype(np.uint32)

    @property
    def pad_sentinel(self) -> int:
        """Marks padding in stored sequences; never a real id, so the loader can mask it out."""
        return int(np.iinfo(self.storage_dtype).max)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SodaLayout:
        return cls(**{k: d[k] for k in ("text_vocab_size", "bos_id", "eos_id", "codebooks", "codebook_size")})

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def check_same(self, other: SodaLayout, what: str) -> None:
        if self != other:
            diffs = [f"{k}: {v} != {getattr(other, k)}" for k, v in self.to_dict().items() if getattr(other, k) != v]
            raise LayoutMismatchError(f"{what} uses another token layout ({'; '.join(diffs)})")


LLAMA3_LAYOUT = SodaLayout()
