"""`soda bench tokenize`: Mimi encoding throughput in audio-seconds per wall-second (real-time factor).

The goal is >= 1000x real time batched on one GPU (SODA's 500B tokens are ~1.39M hours of audio).
Mimi's compute does not depend on what the audio says, so the clips are seeded noise unless
`--audio` names a file; batches go through the same `MimiCodec.encode` that `soda prepare` uses.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from megatron_soda.tokenization.codec import MIMI_HF_NAME, MimiCodec
from megatron_soda.tools.bench import write_json


def run(
    codec: str = MIMI_HF_NAME,
    device: str = "cpu",
    batches: list[int] | None = None,
    seconds: float = 10.0,
    reps: int = 3,
    audio: str | None = None,
) -> list[dict]:
    import numpy as np
    import torch

    c = MimiCodec.load(codec, device=device)
    if audio:
        from megatron_soda.tokenization.audio_io import load_audio

        clip = load_audio(audio, c.sample_rate).samples
        clip = np.resize(clip, int(seconds * c.sample_rate)).astype(np.float32)
    else:
        clip = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * c.sample_rate))).astype(np.float32)
    rows = []
    for b in batches or [1, 8, 32]:
        clips = [clip] * b
        c.encode(clips)  # warm-up (cuDNN autotuning, allocator)
        times = []
        for _ in range(reps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            codes = c.encode(clips)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        audio_s = b * len(clip) / c.sample_rate
        tokens = sum(x.size for x in codes)
        rows.append(
            {
                "codec": codec,
                "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                "batch": b,
                "clip_seconds": seconds,
                "wall_s": dt,
                "realtime_factor": audio_s / dt,
                "tokens_per_s": tokens / dt,
            }
        )
        r = rows[-1]
        print(
            f"batch {b:>4} x {seconds:g} s: {dt:8.3f} s wall, {r['realtime_factor']:9.1f}x real time, "
            f"{r['tokens_per_s']:12,.0f} tokens/s"
        )
    return rows


@dataclass
class TokenizeBenchConfig:
    codec: str = field(default=MIMI_HF_NAME, metadata={"help": "HF name/path, or random:<seed> (random weights)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda when a GPU exists) | cpu | cuda[:N]"})
    batch: list[int] = field(default_factory=lambda: [1, 8, 32], metadata={"help": "comma list of clips per batch"})
    seconds: float = field(default=10.0, metadata={"help": "length of each clip"})
    reps: int = 3
    audio: str | None = field(
        default=None, metadata={"help": "a speech file to tile (default: seeded noise, same compute)"}
    )
    json: str | None = field(default=None, metadata={"help": "also write the rows here"})


def bench_job(cfg: TokenizeBenchConfig) -> list[dict]:
    """`soda bench tokenize`: Mimi encoding throughput (audio-seconds per wall-second), batched."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    rows = run(cfg.codec, device, cfg.batch, cfg.seconds, cfg.reps, cfg.audio)
    write_json(rows, cfg.json)
    return rows
