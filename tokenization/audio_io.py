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


READ_BLOCK_SECONDS = 30.0  # decoded (and resampled) this much at a time


def load_audio(
    path: str | Path,
    sample_rate: int = 24_000,
    min_seconds: float = 0.08,
    max_seconds: float | None = None,
    data: bytes | None = None,
    segment: tuple[float, float] | None = None,
) -> Audio:
    """Decode, downmix to mono and resample; raise `AudioSkip` for anything unusable.

    The length comes from the file's header first, so a file too long or too short is skipped
    without decoding it (a 10-hour file costs nothing to refuse); the rest is decoded, downmixed and
    resampled block by block (soxr's stream resampler: within 1e-4 of one call over the whole file), so the
    only full-length array is the mono result at the codec's rate. `data`: the file's bytes (a tar
    member, a Parquet cell), `path` then only names it. `segment`: (start, end) seconds of a long
    recording, the only part decoded."""
    import io

    import soundfile as sf

    path = Path(path)
    if data is None and not path.is_file():
        raise AudioSkip("missing_file", str(path))
    try:
        f = sf.SoundFile(io.BytesIO(data) if data is not None else str(path))
    except Exception as e:  # libsndfile raises several types for corrupt headers/bodies
        raise AudioSkip("unreadable", f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    with f:
        rate, frames = f.samplerate, f.frames
        if segment is not None:
            first, last = (min(frames, max(0, int(round(t * rate)))) for t in segment)
            if last <= first:
                raise AudioSkip("empty", f"{path}: segment {segment[0]}-{segment[1]} s")
            f.seek(first)
            frames = last - first
        if frames <= 0:
            raise AudioSkip("empty", str(path))
        seconds = frames / rate
        if seconds < min_seconds:
            raise AudioSkip("too_short", f"{path}: {seconds:.3f}s < {min_seconds}s")
        if max_seconds is not None and seconds > max_seconds:
            raise AudioSkip("too_long", f"{path}: {seconds:.1f}s > {max_seconds}s")
        fixes = ["downmixed"] if f.channels > 1 else []
        stream = None
        if rate != sample_rate:
            import soxr

            stream = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32", quality="HQ")
            fixes.append("resampled")
        parts, block = [], max(1, int(READ_BLOCK_SECONDS * rate))
        try:
            want = frames if segment is not None else -1  # -1: to the end, whatever the header said
            for chunk in f.blocks(blocksize=block, frames=want, dtype="float32", always_2d=True):
                x = chunk.mean(axis=1) if chunk.shape[1] > 1 else chunk[:, 0]
                if not np.isfinite(x).all():
                    raise AudioSkip("non_finite", str(path))
                parts.append(stream.resample_chunk(x, last=False) if stream else np.array(x, dtype=np.float32))
        except AudioSkip:
            raise
        except Exception as e:  # a body that does not decode
            raise AudioSkip("unreadable", f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if stream:
            parts.append(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    x = np.concatenate(parts) if len(parts) > 1 else parts[0]
    if not len(x):
        raise AudioSkip("empty", str(path))
    peak = float(np.abs(x).max())
    if peak > 1.0:  # resampling overshoot or float files out of range: the codec expects [-1, 1]
        x = x / peak
        fixes.append("normalized")
    return Audio(x.astype(np.float32, copy=False), sample_rate, fixes)


def audio_seconds(path: str | Path, data: bytes | None = None) -> float | None:
    """A file's length from its header alone, or None where the header cannot be read (decoding
    it then reports why)."""
    import io

    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data) if data is not None else str(path))
    except Exception:  # noqa: BLE001  (libsndfile raises several types; load_audio names the problem)
        return None
    return info.frames / info.samplerate if info.samplerate else None
