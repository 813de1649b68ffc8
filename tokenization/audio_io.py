"""Reading audio for the codec: mono float32 at the codec's rate, or a reason why not.

Large corpora always contain a few broken files; preparation must count them and go on, so every
failure here is an `AudioSkip` carrying a short reason key (the summary groups by it) and every
repair (downmix, resample) is reported back as a fix rather than applied silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif")


class AudioSkip(Exception):
    """A file that cannot be used; `reason` is a short key for the summary."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Audio:
    samples: np.ndarray  # float32 [n], mono, at `sample_rate`
    sample_rate: int
    fixes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    if src_rate == dst_rate:
        return x
    import soxr

    return soxr.resample(x, src_rate, dst_rate, quality="HQ").astype(np.float32, copy=False)


def load_audio(
    path: str | Path,
    sample_rate: int = 24_000,
    min_seconds: float = 0.08,
    max_seconds: float | None = None,
) -> Audio:
    """Decode, downmix to mono and resample; raise `AudioSkip` for anything unusable."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioSkip("missing_file", str(path))
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for corrupt headers/bodies
        raise AudioSkip("unreadable", f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    fixes = []
    if data.shape[0] == 0:
        raise AudioSkip("empty", str(path))
    if data.shape[1] > 1:
        data = data.mean(axis=1, keepdims=True)
        fixes.append("downmixed")
    x = np.ascontiguousarray(data[:, 0])
    if not np.isfinite(x).all():
        raise AudioSkip("non_finite", str(path))
    seconds = len(x) / rate
    if seconds < min_seconds:
        raise AudioSkip("too_short", f"{path}: {seconds:.3f}s < {min_seconds}s")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioSkip("too_long", f"{path}: {seconds:.1f}s > {max_seconds}s")
    if rate != sample_rate:
        x = resample(x, rate, sample_rate)
        fixes.append("resampled")
    peak = float(np.abs(x).max())
    if peak > 1.0:  # resampling overshoot or float files out of range: the codec expects [-1, 1]
        x = x / peak
        fixes.append("normalized")
    return Audio(x.astype(np.float32, copy=False), sample_rate, fixes)
