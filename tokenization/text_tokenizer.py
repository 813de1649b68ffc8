"""Text tokenizer extended with the SODA delimiters and audio characters.

The extension is done the way the released tokenizer was built (codec-bpe): the 4 delimiters are
appended first, then the 16,384 audio characters as special added tokens, so that a
`PreTrainedTokenizerFast` saved from here gives exactly the ids `SodaLayout` computes. Production
uses the Llama-3 tokenizer by HF name/path; tests train a small byte-level BPE offline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import UserError
from megatron_soda.tokenization.vocab import DELIMITERS, LayoutMismatchError, SodaLayout

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
LLAMA3_TOKENIZER = "meta-llama/Meta-Llama-3-8B"  # gated on the Hub; any local copy works too


class TokenizerError(UserError, ValueError):
    """A text tokenizer that cannot become (or already is) the SODA tokenizer."""


def train_tiny_bpe(texts: Iterable[str], vocab_size: int = 1024):
    """A small byte-level BPE with Llama-3's BOS/EOS names, for tests and the demo."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)


def is_extended(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(d in vocab for d in DELIMITERS)


def _bos_eos(tokenizer) -> tuple[int, int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise TokenizerError("the text tokenizer defines no BOS/EOS token; SODA documents are wrapped in BOS ... EOS")
    return bos, eos


def extend_tokenizer(tokenizer, codebooks: int = 8, codebook_size: int = 2048):
    """Append delimiters + audio characters; returns (tokenizer, layout) and checks the ids."""
    if is_extended(tokenizer):
        raise TokenizerError("tokenizer is already extended with the SODA delimiters")
    bos, eos = _bos_eos(tokenizer)
    layout = SodaLayout(
        text_vocab_size=len(tokenizer), bos_id=bos, eos_id=eos, codebooks=codebooks, codebook_size=codebook_size
    )
    tokenizer.add_tokens(list(DELIMITERS), special_tokens=True)
    tokenizer.add_tokens(layout.audio_chars(), special_tokens=True)
    verify_layout(tokenizer, layout)
    return tokenizer, layout


def layout_of(tokenizer, codebooks: int = 8, codebook_size: int = 2048) -> SodaLayout:
    """The layout an extended tokenizer implies (text vocab = id of `<|text_start|>`), verified."""
    if not is_extended(tokenizer):
        raise LayoutMismatchError("tokenizer is not extended with the SODA delimiters (run `soda tokenizer build`)")
    bos, eos = _bos_eos(tokenizer)
    layout = SodaLayout(
        text_vocab_size=tokenizer.convert_tokens_to_ids(DELIMITERS[0]),
        bos_id=bos,
        eos_id=eos,
        codebooks=codebooks,
        codebook_size=codebook_size,
    )
    verify_layout(tokenizer, layout)
    return layout


def verify_layout(tokenizer, layout: SodaLayout) -> None:
    """Every delimiter and audio character must map to the id the layout gives it."""
    if len(tokenizer) != layout.vocab_size:
        raise LayoutMismatchError(f"tokenizer has {len(tokenizer)} ids, layout expects {layout.vocab_size}")
    vocab = tokenizer.get_vocab()
    for name, want in layout.delimiter_ids.items():
        if vocab.get(name) != want:
            raise LayoutMismatchError(f"tokenizer maps {name} to {vocab.get(name)}, layout expects {want}")
    for i, ch in enumerate(layout.audio_chars()):
        if vocab.get(ch) != layout.audio_offset + i:
            raise LayoutMismatchError(
                f"tokenizer maps audio char U+{ord(ch):04X} to {vocab.get(ch)}, "
                f"layout expects {layout.audio_offset + i} (the base vocabulary already contains it?)"
            )


def load_tokenizer(name_or_path: str):
    """The tokenizer at a local folder or Hub name; one that cannot be had (offline and not cached,
    gated, no such folder) is a TokenizerError saying how to give it, not transformers' traceback."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerError(
            f"tokenizer {name_or_path}: cannot load it ({first}); pass a local tokenizer folder (one `soda tokenizer` "
            "or `soda prepare` wrote, or a downloaded Hugging Face model folder), or set HF_HUB_OFFLINE=1 with it in "
            "the Hugging Face cache (HF_HOME)"
        ) from None


def load_soda_tokenizer(name_or_path: str):
    """Load an extended tokenizer, or extend a plain one on the fly; returns (tokenizer, layout)."""
    tok = load_tokenizer(name_or_path)
    if is_extended(tok):
        return tok, layout_of(tok)
    return extend_tokenizer(tok)


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of the text side: the same ids for the same strings, whatever path it came from."""
    h = hashlib.sha256()
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{idx}\t{token}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out


@dataclass
class TokenizerConfig:
    out: str = field(metadata={"help": "output directory"})
    base: str | None = field(
        default=None, metadata={"help": "HF tokenizer name or path to extend (production: a Llama-3 tokenizer)"}
    )
    train_tiny: str | None = field(
        default=None, metadata={"metavar": "TEXT_FILE", "help": "instead, train a small BPE on this text file (tests)"}
    )
    vocab_size: int = field(default=1024, metadata={"help": "with --train-tiny"})


def tokenizer_job(cfg: TokenizerConfig) -> None:
    """`soda tokenizer`: the SODA tokenizer (text tokenizer + delimiters + audio tokens)."""
    if bool(cfg.base) == bool(cfg.train_tiny):
        raise UserError("tokenizer: give exactly one of --base NAME_OR_PATH or --train-tiny TEXT_FILE")
    if cfg.train_tiny:
        base = train_tiny_bpe(Path(cfg.train_tiny).read_text(encoding="utf-8").splitlines(), cfg.vocab_size)
    else:
        base = load_tokenizer(cfg.base)
    tok, layout = extend_tokenizer(base)
    save_tokenizer(tok, cfg.out)
    print(
        f"SODA tokenizer -> {cfg.out}: text {layout.text_vocab_size}, delimiters {layout.text_vocab_size}.."
        f"{layout.audio_end}, audio {layout.audio_offset}..{layout.vocab_size - 1}, total {layout.vocab_size}"
    )


def decode_text(tokenizer, ids: list[int]) -> str:
    """Text of generated ids without partial characters.

    A byte-level BPE (Llama-3's, and ours) can generate a multi-byte character's bytes split across
    tokens, or stop between them; `decode` then prints U+FFFD for each orphan byte. Here such a
    tokenizer's tokens are turned back into bytes and decoded leaving out whatever is not whole
    UTF-8; any other tokenizer's replacement characters are dropped."""
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if "\ufffd" not in text:
        return text
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if all(ch in to_byte for t in tokens for ch in t):
        return bytes(to_byte[ch] for t in tokens for ch in t).decode("utf-8", errors="ignore")
    return text.replace("\ufffd", "")
