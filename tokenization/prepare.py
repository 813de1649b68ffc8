"""`soda prepare`: audio + transcripts -> packed WebDataset token shards, resumably and in parallel.

Work is cut into units of whole documents; unit u becomes shard u. Units are dealt round-robin to
SLURM array tasks / ranks (`--rank/--world-size`) and, within a rank, to `--num-workers`
processes. A unit whose shard and sidecar exist is skipped, so a re-run (after preemption, or
with more ranks) only does what is missing. Whichever rank sees every sidecar writes the index.
One process runs a slice at a time (a lock, `.lock-rank{r}-of-{n}` in the output); SIGTERM, a
full disk or a killed run leave finished shards and no partial ones (removed on the way out, or
by the next run of the slice). The codec loads on the first audio to encode: text needs none.

`--output s3://...` (or gs://): shards are written to a local staging directory and each is uploaded
as it finishes (shard, checksums, then its sidecar, which marks it finished there too); the index is
uploaded last, so a reader never sees a half-written set, and a re-run does only the shards the
store lacks (`StoreOutput`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_soda.config import ConfigError, UserError, no_space_error
from megatron_soda.parallel.processes import pid_alive
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
from megatron_soda.tokenization.inputs import INPUT_HELP, DocGrouper, Entry, InputError, Skip, discover, entries_of_file
from megatron_soda.tokenization.shard_format import (
    atomic_write_text,
    checksums_path,
    index_entry,
    read_sidecar,
    sidecar_path,
    write_index,
)
from megatron_soda.tokenization.shards import Packer, write_shard
from megatron_soda.tokenization.vocab import SodaLayout

PAIRED_FORMATS = ("text_first", "audio_first")  # the pretraining default: both orders, as the paper


@dataclass
class PrepareConfig:
    inputs: list[str] = field(
        metadata={
            "flag": "--input",
            "action": "append",
            "help": INPUT_HELP,
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
    staging: str | None = field(
        default=None,
        metadata={
            "help": "with --output s3:// or gs://: where shards are written before their upload "
            "(default: a temporary directory, removed after)"
        },
    )
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
            raise ConfigError(f"seq_len must be >= 8, got {self.seq_len}")
        if not 1 <= self.num_codebooks <= 8:
            raise ConfigError(f"num_codebooks must be 1..8 (SODA keeps Mimi's first 8), got {self.num_codebooks}")
        if self.files_per_shard < 1 or self.num_workers < 0 or self.batch_seconds <= 0 or self.max_seconds <= 0:
            raise ConfigError("files_per_shard >= 1, num_workers >= 0, batch_seconds > 0, max_seconds > 0 expected")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank {self.rank} world_size {self.world_size}")

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

# What a unit is made with, in this process: tokenizer, layout, and the codec, loaded on the first
# audio that needs encoding (`_codec`), so text-only inputs never load one (nor reach the Hub for it);
# `codec_spec` (name, device, num_codebooks) says which, None for pre-tokenized input (no codec).
_WORKER: dict = {}


def load_codec(name: str, device: str, num_codebooks: int, layout: SodaLayout):
    """The codec, checked against the token layout."""
    from megatron_soda.tokenization.codec import MimiCodec

    codec = MimiCodec.load(name, device, num_codebooks)
    if codec.codebook_size != layout.codebook_size:
        raise InputError(
            f"codec {name} has {codec.codebook_size} codes per codebook, layout expects {layout.codebook_size}"
        )
    return codec


def _codec():
    """This process's codec, loaded when first needed; the unit being made records its identity."""
    if _WORKER.get("codec") is None:
        if _WORKER.get("codec_spec") is None:
            raise InputError("audio input in a --pretokenized run (which loads no codec)")
        _WORKER["codec"] = load_codec(*_WORKER["codec_spec"], _WORKER["layout"])
    if _WORKER.get("codec_identity") is None:
        _WORKER["codec_identity"] = _WORKER["codec"].identity()
    _WORKER["codec_used"] = True
    return _WORKER["codec"]


def _init_worker(
    tokenizer_dir: str, codec_spec: tuple[str, str, int] | None, threads: int, parent: int | None = None
) -> None:
    import torch

    from megatron_soda.parallel.processes import die_with_parent
    from megatron_soda.tokenization.text_tokenizer import layout_of, load_tokenizer

    if parent is not None:  # a worker never outlives `soda prepare` (kill -9, a lost parent)
        die_with_parent(parent)
    if threads:
        torch.set_num_threads(threads)
    tok = load_tokenizer(tokenizer_dir)
    _WORKER.update(tokenizer=tok, layout=layout_of(tok), codec=None, codec_spec=codec_spec)


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
    """Shard `unit` from its documents, or from a corpus file streamed a group of records at a time.
    Whatever stops it (a full disk, a signal, a bug) removes what it had written so far."""
    try:
        return _process_unit(unit, work, cfg, shard_path)
    except BaseException as e:
        remove_partials(shard_path.parent, [unit], {os.getpid()})
        if read_sidecar(shard_path) is None:  # a shard renamed into place whose sidecar never came
            for p in (shard_path, checksums_path(shard_path), sidecar_path(shard_path)):
                p.unlink(missing_ok=True)
        named = _naming(e, shard_path)
        if named is e:
            raise
        raise named from e


def _naming(error: BaseException, path: Path) -> BaseException:
    """A full disk's error as the exception itself (a worker's comes back pickled, without the
    chain it was found in), naming the file being written when the OS error does not (a buffered
    write's failure names none), for report_error's one line."""
    full = no_space_error(error)
    if full is None or (full is error and full.filename):
        return error
    return OSError(full.errno, full.strerror, full.filename or str(path))


def _process_unit(unit: int, work: list[list[Entry]] | Path, cfg: PrepareConfig, shard_path: Path) -> dict:
    layout = _WORKER["layout"]
    _WORKER["codec_used"] = False
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
    if _WORKER.get("codec_used"):  # what the index names as the set's codec (every shard's must agree)
        record["codec"] = _WORKER["codec_identity"]
    return write_shard(shard_path, samples, unit, record)


def _encode_in_pieces(e: Entry, total: float, cfg: PrepareConfig, fixes: Counter) -> np.ndarray:
    """The audio ids of a long audio-only file, decoded and encoded `--batch-seconds` of
    `--max-seconds` pieces at a time (MimiCodec.encode_file): peak memory is one batch's, not the
    whole decoded file's (a 10-hour file would be 3.5 GB)."""
    codes, fixed = _codec().encode_file(e.audio, total, cfg.max_seconds, cfg.batch_seconds, data=e.audio_bytes)
    fixes.update(fixed)
    return _WORKER["layout"].codes_to_ids(codes)


def _pack_docs(
    docs: list[list[Entry]], cfg: PrepareConfig, packer: Packer, stats: Counter, skips: list[Skip], fixes: Counter
) -> list[np.ndarray]:
    """Read, encode and tokenize `docs` and pack them; returns the finished samples."""
    tok, layout = _WORKER["tokenizer"], _WORKER["layout"]

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
            if e.audio is not None:
                try:
                    codec = _codec()  # the first audio loads it
                except InputError as err:
                    raise InputError(f"{e.id}: {err}") from None
                sample_rate = codec.sample_rate
                max_len = int(cfg.max_seconds * sample_rate)
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
    budget = int(cfg.batch_seconds * _codec().sample_rate) if clips else 0
    for batch in _batches([len(c) for c in clips], budget):
        for i, c in zip(batch, _codec().encode([clips[i] for i in batch]), strict=True):
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


def print_summary(summary: dict, out: Path | str) -> None:
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


class Stopped(UserError):
    """SIGTERM ended the run (finished shards are kept, a re-run resumes)."""


def _on_sigterm(signum, frame) -> None:
    raise Stopped("stopped by SIGTERM: finished shards are kept, partial ones removed; re-run the command to resume")


PARTIAL_SHARD = re.compile(r"\.shard-(\d+)\..*\.tmp-(\d+)")  # write_shard's temporary files, by unit and pid


def remove_partials(out: Path, units, pids: set[int] | None = None, mine: bool = True) -> list[Path]:
    """Remove the temporary files of the shards of `units` that processes left behind: those of
    `pids`, or (None) of every pid that no longer runs here, and this process's own with `mine`.
    Only this slice's units: another slice of the job array may be writing its own on another node."""
    units, removed = set(units), []
    for p in out.glob(".shard-*.tmp-*"):
        m = PARTIAL_SHARD.fullmatch(p.name)
        if m and int(m[1]) in units:
            pid = int(m[2])
            if pids is not None:
                drop = pid in pids
            else:
                drop = mine if pid == os.getpid() else not pid_alive(pid)
            if drop:
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Cancel the units not started and end the workers now, whatever they are doing (their partial
    shards are removed after): `shutdown` alone would wait for every running unit to finish."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.kill()
    pool.shutdown(wait=True, cancel_futures=True)  # returns at once: its manager sees the workers gone


def _fatal(error: BaseException) -> bool:
    """A unit's failure that every other unit would meet too: stop the run instead of counting it."""
    from megatron_soda.tokenization.codec import CodecLoadError
    from megatron_soda.tokenization.object_store import ObjectStoreError  # an upload: every shard needs one

    return isinstance(error, Stopped | CodecLoadError | ObjectStoreError) or no_space_error(error) is not None


def _same_codec(old: dict | None, new: dict) -> bool:
    """Codec identities agree on what both know: a text-only run records no weights (it loads none)."""
    return isinstance(old, dict) and all(old[k] == v for k, v in new.items() if k in old)


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Run (or resume) this rank's share; returns the summary (of all shards once the index exists)."""
    import signal
    import threading

    from megatron_soda.parallel.locks import hold

    cfg.validate()
    inputs = discover(cfg.inputs, cfg.paired_needed, cfg.pretokenized, cfg.doc_key)
    store = StoreOutput(cfg) if "://" in cfg.output else None  # --output on object storage: staged here
    out = store.staging if store else Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    # one process per slice: two would write the same shards (other slices run concurrently)
    lock = hold(out / f".lock-rank{cfg.rank}-of-{cfg.world_size}", "soda prepare")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        if store:
            store.resume()
        return _prepare(cfg, inputs, out, progress, store)
    finally:
        if main_thread:  # None: a handler not set from Python (the default, for all we can tell)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        lock.close()
        if store:
            store.close()


def _prepare(cfg: PrepareConfig, inputs, out: Path, progress: bool, store: StoreOutput | None = None) -> dict:
    from tqdm import tqdm

    from megatron_soda.tokenization.text_tokenizer import tokenizer_fingerprint

    tok, layout, tok_dir = _setup_tokenizer(cfg, out)
    codec = None
    codec_spec = None if cfg.pretokenized else (cfg.codec, cfg.device, cfg.num_codebooks)
    if cfg.pretokenized:  # the audio was encoded by whoever released the documents: no codec here
        codec_id = {"name": cfg.codec, "codebook_size": layout.codebook_size, "num_codebooks": layout.codebooks}
    elif any(e.audio is not None for doc in inputs.docs for e in doc):  # needed anyway: its identity now
        codec = load_codec(*codec_spec, layout)
        codec_id = codec.identity()
    else:  # text, or corpus files read later: loaded on the first audio, if any (the shards record it)
        codec_id = {"name": cfg.codec, "codebook_size": layout.codebook_size, "num_codebooks": cfg.num_codebooks}
    identity = cfg.output_identity(layout, tokenizer_fingerprint(tok), codec_id)
    id_path = out / "prepare_identity.json"
    if id_path.is_file():
        old = json.loads(id_path.read_text())
        changed = [
            k
            for k in identity
            if not (_same_codec(old.get(k), identity[k]) if k == "codec" else old.get(k) == identity[k])
        ]
        if changed:
            raise InputError(
                f"{out} was prepared with other settings ({', '.join(changed)} differ): use a new --output"
            )
    else:
        atomic_write_text(id_path, json.dumps(identity, indent=1))

    units: list = [*_units(inputs.docs, cfg.files_per_shard), *inputs.streams]  # a corpus file is a unit
    shard_paths = [out / f"shard-{u:06d}.tar" for u in range(len(units))]
    slice_units = [u for u in range(len(units)) if u % cfg.world_size == cfg.rank]
    remove_partials(out, slice_units, mine=False)  # of an earlier run of this slice that was killed
    is_done = store.finished if store else read_sidecar  # on object storage: the store's shards count
    mine = [u for u in slice_units if is_done(shard_paths[u]) is None]
    done_before = len(slice_units) - len(mine)
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
        if store:
            store.push_shard(shard_paths[u])
        audio_s += record["stats"].get("audio_seconds_x1000", 0) / 1000
        tokens += record["tokens"]
        el = max(time.time() - t0, 1e-9)
        bar.update(_size(units[u]))
        bar.set_postfix_str(
            f"{audio_s / 3600 / el:.4f} audio-h/s ({audio_s / el:.1f}x real time), {tokens / el:,.0f} tok/s"
        )

    def _failed(u: int, e: Exception) -> None:
        if _fatal(e):
            raise e
        failures.append(f"shard {u}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")

    workers = min(cfg.num_workers, len(mine))
    try:
        if workers <= 1:
            _WORKER.update(tokenizer=tok, layout=layout, codec=codec, codec_spec=codec_spec)
            _WORKER["codec_identity"] = codec_id if codec is not None else None
            for u in mine:
                try:
                    _account(u, process_unit(u, units[u], cfg, shard_paths[u]))
                except Exception as e:  # one unit's unexpected failure must not lose the others
                    _failed(u, e)
        else:
            import multiprocessing as mp

            del codec  # each worker loads its own copy, when it meets audio
            threads = max(1, (os.cpu_count() or 1) // workers)
            pool = ProcessPoolExecutor(
                workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(str(tok_dir), codec_spec, threads, os.getpid()),
            )
            try:
                futures = {pool.submit(process_unit, u, units[u], cfg, shard_paths[u]): u for u in mine}
                for fut in as_completed(futures):
                    u = futures[fut]
                    try:
                        _account(u, fut.result())
                    except Exception as e:
                        _failed(u, e)
            except BaseException:
                _stop_pool(pool)
                raise
            pool.shutdown()
    except BaseException:
        remove_partials(out, slice_units)  # the workers' and this process's (all ended by now)
        raise
    finally:
        bar.close()
    if failures:
        raise UserError(f"{len(failures)} shard(s) failed (re-run to retry them): " + "; ".join(failures[:5]))

    if store:
        store.scan()  # what the other slices finished meanwhile: the last one writes the index
    records = [is_done(p) for p in shard_paths]
    finished = [r for r in records if r is not None]
    summary = summarize(finished, inputs.skips, time.time() - t0)
    if len(finished) == len(records):
        skipped = [asdict(s) for s in inputs.skips] + [s for r in finished for s in r["skipped"]]
        meta = {
            "tokenizer": {"name": cfg.tokenizer, "fingerprint": identity["tokenizer_fingerprint"], "path": "tokenizer"},
            "codec": {"name": cfg.codec, **_set_codec(out, identity["codec"], finished)},
            "num_codebooks": cfg.num_codebooks,
            "formats": cfg.formats,
            "loss_mask": cfg.with_loss_mask,
            "summary": summary,
        }
        try:
            atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
            write_index(out, layout, cfg.seq_len, [index_entry(r) for r in finished], meta)
            if store:
                store.push_index()
        except BaseException as e:  # a full disk: no half-written index (nor its temporary file) stays
            for name in ("index.json", "skipped.jsonl"):
                (out / f".{name}.tmp-{os.getpid()}").unlink(missing_ok=True)
            named = _naming(e, out / "index.json")
            if named is e:
                raise
            raise named from e
    else:
        summary["pending_shards"] = len(records) - len(finished)
    return summary


def _set_codec(out: Path, known: dict, records: list[dict]) -> dict:
    """The codec identity of the whole set: the one every shard that encoded audio recorded (a
    lazily loaded codec is only known from them), else what the run knew before any audio."""

    def nameless(ident: dict) -> str:  # a codec is its config and weights, not the path it came from
        return json.dumps({k: v for k, v in ident.items() if k != "name"}, sort_keys=True)

    found = {nameless(r["codec"]) for r in records if "codec" in r}
    if "weights_sha" in known:
        found.add(nameless(known))
    if len(found) > 1:
        raise InputError(
            f"{out}: its shards were encoded with different codecs (re-runs with another --codec?): "
            "prepare into a new --output"
        )
    return json.loads(found.pop()) if found else known


class StoreOutput:
    """`--output` on object storage: the run writes into a local staging directory, and each
    finished shard goes up with its checksums and then its sidecar (a shard whose sidecar the store
    holds, with the size it records, is finished there: a re-run skips it); `index.json` goes last,
    after `skipped.jsonl`, the tokenizer and the run's identity. What is uploaded leaves the staging
    directory, so it holds at most the shards in progress. No lock spans machines: run one
    `soda prepare` per slice of the output, as with a shared file system."""

    def __init__(self, cfg: PrepareConfig) -> None:
        import tempfile

        from megatron_soda.tokenization import object_store

        self.store = object_store
        self.url = cfg.output.rstrip("/")
        object_store.check_url(self.url, write=True)
        self.temporary = cfg.staging is None
        self.staging = Path(cfg.staging) if cfg.staging else Path(tempfile.mkdtemp(prefix="soda-prepare-"))
        self.done: dict[str, dict] = {}  # shard file -> sidecar record, of the shards the store holds whole
        self.have: dict[str, int] = {}  # the tokenizer's files and the identity the store holds, by size
        self._meta_pushed = False

    def resume(self) -> None:
        """What the store holds already: finished shards, the identity and tokenizer of the run that
        wrote them (checked against this one's as a local re-run checks its directory's), and
        shards an earlier run finished here but had not uploaded."""
        store, objects = self.store, self.scan()
        if "prepare_identity.json" in objects:
            (self.staging / "prepare_identity.json").write_bytes(store.read_bytes(objects["prepare_identity.json"].url))
        tokenizer = store.join(self.url, "tokenizer")
        self.have = {f"tokenizer/{n}": i.size for n, i in store.list_dir(tokenizer).items()}
        self.have |= {n: i.size for n, i in objects.items() if n == "prepare_identity.json"}
        if not (self.staging / "tokenizer").is_dir() and self.have:
            store.download_dir(tokenizer, self.staging / "tokenizer")
        (self.staging / "index.json").unlink(missing_ok=True)  # an earlier run's: never uploaded as this one's
        for side in sorted(self.staging.glob("shard-*.json")):
            shard = side.with_suffix(".tar")
            if shard.name not in self.done and read_sidecar(shard) is not None:
                self.push_shard(shard)

    def scan(self) -> dict:
        """The shards the store holds whole (their sidecar, the size it records, their checksums),
        seen now: other slices of the job may have finished theirs. Returns the listing."""
        store, objects = self.store, self.store.list_dir(self.url)
        sidecars = [i for n, i in objects.items() if n.startswith("shard-") and n.endswith(".json")]
        for rec in store.map_concurrently(lambda i: json.loads(store.read_bytes(i.url)), sidecars):
            shard, sums = objects.get(rec.get("file", "")), rec.get("checksums")
            if shard is not None and shard.size == rec.get("bytes") and (not sums or sums in objects):
                self.done[rec["file"]] = rec
        return objects

    def finished(self, shard: Path) -> dict | None:
        return read_sidecar(shard) or self.done.get(shard.name)

    def _push_meta(self) -> None:
        if self._meta_pushed:
            return
        files = [p for p in sorted((self.staging / "tokenizer").rglob("*")) if p.is_file()]
        files += [p for p in [self.staging / "prepare_identity.json"] if p.is_file()]
        for p in files:
            name = p.relative_to(self.staging).as_posix()
            if self.have.get(name) != p.stat().st_size:  # what the store has already stays as it is
                self.store.upload_file(p, self.store.join(self.url, name))
        self._meta_pushed = True

    def push_shard(self, shard: Path) -> None:
        """A finished shard up: the shard, its checksums, then its sidecar; then gone from staging."""
        record = read_sidecar(shard)
        self._push_meta()
        files = [shard, checksums_path(shard), sidecar_path(shard)]
        for p in files:
            if p.is_file():
                self.store.upload_file(p, self.store.join(self.url, p.name))
        self.done[shard.name] = record
        for p in files:
            p.unlink(missing_ok=True)

    def push_index(self) -> None:
        self._push_meta()
        for name in ("skipped.jsonl", "index.json"):  # the index last: with it the set exists
            self.store.upload_file(self.staging / name, self.store.join(self.url, name))

    def close(self) -> None:
        if self.temporary:
            shutil.rmtree(self.staging, ignore_errors=True)


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
        print_summary(summary, cfg.output)
