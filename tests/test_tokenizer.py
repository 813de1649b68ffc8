import numpy as np
import pytest

from megatron_soda.tokenization.text_tokenizer import (
    extend_tokenizer,
    layout_of,
    load_soda_tokenizer,
    load_tokenizer,
    train_tiny_bpe,
    verify_layout,
)
from megatron_soda.tokenization.vocab import LayoutMismatchError


def test_extended_tokenizer_matches_the_layout(tokenizer_dir):
    tok, layout = load_soda_tokenizer(str(tokenizer_dir))
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert len(tok) == layout.text_vocab_size + 16_384 + 4 == layout.vocab_size
    assert tok.convert_tokens_to_ids("<|audio_start|>") == layout.audio_start
    codes = np.random.default_rng(0).integers(0, 2048, (25, 8))
    s = "<|audio_start|>" + layout.codes_to_str(codes) + "<|audio_end|>"
    ids = tok.encode(s, add_special_tokens=False)
    assert ids == [layout.audio_start, *layout.codes_to_ids(codes).tolist(), layout.audio_end]
    assert tok.bos_token_id == layout.bos_id and tok.eos_token_id == layout.eos_id


def test_transcripts_never_turn_into_delimiters_or_audio(tokenizer_dir):
    tok, layout = load_soda_tokenizer(str(tokenizer_dir))
    ids = tok(["say <|audio_start|> and \ue000 please"], add_special_tokens=False, split_special_tokens=True)[
        "input_ids"
    ][0]
    assert max(ids) < layout.text_vocab_size


def test_reload_keeps_the_layout(tokenizer_dir):
    tok = load_tokenizer(str(tokenizer_dir))
    layout = layout_of(tok)
    verify_layout(tok, layout)
    with pytest.raises(ValueError, match="already extended"):
        extend_tokenizer(tok)


def test_a_base_vocab_holding_audio_characters_is_refused():
    # a byte-level BPE never holds U+E000 as one token, but a vocab that does would shift ids silently
    base = train_tiny_bpe(["hello world"] * 20, vocab_size=300)
    base.add_tokens(["\ue001"])
    with pytest.raises(LayoutMismatchError, match="layout expects"):
        extend_tokenizer(base)


def test_plain_tokenizer_is_not_a_soda_tokenizer():
    base = train_tiny_bpe(["hello world"] * 20, vocab_size=300)
    with pytest.raises(LayoutMismatchError, match="not extended"):
        layout_of(base)
