"""`soda inspect`: what a shard set holds, and a few samples decoded back to readable form.

Audio runs are shown as frame counts rather than 8 x frames code characters: a person checks that
transcripts sit next to plausible amounts of audio, in the right order, with the right delimiters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_soda.config import UserError
from megatron_soda.tokenization.codec import MIMI_FRAME_RATE

if TYPE_CHECKING:
    import numpy as np

    from megatron_soda.tokenization.vocab import SodaLayout


VERIFY_BLOCK = 1024  # samples requested together from object storage (coalesced into a few range requests)


def verify_set(path: str) -> int:
    """Read every sample (header, ids, checksum); print each bad one; a UserError when any is bad.
    A set on object storage is read from the store itself, never from a local cache."""
    from tqdm import tqdm

    from megatron_soda.data.shard_set import ShardReadError, ShardSet

    s = ShardSet(path, skip_corrupt=True, cache_gb=0)  # skip_corrupt: go on past a bad sample, counting it
    bad = list(s.skipped_shards)
    for problem in bad:
        print(f"bad shard: {problem}")
    for k in tqdm(range(len(s)), desc="verify", unit="sample", mininterval=2):
        if k % VERIFY_BLOCK == 0:
            s.fetch(list(range(k, min(k + VERIFY_BLOCK, len(s)))))
        if s.read_masked(k)[2]:
            bad.append(s.last_problem)
            print(f"bad sample: {s.last_problem}")
    checked = "with checksums" if any(r.get("checksums") for r in s.shards) else "no checksums (an older set)"
    if bad:
        raise ShardReadError(f"{path}: {len(bad)} bad of {len(s)} samples / {len(s.index.shards)} shards ({checked})")
    print(f"{path}: all {len(s)} samples of {len(s.shards)} shards read back intact ({checked})")
    return len(s)


def render(ids: np.ndarray, tokenizer, layout: SodaLayout, num_codebooks: int) -> str:
    names = {v: k for k, v in layout.delimiter_ids.items()}
    names[layout.bos_id], names[layout.eos_id] = "<BOS>", "<EOS>"
    out, i, n = [], 0, len(ids)
    while i < n:
        t = int(ids[i])
        if t == layout.pad_sentinel:
            out.append(f"<PAD x{n - i}>")
            break
        if layout.audio_offset <= t < layout.vocab_size:
            j = i
            while j < n and layout.audio_offset <= int(ids[j]) < layout.vocab_size:
                j += 1
            out.append(f"[audio: {j - i} tokens]")
            i = j
        elif t in names:
            out.append(names[t])
            i += 1
        else:
            j = i
            while j < n and int(ids[j]) < layout.text_vocab_size and int(ids[j]) not in names:
                j += 1
            out.append(tokenizer.decode(ids[i:j].tolist()))
            i = j
    return "".join(out)


def inspect(path: str, num_samples: int = 3, chars: int = 300) -> None:
    from megatron_soda.data.shard_set import ShardSet
    from megatron_soda.tokenization.text_tokenizer import load_tokenizer

    shards = ShardSet(path)
    idx = shards.index
    meta, layout = idx.meta, idx.layout
    summary = meta.get("summary", {})
    print(
        f"shard set {idx.where}: {len(idx.shards)} shards, {idx.num_samples} samples of {idx.seq_len}+1 tokens, "
        f"{idx.num_tokens:,} tokens"
    )
    print(
        f"  layout: text {layout.text_vocab_size} + 4 delimiters + {layout.codebooks}x{layout.codebook_size} audio "
        f"= {layout.vocab_size} ids ({idx.dtype.name} on disk)"
    )
    codec = meta.get("codec", {})
    print(
        f"  codec: {codec.get('name')} ({meta.get('num_codebooks')} codebooks kept), "
        f"formats: {', '.join(meta.get('formats', []))}"
    )
    if summary:
        counts = summary.get("counts", {})
        print(
            f"  audio {summary.get('audio_hours', 0):.3f} h, text tokens {counts.get('text_tokens', 0):,}, "
            f"audio tokens {counts.get('audio_tokens', 0):,}, skipped {sum(summary.get('skipped', {}).values())}"
        )
    tok_dir = idx.root / meta.get("tokenizer", {}).get("path", "tokenizer")
    if idx.source and not tok_dir.is_dir():  # a set on object storage: its tokenizer copied into the mirror
        from megatron_soda.tokenization.object_store import download_dir, join

        download_dir(join(idx.source, meta.get("tokenizer", {}).get("path", "tokenizer")), tok_dir)
    tokenizer = load_tokenizer(str(tok_dir))
    frame_rate = float(codec.get("frame_rate", MIMI_FRAME_RATE))
    for k in range(min(num_samples, len(shards))):
        ids, _ = shards.read(k)
        text = render(ids, tokenizer, layout, int(meta.get("num_codebooks", layout.codebooks)))
        audio = int(layout.is_audio(ids).sum())
        print(
            f"\n--- sample {k}: {int(layout.is_text(ids).sum())} text + {audio} audio tokens "
            f"({audio / int(meta.get('num_codebooks', 8)) / frame_rate:.1f} s of audio)"
        )
        print(text[:chars] + (" ..." if len(text) > chars else ""))


@dataclass
class InspectConfig:
    path: str = field(
        metadata={
            "positional": True,
            "help": "a `soda prepare` output (path, or s3:// gs:// hf:// URL), or a run dir / checkpoint",
        }
    )
    samples: int = 3
    chars: int = field(default=300, metadata={"help": "characters of each decoded sample to print"})
    verify: bool = field(default=False, metadata={"help": "read every sample of the set and check its checksum"})


def inspect_job(cfg: InspectConfig) -> None:
    """`soda inspect`: a shard set (decode a few samples) or a checkpoint (config, shapes)."""
    remote = "://" in cfg.path  # a shard set on object storage (s3://, gs://, hf://)
    if not remote and not Path(cfg.path).exists():
        raise UserError(f"{cfg.path}: no such shard set, run directory or checkpoint")
    if remote or (Path(cfg.path) / "index.json").is_file():
        if cfg.verify:
            verify_set(cfg.path)
            return
        inspect(cfg.path, cfg.samples, cfg.chars)
    else:
        from megatron_soda.checkpoints_tools.inspect_checkpoint import inspect_checkpoint

        inspect_checkpoint(cfg.path)
