"""Mimi through `transformers.MimiModel`: batched encoding to [frames, K] codes and decoding back.

Batching must not change the codes. Mimi's encoder is causal, so right-padding a short clip inside a
batch leaves its frames alone except the last, partial one (the conv padding differs). Every clip is
therefore zero-padded to a whole number of frames first: then batched and one-by-one encodes agree
exactly, and a clip of n samples always gives ceil(n / samples_per_frame) frames.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING

from megatron_soda.config import UserError

if TYPE_CHECKING:
    import numpy as np

MIMI_HF_NAME = "kyutai/mimi"
# Mimi's frames per second (24 kHz / 1920 samples), for where no codec is loaded: a shard index
# without codec metadata, or generation that produces no audio. A loaded codec uses its own config.
MIMI_FRAME_RATE = 12.5
RANDOM_PREFIX = "random:"  # "random:<seed>": a random-weight Mimi, for offline tests and the demo


def random_mimi(seed: int = 0):
    """A random-weight Mimi with non-degenerate codebooks, for tests and the offline demo.

    A fresh `MimiModel(MimiConfig())` quantizes everything to code 0: its codebooks are buffers
    (`embed_sum`) initialised to zero. Giving them seeded random centroids makes the codes diverse,
    which is all the data pipeline needs (the audio it decodes to is noise, as with any random codec).
    """
    import torch
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(seed)
    model = MimiModel(MimiConfig())
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if type(module).__name__ == "MimiEuclideanCodebook":
            module.embed_sum.copy_(torch.randn(module.embed_sum.shape, generator=gen))
            module.cluster_usage.fill_(1.0)
            module._embed = None  # the cached centroid table, rebuilt from embed_sum on next use
    return model.eval()


class CodecLoadError(UserError):
    """The codec could not be loaded (not found locally, no network, not a Mimi folder)."""


HOW_TO_GIVE_A_CODEC = (
    "pass a local copy (--codec /path/to/mimi: a folder with its config.json and model.safetensors), or set "
    "HF_HUB_OFFLINE=1 with it in the Hugging Face cache (HF_HOME)"
)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class MimiCodec:
    def __init__(self, model, device: str = "cpu", num_codebooks: int = 8, name: str = MIMI_HF_NAME) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.num_codebooks = num_codebooks
        self.name = name
        cfg = model.config
        self.sample_rate = int(cfg.sampling_rate)
        self.frame_rate = float(cfg.frame_rate)
        self.samples_per_frame = int(round(self.sample_rate / self.frame_rate))
        self.codebook_size = int(cfg.codebook_size)
        if not 1 <= num_codebooks <= cfg.num_quantizers:
            raise UserError(f"num_codebooks must be 1..{cfg.num_quantizers}, got {num_codebooks}")

    @classmethod
    def load(cls, name_or_path: str = MIMI_HF_NAME, device: str = "cpu", num_codebooks: int = 8) -> MimiCodec:
        import torch
        from transformers import MimiModel

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda asked for, but torch sees no GPU")
        if name_or_path.startswith(RANDOM_PREFIX):
            seed = name_or_path[len(RANDOM_PREFIX) :]
            if not seed.isdigit():
                raise UserError(f"codec {name_or_path!r}: expected {RANDOM_PREFIX}<integer seed>")
            model = random_mimi(int(seed))
        else:
            try:
                model = MimiModel.from_pretrained(name_or_path)
            except (OSError, ValueError) as e:  # hub unreachable / not cached, no such folder, not a Mimi
                raise CodecLoadError(
                    f"codec {name_or_path}: cannot load it ({_first_line(e)}); {HOW_TO_GIVE_A_CODEC}"
                ) from None
        return cls(model, device=device, num_codebooks=num_codebooks, name=name_or_path)

    def identity(self) -> dict:
        """What makes two codecs interchangeable: config and weights (hashed), not the path."""
        h = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        cfg = json.dumps(self.model.config.to_diff_dict(), sort_keys=True, default=str)
        return {
            "name": self.name,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "codebook_size": self.codebook_size,
            "num_codebooks": self.num_codebooks,
            "config_sha": hashlib.sha256(cfg.encode()).hexdigest()[:16],
            "weights_sha": h.hexdigest()[:16],
        }

    def num_frames(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.samples_per_frame)

    def encode(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        """Encode mono clips at `sample_rate` in one batch; returns int16-safe [frames, K] arrays."""
        import numpy as np
        import torch

        if not clips:
            return []
        frames = [self.num_frames(len(c)) for c in clips]
        width = max(frames) * self.samples_per_frame
        batch = np.zeros((len(clips), 1, width), dtype=np.float32)
        for i, clip in enumerate(clips):
            batch[i, 0, : len(clip)] = clip
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            codes = self.model.encode(x, num_quantizers=self.num_codebooks).audio_codes  # [B, K, F]
            codes = codes.transpose(1, 2).cpu().numpy()
        return [codes[i, :n].astype(np.int16) for i, n in enumerate(frames)]

    def encode_file(
        self,
        path: str,
        total_seconds: float,
        piece_seconds: float,
        batch_seconds: float | None = None,
        data: bytes | None = None,
    ) -> tuple[np.ndarray, set[str]]:
        """[frames, K] codes of a long file, decoded and encoded `piece_seconds` at a time (a batch
        of `batch_seconds` of pieces per encode): peak memory is one batch's, not the whole file's
        (a 10-minute clip in one piece takes 8 GB). Mimi is causal, so a piece's codes differ from
        the whole file's only near its start; `soda prepare` cuts long audio-only files the same
        way (its --max-seconds), so prompts cut like this look like what the model was trained
        on. A tail under a second joins the piece before it. Returns the codes and the fixes
        (resampled, downmixed, ...) any piece needed; an unusable file raises AudioSkip."""
        import numpy as np

        from megatron_soda.tokenization.audio_io import load_audio

        starts = [float(t) for t in np.arange(0.0, total_seconds, piece_seconds)]
        if len(starts) > 1 and total_seconds - starts[-1] < 1.0:
            starts.pop()
        bounds = list(zip(starts, [*starts[1:], total_seconds], strict=True))
        per_batch = max(1, int((batch_seconds or piece_seconds) // piece_seconds))
        codes, fixes = [], set()
        for i in range(0, len(bounds), per_batch):
            pieces = [load_audio(path, self.sample_rate, data=data, segment=b) for b in bounds[i : i + per_batch]]
            fixes.update(f for p in pieces for f in p.fixes)
            codes += self.encode([p.samples for p in pieces])
        return np.concatenate(codes), fixes

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """[frames, K] codes -> mono float32 audio of frames * samples_per_frame samples."""
        import numpy as np
        import torch

        codes = np.asarray(codes)
        with torch.inference_mode():
            t = torch.from_numpy(codes.astype(np.int64).T[None]).to(self.device)  # [1, K, F]
            audio = self.model.decode(t).audio_values  # [1, 1, samples]
            return audio[0, 0].float().cpu().numpy()
