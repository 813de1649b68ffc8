"""`soda generate`: continue prompts (audio and/or text) with a trained model, batched with a KV cache.

Inference goes through transformers' Qwen3ForCausalLM: an exported folder loads directly and a
megatron checkpoint is exported first (in a child process, so the CPU backend's redirections never
touch this one). Sampling is constrained to what the token layout allows: inside an audio segment
position k of a frame may only hold codebook k's ids, a segment ends (`<|audio_end|>`) only on a
frame boundary and is forced to end at `max_seconds`; outside audio, no audio ids. So whatever is
sampled decodes: audio segments to WAV through Mimi, text to text.

Prompts follow the SODA paper's evaluation templates:
  asr       <|audio_start|>{audio}<|audio_end|><|text_start|>        -> text until <|text_end|>
  tts       <|text_start|>{text}<|text_end|><|audio_start|>           -> audio until <|audio_end|>
            (voice-conditioned: <|text_start|>{ref text}<|text_end|><|audio_start|>{ref audio}<|audio_end|>
             first, with --audio REF.wav --reference-text "...")
  s2st      <|audio_start|>{source}<|audio_end|>                      -> [texts] target audio, EOS
  continue  <|audio_start|>{audio}  or  <|text_start|>{text}          -> more of the same
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from megatron_soda.config import UserError
from megatron_soda.tokenization.codec import MIMI_FRAME_RATE, MIMI_HF_NAME
from megatron_soda.training.likelihood import (  # noqa: F401 (prompt audio is encoded as the evaluations encode it)
    PROMPT_PIECE_SECONDS,
    audio_prompt_ids,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

TASKS = ("continue", "asr", "tts", "s2st")
DTYPES = ("auto", "fp32", "bf16")


def model_dtype(dtype: str, device: str) -> str:
    """`auto`: bf16 on a GPU (with SDPA, what its kernels are fast in), fp32 on the CPU."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    return dtype


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0
    top_p: float = 1.0
    max_seconds: float = 10.0  # per generated audio segment
    max_text_tokens: int = 200
    seed: int = 0


@dataclass
class Generated:
    ids: list[int]  # the new tokens
    text: str = ""
    audio: np.ndarray | None = None  # float32 at the codec's rate
    frames: int = 0
    seconds: float = 0.0  # of generated audio, at the codec's frame rate
    segments: list[dict] = field(default_factory=list)
    ended: bool = False  # stopped by the task's stop token (not by the length limit)


@dataclass
class LoadedModel:
    model: object  # transformers Qwen3ForCausalLM
    tok: object
    layout: object
    codec: str | None  # the codec the training shards recorded (soda.json of the export), if known

    def pick_codec(self, given: str | None) -> str:
        """--codec when given, else the codec the model was trained on, else the released Mimi."""
        return given or self.codec or MIMI_HF_NAME


def load_model(source: str, device: str = "cpu", tokenizer: str | None = None, dtype: str = "auto") -> LoadedModel:
    """The HF model (in `dtype`, `model_dtype`'s; SDPA attention), tokenizer, layout and training
    codec from an exported HF folder or a megatron-soda checkpoint. A folder whose vocabulary is
    padded past the tokenizer's (as megatron-style exports and some releases are) loads too: the
    padding rows are never sampled (LayoutConstraint) nor scored (evals slice the logits to the layout)."""
    weights = model_dtype(dtype, device)
    folder = Path(source)
    if not folder.exists():
        raise UserError(f"{source}: no such model folder, run directory or checkpoint")
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from megatron_soda.tokenization.text_tokenizer import layout_of

    tmp = None
    if not (folder / "config.json").is_file():
        from megatron_soda.checkpoints_tools.hf_export import export_in_subprocess

        tmp = tempfile.TemporaryDirectory(prefix="soda-hf-")
        folder = Path(tmp.name) / "model"
        export_in_subprocess(source, str(folder), tokenizer)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar over a model's tensors tells a user nothing
    torch_dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    model = Qwen3ForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    tok_src = tokenizer or str(folder)
    try:
        tok = AutoTokenizer.from_pretrained(tok_src)
    except (OSError, ValueError) as e:
        raise UserError(f"no tokenizer at {tok_src} (pass --tokenizer): {e}") from None
    layout = layout_of(tok)
    if layout.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer {tok_src} has {layout.vocab_size} ids, the model only {model.config.vocab_size}")
    if tmp is not None:
        model._soda_tmp = tmp  # keep the exported files until the model goes away
    info = folder / "soda.json"
    codec = json.loads(info.read_text()).get("codec") if info.is_file() else None
    return LoadedModel(model, tok, layout, codec)


def segment_state(row: list[int], layout) -> tuple[str, int]:
    """Where a token sequence stands: ('audio', tokens since <|audio_start|>) | ('text', 0) | ('between', 0)."""
    L = layout
    for back, t in enumerate(reversed(row)):
        if t == L.audio_start:
            return "audio", back
        if t == L.text_start:
            return "text", 0
        if t in (L.audio_end, L.text_end):
            return "between", 0
    return "between", 0


class LayoutConstraint:
    """A logits processor that keeps sampling inside the token layout (see the module docstring)."""

    def __init__(self, layout, max_frames: int) -> None:
        self.L = layout
        self.max_frames = max_frames
        K, C = layout.codebooks, layout.codebook_size
        self.codebook_slices = [(layout.audio_offset + k * C, layout.audio_offset + (k + 1) * C) for k in range(K)]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        L = self.L
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        for i, row in enumerate(input_ids.tolist()):
            state, n = segment_state(row, L)
            if state == "audio":
                k = n % L.codebooks
                lo, hi = self.codebook_slices[k]
                if not (k == 0 and n // L.codebooks >= self.max_frames):
                    allowed[i, lo:hi] = True
                if k == 0:
                    allowed[i, L.audio_end] = True
            elif state == "text":
                allowed[i, : L.text_vocab_size] = True
                allowed[i, L.text_end] = True
            else:
                allowed[i, : L.text_vocab_size] = True
                allowed[i, L.text_start] = True
                allowed[i, L.audio_start] = True
        return scores.masked_fill(~allowed, float("-inf"))


def prompt_positions(model) -> int | None:
    """How many positions the model was made for (its HF config's max_position_embeddings)."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else None


def check_prompt_length(prompt_len: int, limit: int | None, what: str) -> None:
    """A prompt must leave the model at least one position to generate into."""
    if limit is not None and prompt_len >= limit:
        raise UserError(
            f"{what} is {prompt_len:,} tokens, the model has {limit:,} positions (max_position_embeddings): "
            "use a shorter prompt"
        )


def audio_prompt_tokens(path: str, frame_rate: float, codebooks: int) -> tuple[int, float] | None:
    """(tokens, seconds) a file will take in a prompt, from its header alone; None if unreadable."""
    import math

    from megatron_soda.tokenization.audio_io import audio_seconds

    seconds = audio_seconds(path)
    return None if seconds is None else (math.ceil(seconds * frame_rate) * codebooks, seconds)


def missing_input(task: str, audio: bool, text: bool) -> str | None:
    """What a task's prompt lacks, or None (generate_job asks before it loads a model)."""
    if task == "asr" and not audio:
        return "asr needs --audio"
    if task == "tts" and not text:
        return "tts needs --text"
    if task == "s2st" and not audio:
        return "s2st needs --audio (the source speech)"
    return None


def build_prompt(
    task: str,
    layout,
    audio_ids: np.ndarray | None,
    text_ids: list[int] | None,
    reference_text_ids: list[int] | None = None,
) -> list[int]:
    """The task's prompt; for tts, `audio_ids` with `reference_text_ids` are the voice to speak in
    (the paper's voice-conditioned template), without them the text alone."""
    L = layout
    missing = missing_input(task, audio_ids is not None, text_ids is not None)
    if missing:
        raise UserError(missing)
    a = [] if audio_ids is None else [int(x) for x in audio_ids]
    t = list(text_ids or [])
    if task == "asr":
        return [L.bos_id, L.audio_start, *a, L.audio_end, L.text_start]
    if task == "tts":
        voice = []
        if audio_ids is not None and reference_text_ids is not None:
            voice = [L.text_start, *reference_text_ids, L.text_end, L.audio_start, *a, L.audio_end]
        return [L.bos_id, *voice, L.text_start, *t, L.text_end, L.audio_start]
    if task == "s2st":
        return [L.bos_id, L.audio_start, *a, L.audio_end]
    if task == "continue":
        prompt = [L.bos_id]
        if text_ids is not None:
            prompt += [L.text_start, *t] + ([L.text_end] if audio_ids is not None else [])
        if audio_ids is not None:
            prompt += [L.audio_start, *a]
        return prompt
    raise UserError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")


def stop_ids(task: str, layout) -> list[int]:
    L = layout
    return {"asr": [L.text_end, L.eos_id], "tts": [L.audio_end, L.eos_id]}.get(task, [L.eos_id])


def split_segments(prompt: list[int], new: list[int], layout) -> list[dict]:
    """The generated tokens as segments: {"kind": "text"|"audio", "ids": [...]}. A segment opened in
    the prompt (asr's text, tts's audio, continuations) continues into the generated part."""
    L = layout
    kind = segment_state(prompt, layout)[0]
    segs: list[dict] = []
    cur: list[int] = []

    def flush(k):
        if cur:
            segs.append({"kind": k, "ids": list(cur)})
            cur.clear()

    state = "text" if kind in ("text", "between") else "audio"
    for t in new:
        if t in (L.audio_start, L.text_start):
            flush(state)
            state = "audio" if t == L.audio_start else "text"
        elif t in (L.audio_end, L.text_end, L.eos_id, L.bos_id):
            flush(state)
            state = "text"
        else:
            cur.append(t)
    flush(state)
    return segs


def sample_tokens(
    model,
    layout,
    prompts: list[list[int]],
    task: str,
    s: SamplingConfig,
    max_frames: int,
    max_new: int,
    min_new: int = 0,
) -> torch.Tensor:
    """[batch, width + new] ids: the left-padded prompts (width: the longest) and what transformers'
    generate with a KV cache sampled after them under the layout's constraints; a row stops at its
    task's stop token, but not before `min_new` tokens (`soda bench generate` times exact lengths)."""
    import torch
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    torch.manual_seed(s.seed)
    width = max(len(p) for p in prompts)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    check_prompt_length(width, prompt_positions(model), f"prompt {longest}")
    pad = layout.eos_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    greedy = s.temperature <= 0
    with torch.no_grad():
        return model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new,
            min_new_tokens=min_new or None,
            do_sample=not greedy,
            temperature=None if greedy else s.temperature,
            top_k=(s.top_k or None) if not greedy else None,
            top_p=s.top_p if not greedy and s.top_p < 1 else None,
            eos_token_id=stop_ids(task, layout),
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([LayoutConstraint(layout, max_frames)]),
        )


def generate(model, tok, layout, prompts: list[list[int]], task: str, s: SamplingConfig, codec=None) -> list[Generated]:
    """Batched sampling with a KV cache (left-padded prompts); audio decoded when a codec is given."""
    import numpy as np

    from megatron_soda.tokenization.text_tokenizer import decode_text

    frame_rate = codec.frame_rate if codec is not None else MIMI_FRAME_RATE
    max_frames = max(1, int(round(s.max_seconds * frame_rate)))
    max_new = max_frames * layout.codebooks + 2 * s.max_text_tokens + 8
    if task == "asr":
        max_new = s.max_text_tokens + 1
    out = sample_tokens(model, layout, prompts, task, s, max_frames, max_new)
    width = max(len(p) for p in prompts)
    results = []
    stops = set(stop_ids(task, layout))
    for i, p in enumerate(prompts):
        new = out[i, width:].tolist()
        cut = next((j for j, t in enumerate(new) if t in stops), None)
        new = new[: cut + 1] if cut is not None else new
        segs = split_segments(p, new, layout)
        g = Generated(ids=new, segments=segs, ended=cut is not None)
        g.text = " ".join(decode_text(tok, sg["ids"]).strip() for sg in segs if sg["kind"] == "text").strip()
        audio = [x for sg in segs if sg["kind"] == "audio" for x in sg["ids"]]
        if audio:
            codes = layout.ids_to_codes(np.asarray(audio))
            g.frames = len(codes)
            g.seconds = g.frames / frame_rate
            if codec is not None and len(codes):
                g.audio = codec.decode(codes[:, : codec.num_codebooks])
        results.append(g)
    return results


@dataclass
class GenerateConfig:
    model: str = field(
        metadata={
            "positional": True,
            "help": "an exported HF folder, or a run directory / checkpoint (exported on the fly)",
        }
    )
    task: str = field(default="continue", metadata={"choices": list(TASKS)})
    audio: list[str] = field(
        default_factory=list, metadata={"nargs": "*", "help": "prompt audio files (one per prompt; batched)"}
    )
    text: list[str] = field(default_factory=list, metadata={"nargs": "*", "help": "prompt texts (one per prompt)"})
    reference_text: list[str] = field(
        default_factory=list,
        metadata={"nargs": "*", "help": "tts: the transcript of each --audio, which then is the voice to speak in"},
    )
    out: str = "generations"
    codec: str | None = field(
        default=None,
        metadata={"help": "Mimi name/path or random:<seed> (default: the codec the training shards recorded)"},
    )
    tokenizer: str | None = field(default=None, metadata={"help": "default: the model folder's / checkpoint's"})
    device: str = "cpu"
    dtype: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"help": "model weights and compute: auto is bf16 on cuda, fp32 on cpu"}
    )
    temperature: float = field(default=0.9, metadata={"help": "0: greedy"})
    top_k: int = 0
    top_p: float = 0.8
    max_seconds: float = field(default=10.0, metadata={"help": "longest audio segment generated"})
    max_text_tokens: int = 200
    seed: int = 0


def generate_job(a: GenerateConfig) -> None:
    """`soda generate`: continue audio/text prompts (asr, tts, s2st, continue) -> WAV files + text."""
    # the command line is checked before a model loads (seconds to minutes)
    missing = missing_input(a.task, bool(a.audio), bool(a.text))
    if missing:
        raise UserError(missing)
    empty = [i for i, t in enumerate(a.text) if not t.strip()]
    if a.task == "tts" and empty:
        raise UserError(f"--text: prompt {empty[0]} is empty (tts speaks the given text)")
    n = max(len(a.audio), len(a.text), 1)
    if (a.audio and len(a.audio) != n) or (a.text and len(a.text) != n):
        raise UserError(f"--audio gave {len(a.audio)} prompts and --text {len(a.text)}: give one each per prompt")
    if a.reference_text and (a.task != "tts" or len(a.reference_text) != len(a.audio)):
        raise UserError("--reference-text: with --task tts, one transcript per --audio (the voice prompts)")
    absent = [p for p in a.audio if not Path(p).is_file()]
    if absent:
        raise UserError(f"--audio {absent[0]}: no such file")
    if not a.max_seconds > 0:
        raise UserError(f"--max-seconds: the longest audio segment generated must be > 0 s, got {a.max_seconds:g}")
    if a.max_text_tokens < 1:
        raise UserError(f"--max-text-tokens: must be >= 1, got {a.max_text_tokens}")
    import soundfile as sf

    from megatron_soda.tokenization.codec import MimiCodec

    loaded = load_model(a.model, a.device, a.tokenizer, a.dtype)
    model, tok, layout = loaded.model, loaded.tok, loaded.layout
    codec = MimiCodec.load(loaded.pick_codec(a.codec), a.device)
    limit = prompt_positions(model)
    for i, p in enumerate(a.audio):  # before encoding: a 10-minute file would be encoded for nothing
        known = audio_prompt_tokens(p, codec.frame_rate, layout.codebooks)
        if known is not None:
            check_prompt_length(known[0], limit, f"--audio {p} ({known[1]:.1f} s of audio, prompt {i})")
    audio = audio_prompt_ids(a.audio, codec, layout) if a.audio else []
    texts = [tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in a.text]
    refs = [tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"] for t in a.reference_text]
    prompts = [
        build_prompt(
            a.task, layout, audio[i] if audio else None, texts[i] if texts else None, refs[i] if refs else None
        )
        for i in range(n)
    ]
    for i, p in enumerate(prompts):
        check_prompt_length(len(p), limit, f"prompt {i}")
    s = SamplingConfig(a.temperature, a.top_k, a.top_p, a.max_seconds, a.max_text_tokens, a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, g in enumerate(generate(model, tok, layout, prompts, a.task, s, codec)):
        row = {"prompt": i, "text": g.text, "frames": g.frames, "new_tokens": len(g.ids)}
        if g.audio is not None:
            wav = out / f"{i:03d}.wav"
            sf.write(str(wav), g.audio, codec.sample_rate)
            row.update(wav=str(wav), seconds=round(len(g.audio) / codec.sample_rate, 3))
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False))
    (out / "generations.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
