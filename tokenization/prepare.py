"""`soda prepare`: audio + transcripts -> packed WebDataset token shards, resumably and in parallel.

Work is cut into units of whole documents; unit u becomes shard u. Units are dealt round-robin to
SLURM array tasks / ranks (`--rank/--world-size`) and, within a rank, to `--num-workers`
processes. A unit whose shard and sidecar exist is skipped, so a re-run (after preemption, or
with more ranks) only does what is missing. Whichever rank sees every sidecar writes the index.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_soda.config import UserError
from megatron_soda.tokenization.audio_io import AudioSkip, audio_seconds, load_audio
from megatron_soda.tokenization.codec import MIMI_HF_NAME
from megatron_soda.tokenization.documents import (
    FORMATS,
    PAIRED_TASK_FORMATS,
    S2ST_FORMATS,
    TASK_FORMATS,
    Utterance,
    build_document,
    build_task_documents,
    parse_formats,
)
from megatron_soda.tokenization.inputs import DocGrouper, Entry, InputError, Skip, discover, entries_of_file
from megatron_soda.tokenization.shard_format import atomic_write_text, index_entry, read_sidecar, write_index
from megatron_soda.tokenization.shards import Packer, write_shard
from megatron_soda.tokenization.vocab import SodaLayout

PAIRED_FORMATS = ("text_first", "audio_first")  # the pretraining default: both orders, as the paper


@dataclass
class PrepareConfig:
    inputs: list[str] = field(
        metadata={
            "flag": "--input",
            "action": "append",
            "help": "JSONL manifest, directory, corpus file (.jsonl.gz/.jsonl.zst/.parquet/.arrow/.tar) or "
            "hf://datasets/OWNER/NAME[/FOLDER] (repeatable)",
        }
    )
    output: str
    tokenizer: str = field(metadata={"help": "HF tokenizer name/path (extended on the fly if plain)"})
    codec: str = field(default=MIMI_HF_NAME, metadata={"help": "Mimi name/path, or random:<seed> for a random codec"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    seq_len: int = 4096
    formats: list[str] = field(
        default_factory=lambda: list(PAIRED_FORMATS), metadata={"help": f"comma list of {', '.join(FORMATS)}"}
    )
    num_codebooks: int = field(default=8, metadata={"help": "codebooks kept: 1 = semantic only ... 8"})
    files_per_shard: int = 256
    batch_seconds: float = field(
        default=240.0,
        metadata={
            "help": "audio per codec batch (longest clip x count); peak memory on CPU ~ 1.1 GB + 26 MB per "
            "second of it (docs/PERFORMANCE.md)"
        },
    )
    max_seconds: float = field(default=60.0, metadata={"help": "longer paired files are skipped, audio-only chunked"})
    num_workers: int = 1
    rank: int | None = field(default=None, metadata={"help": "this task's share (default: SLURM_ARRAY_TASK_ID or 0)"})
    world_size: int | None = field(
        default=None, metadata={"help": "number of tasks (default: SLURM_ARRAY_TASK_COUNT or 1)"}
    )
    progress: bool = field(default=True, metadata={"help": "progress bar (--no-progress: none)"})
    doc_key: str = field(
        default="doc",
        metadata={
            "help": "record field whose consecutive equal values form one document (WebDataset tars of "
            "Emilia-style ids default to the id's source prefix)"
        },
    )
    pretokenized: bool = field(
        default=False,
        metadata={
            "help": "each record's 'text' is a whole SODA document with audio as private-use characters "
            "(the released *-mm-pretrain sets): tokenized as is, checked against the layout, no codec"
        },
    )

    def validate(self) -> None:
        if self.rank is None:  # a SLURM job array task takes its slice from the environment
            self.rank = int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
        if self.world_size is None:
            self.world_size = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
        self.formats = parse_formats(self.formats)
        if self.seq_len < 8:
            raise ValueError(f"seq_len must be >= 8, got {self.seq_len}")
        if not 1 <= self.num_codebooks <= 8:
            raise ValueError(f"num_codebooks must be 1..8 (SODA keeps Mimi's first 8), got {self.num_codebooks}")
        if self.files_per_shard < 1 or self.num_workers < 0 or self.batch_seconds <= 0 or self.max_seconds <= 0:
            raise ValueError("files_per_shard >= 1, num_workers >= 0, batch_seconds > 0, max_seconds > 0 expected")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {self.rank} world_size {self.world_size}")

    @property
    def paired_needed(self) -> bool:
        """Audio without a transcript is skipped when every requested format pairs audio with text."""
        return any(f in PAIRED_FORMATS + PAIRED_TASK_FORMATS for f in self.formats)

    @property
    def with_loss_mask(self) -> bool:
        """Task formats train on their targets only, so their samples carry a loss-mask row."""
        return any(f in TASK_FORMATS for f in self.formats)

    def output_identity(self, layout: SodaLayout, tokenizer_fp: str, codec_id: dict) -> dict:
        """Everything that changes the shards' bytes; a re-run into the same directory must match it."""
        return {
            "inputs": [str(Path(p).resolve()) for p in self.inputs],
            "seq_len": self.seq_len,
            "formats": self.formats,
            "num_codebooks": self.num_codebooks,
            "files_per_shard": self.files_per_shard,
            "max_seconds": self.max_seconds,
            # newer settings only where not the default: sets prepared before them still resume
            **({"pretokenized": True} if self.pretokenized else {}),
            **({"doc_key": self.doc_key} if self.doc_key != "doc" else {}),
            "layout": layout.to_dict(),
            "tokenizer_fingerprint": tokenizer_fp,
            "codec": {k: v for k, v in codec_id.items() if k != "name"},
        }


# --- one unit, in a worker ---------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, codec: str, device: str, num_codebooks: int, threads: int) -> None:
    import torch

    from megatron_soda.tokenization.codec import MimiCodec
    from megatron_soda.tokenization.text_tokenizer import layout_of, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = load_tokenizer(tokenizer_dir)
    codec_model = MimiCodec.load(codec, device, num_codebooks) if codec else None  # None: pre-tokenized input
    _WORKER.update(tokenizer=tok, layout=layout_of(tok), codec=codec_model)


def _batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Group clip indices by length so that (longest clip x batch size) stays within budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur = [], []
    for i in order:
        if cur and lengths[i] * (len(cur) + 1) > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _tokenize(tokenizer, texts: list[str], documents: bool = False) -> list[np.ndarray]:
    """Token ids of each text. Transcripts: split_special_tokens, so one that happens to contain
    "<|audio_start|>" or a private-use character stays text, not a delimiter or an audio code.
    `documents` (pre-tokenized SODA documents): the opposite, those are exactly what they hold."""
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=not documents)["input_ids"]
    return [np.asarray(x, dtype=np.int64) for x in ids]


def _stream_units(path: Path, cfg: PrepareConfig, skips: list[Skip]):
    """The documents of one corpus file, read record by record and cut into the groups `_units`
    makes of a manifest's documents (so the codec sees the same batches either way): what is
    encoded, tokenized and packed at a time."""
    group, pending = DocGrouper(), []
    for item in entries_of_file(path, cfg.paired_needed, cfg.pretokenized, skips, cfg.doc_key):
        group.add(item)
        if group.docs:
            pending += group.docs
            group.docs = []
            units = _units(pending, cfg.files_per_shard)
            yield from units[:-1]  # closed: the next document did not fit
            pending = units[-1]
    group.flush()
    yield from _units(pending + group.docs, cfg.files_per_shard)


def process_unit(unit: int, work: list[list[Entry]] | Path, cfg: PrepareConfig, shard_path: Path) -> dict:
    """Shard `unit` from its documents, or from a corpus file streamed a group of records at a time."""
    layout = _WORKER["layout"]
    stats: Counter = Counter()
    skips: list[Skip] = []
    fixes: Counter = Counter()
    packer = Packer(cfg.seq_len, layout, with_mask=cfg.with_loss_mask)
    samples: list[np.ndarray] = []
    for docs in _stream_units(work, cfg, skips) if isinstance(work, Path) else [work]:
        samples += _pack_docs(docs, cfg, packer, stats, skips, fixes)
    samples += packer.finish()
    record = {
        "unit": unit,
        "tokens": packer.doc_tokens,
        "pad_tokens": packer.pad_tokens,
        "stats": dict(stats),
        "fixes": dict(fixes),
        "skipped": [asdict(s) for s in skips],
    }
    return write_shard(shard_path, samples, unit, record)


def _encode_in_pieces(e: Entry, total: float, cfg: PrepareConfig, fixes: Counter) -> np.ndarray:
    """The audio ids of a long audio-only file, decoded and encoded `--batch-seconds` of
    `--max-seconds` pieces at a time: peak memory is one batch's, not the whole decoded file's (a
    10-hour file would be 3.5 GB). Each piece is resampled on its own; a tail under a second joins
    the piece before it."""
    codec, layout = _WORKER["codec"], _WORKER["layout"]
    starts = [float(t) for t in np.arange(0.0, total, cfg.max_seconds)]
    if len(starts) > 1 and total - starts[-1] < 1.0:
        starts.pop()
    bounds = [(a, b) for a, b in zip(starts, [*starts[1:], total], strict=True)]
    per_batch = max(1, int(cfg.batch_seconds // cfg.max_seconds))
    codes, fixed = [], set()
    for i in range(0, len(bounds), per_batch):
        pieces = [
            load_audio(e.audio, codec.sample_rate, data=e.audio_bytes, segment=b) for b in bounds[i : i + per_batch]
        ]
        fixed.update(f for p in pieces for f in p.fixes)
        codes += codec.encode([p.samples for p in pieces])
    fixes.update(fixed)
    return layout.codes_to_ids(np.concatenate(codes))


def _pack_docs(
    docs: list[list[Entry]], cfg: PrepareConfig, packer: Packer, stats: Counter, skips: list[Skip], fixes: Counter
) -> list[np.ndarray]:
    """Read, encode and tokenize `docs` and pack them; returns the finished samples."""
    tok, layout, codec = _WORKER["tokenizer"], _WORKER["layout"], _WORKER["codec"]
    sample_rate = codec.sample_rate if codec is not None else 24_000
    max_len = int(cfg.max_seconds * sample_rate)

    # 1. read every file; an utterance whose file is bad is dropped, its document goes on
    clips: list[np.ndarray] = []
    owners: list[tuple[int, int]] = []  # (doc, utterance) of each clip
    texts: dict[tuple[int, int], str] = {}
    kept: list[list[Entry]] = []
    streamed: dict[tuple[int, int], np.ndarray] = {}  # long audio-only files, encoded piece by piece
    for d, doc in enumerate(docs):
        good = []
        for e in doc:
            u = (d, len(good))
            if e.audio is not None and codec is None:
                raise InputError(f"{e.id}: audio input in a --pretokenized run (which loads no codec)")
            total = audio_seconds(e.audio, e.audio_bytes) if e.kind == "audio" and e.segment is None else None
            if total is not None and total > cfg.max_seconds:
                try:
                    streamed[u] = _encode_in_pieces(e, total, cfg, fixes)
                except AudioSkip as s:
                    skips.append(Skip(f"{e.id} ({e.audio})", s.reason, s.detail))
                    continue
                fixes["chunked"] += 1
                stats["audio_seconds_x1000"] += int(round(total * 1000))
            elif e.audio is not None:
                try:
                    audio = load_audio(
                        e.audio,
                        sample_rate,
                        max_seconds=cfg.max_seconds if e.kind == "paired" else None,
                        data=e.audio_bytes,
                        segment=e.segment,
                    )
                except AudioSkip as s:
                    skips.append(Skip(f"{e.id} ({e.audio})", s.reason, s.detail))
                    continue
                fixes.update(audio.fixes)
                stats["audio_seconds_x1000"] += int(round(audio.seconds * 1000))
                pieces = [audio.samples[i : i + max_len] for i in range(0, len(audio.samples), max_len)]
                if len(pieces) > 1:  # only audio-only files get here: no transcript to misalign
                    fixes["chunked"] += 1
                for piece in pieces:
                    clips.append(piece)
                    owners.append(u)
            if e.text is not None:
                texts[u] = e.text
            elif e.text_path is not None:
                try:
                    text = Path(e.text_path).read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as err:
                    skips.append(Skip(e.id, "unreadable_text", str(err).splitlines()[0]))
                    continue
                if not text:
                    skips.append(Skip(e.id, "empty_text"))
                    continue
                texts[u] = text
            good.append(e)
            stats["files"] += 1
        kept.append(good)

    # 2. encode audio in length-sorted batches; join the pieces of chunked files back in order
    codes: dict[tuple[int, int], list[np.ndarray]] = {}
    budget = int(cfg.batch_seconds * sample_rate)
    for batch in _batches([len(c) for c in clips], budget):
        for i, c in zip(batch, codec.encode([clips[i] for i in batch]), strict=True):
            codes.setdefault(owners[i], []).append((i, c))
    audio_ids = {u: layout.codes_to_ids(np.concatenate([c for _, c in sorted(parts)])) for u, parts in codes.items()}
    audio_ids.update(streamed)

    # 3. tokenize: per-utterance transcripts for paired documents, whole joined text for text-only
    #    copies (joined before tokenizing, so words do not fuse at the seams)
    want_text_only = "text_only" in cfg.formats
    utt_keys = [u for u in texts if kept[u[0]][0].kind == "paired"]
    text_ids = dict(zip(utt_keys, _tokenize(tok, [texts[u] for u in utt_keys]), strict=True))
    joined_docs = [
        d
        for d, doc in enumerate(kept)
        if doc and (doc[0].kind == "text" or (want_text_only and doc[0].kind == "paired"))
    ]
    joined_texts = [" ".join(texts[(d, i)] for i in range(len(kept[d]))) for d in joined_docs]
    joined_ids = dict(zip(joined_docs, _tokenize(tok, joined_texts), strict=True))
    whole = [d for d, doc in enumerate(kept) if doc and doc[0].kind == "document"]
    whole_ids = dict(zip(whole, _tokenize(tok, [texts[(d, 0)] for d in whole], documents=True), strict=True))

    # 4. documents in every applicable format -> packed samples (+ loss masks for task formats)
    samples: list[np.ndarray] = []
    for d, doc in enumerate(kept):
        if not doc:
            continue
        kind = doc[0].kind
        if kind == "document":  # pre-tokenized: as it is, once checked
            ids = whole_ids[d]
            problem = layout.document_problem(ids)
            if problem:
                skips.append(Skip(doc[0].id, "bad_document", problem))
                continue
            stats["docs_document"] += 1
            stats["audio_tokens"] += int(layout.is_audio(ids).sum())
            stats["text_tokens"] += int(layout.is_text(ids).sum())
            samples += packer.add(ids)
            continue
        if doc[0].task == "s2st":
            fmts = [f for f in cfg.formats if f in S2ST_FORMATS]
        elif kind == "paired":
            fmts = [f for f in cfg.formats if f not in S2ST_FORMATS]
        else:
            fmts = ["audio_only" if kind == "audio" else "text_only"]
        if not fmts or (doc[0].task == "s2st" and len(doc) != 2):
            why = "no requested format applies" if not fmts else "a file of the pair was unusable"
            skips.append(
                Skip(doc[0].doc or doc[0].id, "no_applicable_format", f"{why} (--formats {','.join(cfg.formats)})")
            )
            continue
        for fmt in fmts:
            if fmt == "text_only":
                utts = [Utterance(joined_ids[d], None)]
            else:
                utts = [Utterance(text_ids.get((d, i)), audio_ids.get((d, i))) for i in range(len(doc))]
            if fmt in TASK_FORMATS:
                built = build_task_documents(utts, fmt, layout)
            else:
                built = [(build_document(utts, fmt, layout), None)]
            for tokens, mask in built:
                stats[f"docs_{fmt}"] += 1
                stats["audio_tokens"] += int(layout.is_audio(tokens).sum())
                stats["text_tokens"] += int(layout.is_text(tokens).sum())
                if mask is not None:
                    stats["target_tokens"] += int(mask.sum())
                samples += packer.add(tokens, mask)
    return samples


# --- the run ------------------------------------------------------------------------------------


def _units(docs: list[list[Entry]], files_per_shard: int) -> list[list[list[Entry]]]:
    units, cur, n = [], [], 0
    for doc in docs:
        if cur and n + len(doc) > files_per_shard:
            units.append(cur)
            cur, n = [], 0
        cur.append(doc)
        n += len(doc)
    if cur:
        units.append(cur)
    return units


def _size(unit: list[list[Entry]] | Path) -> int:
    """Progress-bar weight of a unit: its files, or 1 for a corpus file."""
    return 1 if isinstance(unit, Path) else sum(len(d) for d in unit)


def _setup_tokenizer(cfg: PrepareConfig, out: Path):
    """Extend (or check) the tokenizer and keep a copy beside the shards: they are self-describing."""
    from megatron_soda.tokenization.text_tokenizer import layout_of, load_soda_tokenizer, load_tokenizer, save_tokenizer

    tok_dir = out / "tokenizer"
    tok, layout = load_soda_tokenizer(cfg.tokenizer)
    if not (tok_dir / "tokenizer.json").is_file():
        tmp = out / f".tokenizer.tmp-{os.getpid()}"
        save_tokenizer(tok, tmp)
        try:
            os.replace(tmp, tok_dir)
        except OSError:  # another rank won the race; its copy is identical or the identity check says so
            shutil.rmtree(tmp, ignore_errors=True)
    saved = load_tokenizer(str(tok_dir))
    layout.check_same(layout_of(saved), f"{tok_dir} (saved by an earlier run)")
    return tok, layout, tok_dir


def summarize(records: list[dict], pre_skips: list[Skip], seconds: float) -> dict:
    stats, fixes, reasons = Counter(), Counter(), Counter(s.reason for s in pre_skips)
    for r in records:
        stats.update(r["stats"])
        fixes.update(r["fixes"])
        reasons.update(s["reason"] for s in r["skipped"])
    audio_h = stats.pop("audio_seconds_x1000", 0) / 1000 / 3600
    return {
        "files": stats.pop("files", 0),
        "audio_hours": round(audio_h, 4),
        "tokens": sum(r["tokens"] for r in records),
        "pad_tokens": sum(r["pad_tokens"] for r in records),
        "samples": sum(r["samples"] for r in records),
        "shards": len(records),
        "skipped": dict(sorted(reasons.items())),
        "fixed": dict(sorted(fixes.items())),
        "counts": dict(sorted(stats.items())),
        "seconds": round(seconds, 1),
    }


def print_summary(summary: dict, out: Path) -> None:
    s = summary
    print(
        f"prepared {out}: {s['shards']} shards, {s['samples']} samples, {s['tokens']:,} tokens "
        f"({s['counts'].get('text_tokens', 0):,} text, {s['counts'].get('audio_tokens', 0):,} audio, "
        f"{s['pad_tokens']:,} padding)"
    )
    print(f"  files used: {s['files']}, audio: {s['audio_hours']:.3f} h, took {s['seconds']} s")
    docs = {k[5:]: v for k, v in s["counts"].items() if k.startswith("docs_")}
    print(f"  documents: {', '.join(f'{k} {v}' for k, v in docs.items()) or 'none'}")
    skipped = s["skipped"]
    print(
        f"  skipped: {sum(skipped.values())}"
        + (f" ({', '.join(f'{k} {v}' for k, v in skipped.items())})" if skipped else "")
    )
    if s["fixed"]:
        print(f"  fixed: {', '.join(f'{k} {v}' for k, v in s['fixed'].items())}")


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Run (or resume) this rank's share; returns the summary (of all shards once the index exists)."""
    from tqdm import tqdm

    from megatron_soda.tokenization.codec import MimiCodec
    from megatron_soda.tokenization.text_tokenizer import tokenizer_fingerprint

    cfg.validate()
    inputs = discover(cfg.inputs, cfg.paired_needed, cfg.pretokenized, cfg.doc_key)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    tok, layout, tok_dir = _setup_tokenizer(cfg, out)
    if cfg.pretokenized:  # the audio was encoded by whoever released the documents: no codec here
        codec = None
        codec_id = {"name": cfg.codec, "codebook_size": layout.codebook_size, "num_codebooks": layout.codebooks}
    else:
        codec = MimiCodec.load(cfg.codec, cfg.device, cfg.num_codebooks)
        if codec.codebook_size != layout.codebook_size:
            raise InputError(
                f"codec {cfg.codec} has {codec.codebook_size} codes per codebook, layout expects {layout.codebook_size}"
            )
        codec_id = codec.identity()
    identity = cfg.output_identity(layout, tokenizer_fingerprint(tok), codec_id)
    id_path = out / "prepare_identity.json"
    if id_path.is_file():
        old = json.loads(id_path.read_text())
        changed = [k for k in identity if old.get(k) != identity[k]]
        if changed:
            raise InputError(
                f"{out} was prepared with other settings ({', '.join(changed)} differ): use a new --output"
            )
    else:
        atomic_write_text(id_path, json.dumps(identity, indent=1))

    units: list = [*_units(inputs.docs, cfg.files_per_shard), *inputs.streams]  # a corpus file is a unit
    shard_paths = [out / f"shard-{u:06d}.tar" for u in range(len(units))]
    mine = [u for u in range(len(units)) if u % cfg.world_size == cfg.rank and read_sidecar(shard_paths[u]) is None]
    done_before = sum(1 for u in range(len(units)) if u % cfg.world_size == cfg.rank) - len(mine)
    failures: list[str] = []
    t0 = time.time()
    bar = tqdm(
        total=sum(_size(units[u]) for u in mine),
        unit="file",
        disable=not progress,
        desc=f"prepare rank {cfg.rank}/{cfg.world_size}",
        file=sys.stderr,
    )
    if done_before:
        bar.write(f"resuming: {done_before} of this rank's shards already finished")
    audio_s = tokens = 0

    def _account(u: int, record: dict) -> None:
        nonlocal audio_s, tokens
        audio_s += record["stats"].get("audio_seconds_x1000", 0) / 1000
        tokens += record["tokens"]
        el = max(time.time() - t0, 1e-9)
        bar.update(_size(units[u]))
        bar.set_postfix_str(
            f"{audio_s / 3600 / el:.4f} audio-h/s ({audio_s / el:.1f}x real time), {tokens / el:,.0f} tok/s"
        )

    workers = min(cfg.num_workers, len(mine))
    if workers <= 1:
        _WORKER.update(tokenizer=tok, layout=layout, codec=codec)
        for u in mine:
            try:
                _account(u, process_unit(u, units[u], cfg, shard_paths[u]))
            except Exception as e:  # one unit's unexpected failure must not lose the others
                failures.append(f"shard {u}: {type(e).__name__}: {e}")
    else:
        import multiprocessing as mp

        del codec  # each worker loads its own copy
        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(
            workers,
            mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(str(tok_dir), "" if cfg.pretokenized else cfg.codec, cfg.device, cfg.num_codebooks, threads),
        ) as pool:
            futures = {pool.submit(process_unit, u, units[u], cfg, shard_paths[u]): u for u in mine}
            for fut in as_completed(futures):
                u = futures[fut]
                try:
                    _account(u, fut.result())
                except Exception as e:
                    failures.append(f"shard {u}: {type(e).__name__}: {e}")
    bar.close()
    if failures:
        raise UserError(f"{len(failures)} shard(s) failed (re-run to retry them): " + "; ".join(failures[:5]))

    records = [read_sidecar(p) for p in shard_paths]
    finished = [r for r in records if r is not None]
    summary = summarize(finished, inputs.skips, time.time() - t0)
    if len(finished) == len(records):
        skipped = [asdict(s) for s in inputs.skips] + [s for r in finished for s in r["skipped"]]
        atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
        shards = [index_entry(r) for r in finished]
        meta = {
            "tokenizer": {"name": cfg.tokenizer, "fingerprint": identity["tokenizer_fingerprint"], "path": "tokenizer"},
            "codec": {"name": cfg.codec, **identity["codec"]},
            "num_codebooks": cfg.num_codebooks,
            "formats": cfg.formats,
            "loss_mask": cfg.with_loss_mask,
            "summary": summary,
        }
        write_index(out, layout, cfg.seq_len, shards, meta)
    else:
        summary["pending_shards"] = len(records) - len(finished)
    return summary


def prepare_job(cfg: PrepareConfig) -> None:
    """`soda prepare`: tokenize audio, transcripts and text into packed WebDataset shards."""
    summary = prepare(cfg, progress=cfg.progress)
    if not summary.get("pending_shards") and summary["samples"] == 0:
        skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
        raise UserError(
            f"{cfg.output}: no samples were written (inputs skipped: {skipped}; see {cfg.output}/skipped.jsonl)"
        )
    if summary.get("pending_shards"):
        print(
            f"rank {cfg.rank} done; {summary['pending_shards']} shard(s) of other ranks still missing: "
            "the last rank to finish writes index.json (or re-run this command)"
        )
    else:
        print_summary(summary, Path(cfg.output))
