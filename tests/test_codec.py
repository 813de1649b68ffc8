import math

import numpy as np
import pytest

from megatron_soda.tokenization.audio_io import load_audio
from megatron_soda.tokenization.codec import MimiCodec


def test_encode_gives_8_codebooks_at_12_5_hz(corpus, codec):
    audio = load_audio(corpus / "audio" / "utt0000.wav", codec.sample_rate)
    assert "resampled" in audio.fixes  # espeak-ng writes 22,050 Hz
    (codes,) = codec.encode([audio.samples])
    frames = math.ceil(len(audio.samples) / 1920)
    assert codes.shape == (frames, 8)
    assert abs(frames - audio.seconds * 12.5) <= 1
    assert codes.min() >= 0 and codes.max() < 2048
    assert len(np.unique(codes[:, 0])) > 3  # a random codec with seeded codebooks is not degenerate


@pytest.mark.slow
def test_batched_encoding_equals_one_by_one(corpus, codec):
    clips = [load_audio(corpus / "audio" / f"utt{i:04d}.wav").samples for i in range(3)]
    batched = codec.encode(clips)
    for clip, got in zip(clips, batched, strict=True):
        np.testing.assert_array_equal(got, codec.encode([clip])[0])


def test_decode_gives_the_whole_frames_that_cover_the_input(corpus, codec):
    audio = load_audio(corpus / "audio" / "utt0001.wav").samples
    (codes,) = codec.encode([audio])
    out = codec.decode(codes)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    # the input is padded to a frame boundary before encoding: exactly ceil(n / 1920) frames come back
    assert len(codes) == -(-len(audio) // 1920) and len(out) == len(codes) * 1920


def test_fewer_codebooks_are_a_prefix(corpus, codec):
    audio = load_audio(corpus / "audio" / "utt0002.wav").samples
    one = MimiCodec(codec.model, num_codebooks=1).encode([audio])[0]
    np.testing.assert_array_equal(one[:, 0], codec.encode([audio])[0][:, 0])


def test_random_codec_is_reproducible(codec):
    again = MimiCodec.load("random:0")
    assert again.identity()["weights_sha"] == codec.identity()["weights_sha"]
