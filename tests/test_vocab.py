import numpy as np
import pytest

from megatron_soda.tokenization.vocab import LLAMA3_LAYOUT, PUA_BASE, SodaLayout


def test_llama3_layout_gives_the_released_ids():
    L = LLAMA3_LAYOUT
    assert L.delimiter_ids == {
        "<|text_start|>": 128256,
        "<|text_end|>": 128257,
        "<|audio_start|>": 128258,
        "<|audio_end|>": 128259,
    }
    assert L.audio_offset == 128260
    assert L.audio_id(0, 0) == 128260 and L.audio_id(0, 2047) == 130307  # semantic codebook
    assert L.audio_id(1, 0) == 130308 and L.audio_id(7, 2047) == 144643
    assert L.vocab_size == 144_644 == 128_256 + 4 + 16_384
    assert (L.bos_id, L.eos_id) == (128000, 128001)
    assert L.storage_dtype == np.uint32 and L.pad_sentinel >= L.vocab_size


def test_codes_ids_string_round_trip():
    L = LLAMA3_LAYOUT
    codes = np.random.default_rng(0).integers(0, 2048, (50, 8))
    ids = L.codes_to_ids(codes)
    assert ids.shape == (400,)
    assert ids[0] == 128260 + codes[0, 0] and ids[1] == 128260 + 2048 + codes[0, 1]  # frame-major
    assert (L.codebook_of(ids) == np.tile(np.arange(8), 50)).all()
    np.testing.assert_array_equal(L.ids_to_codes(ids), codes)
    s = L.codes_to_str(codes)
    assert s[0] == chr(PUA_BASE + codes[0, 0]) and s[1] == chr(PUA_BASE + 2048 + codes[0, 1])
    np.testing.assert_array_equal(L.str_to_codes(s), codes)


def test_fewer_codebooks_and_partial_frames():
    L = LLAMA3_LAYOUT
    codes = np.random.default_rng(1).integers(0, 2048, (10, 1))
    ids = L.codes_to_ids(codes)
    assert (L.codebook_of(ids) == 0).all()
    np.testing.assert_array_equal(L.ids_to_codes(ids, num_codebooks=1), codes)
    full = L.codes_to_ids(np.zeros((3, 8), dtype=int))
    assert L.ids_to_codes(full[:-3]).shape == (2, 8)  # a generation cut mid-frame drops the partial frame


def test_bad_codes_and_orders_are_refused():
    L = LLAMA3_LAYOUT
    with pytest.raises(ValueError, match="codes must lie"):
        L.codes_to_ids(np.array([[2048] * 8]))
    ids = L.codes_to_ids(np.zeros((2, 8), dtype=int))
    with pytest.raises(ValueError, match="frame-major"):
        L.ids_to_codes(ids[::-1])
    with pytest.raises(ValueError, match="non-audio"):
        L.ids_to_codes(np.array([5] * 8))


def test_small_text_vocab_shifts_everything_and_stores_uint16():
    L = SodaLayout(text_vocab_size=500, bos_id=0, eos_id=1)
    assert L.audio_offset == 504 and L.vocab_size == 500 + 4 + 16384
    assert L.storage_dtype == np.uint16 and L.pad_sentinel == 65535
    assert L.fingerprint() != LLAMA3_LAYOUT.fingerprint()
    assert SodaLayout.from_dict(L.to_dict()) == L
