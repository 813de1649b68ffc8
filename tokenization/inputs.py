"""Finding what to tokenize: JSONL manifests, directories of audio and text, corpus files.

A manifest (`.jsonl` given as --input) is read here and its documents dealt into shards. Corpus
files (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.parquet` given as --input or found in a directory) are
only listed here: each becomes one unit of work, streamed record by record by whichever rank owns it
(`streams`), so a rank never reads what other ranks tokenize and no file is held in memory.
Input problems (a malformed line, an entry with nothing in it) are turned into counted skips like
bad audio, so one bad line never stops a million-file run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.tokenization.audio_io import AUDIO_EXTENSIONS
from megatron_soda.tokenization.readers import RECORD_SUFFIXES, is_record_file, read_records

TEXT_EXTENSIONS = (".txt",)


class InputError(ValueError):
    """The input itself (not one entry of it) is unusable."""


@dataclass
class Entry:
    id: str
    audio: str | None = None  # absolute path
    text: str | None = None  # transcript, or the whole document for text files
    text_path: str | None = None  # read lazily for text-only files
    speaker: str | None = None
    doc: str | None = None  # consecutive entries sharing a doc form one interleaved document
    task: str | None = None  # "s2st": the doc is (source, target) of one translation pair

    @property
    def kind(self) -> str:
        if self.task == "document":
            return "document"
        if self.audio is not None and self.text is not None:
            return "paired"
        return "audio" if self.audio is not None else "text"


@dataclass
class Skip:
    item: str
    reason: str
    detail: str = ""


@dataclass
class Inputs:
    docs: list[list[Entry]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    streams: list[Path] = field(default_factory=list)  # corpus files, one unit of work each


def record_entries(
    rec: dict, base: Path, where: str, default_id: str, paired_needed: bool, documents: bool
) -> list[Entry] | Entry | Skip:
    """One manifest or corpus record -> an entry, a translation pair's two entries, or why not.
    `documents`: the record's `text` is a whole SODA document (pre-tokenized release)."""
    if documents:
        text = rec.get("text")
        if not isinstance(text, str) or not text.strip():
            return Skip(where, "bad_manifest_line", "a pre-tokenized record needs a non-empty string 'text'")
        return Entry(id=str(rec.get("id", default_id)), text=text, task="document")
    if "source_audio" in rec or "target_audio" in rec:
        return _translation_pair(rec, base, where, default_id)
    audio, text = rec.get("audio"), rec.get("text")
    if text is not None and not isinstance(text, str):
        return Skip(where, "bad_manifest_line", "field 'text' must be a string")
    if audio is not None and not isinstance(audio, str):
        return Skip(where, "bad_manifest_line", "field 'audio' must be a path (string)")
    if audio is None and not (text or "").strip():
        return Skip(where, "bad_manifest_line", "needs 'audio' and/or a non-empty 'text'")
    if audio is not None and paired_needed and not (text or "").strip():
        return Skip(f"{where} ({audio})", "missing_transcript")
    return Entry(
        id=str(rec.get("id", default_id)),
        audio=str((base / audio).resolve()) if audio is not None else None,
        text=text.strip() if text and text.strip() else None,
        speaker=rec.get("speaker"),
        doc=None if rec.get("doc") is None else str(rec["doc"]),
    )


class DocGrouper:
    """Entries in record order -> documents: a run of entries with one doc id and one kind
    (paired/audio/text) is one document; a translation pair is always one of its own."""

    def __init__(self) -> None:
        self.docs: list[list[Entry]] = []
        self._current: list[Entry] = []

    def add(self, item: list[Entry] | Entry) -> None:
        if isinstance(item, list):
            self.flush()
            self.docs.append(item)
            return
        cur = self._current
        if cur and (item.doc is None or item.doc != cur[-1].doc or item.kind != cur[-1].kind):
            self.flush()
        self._current.append(item)

    def flush(self) -> None:
        if self._current:
            self.docs.append(self._current)
            self._current = []


def entries_of_file(path: Path, paired_needed: bool, documents: bool, skips: list[Skip]):
    """(record entries or None) for every record of a manifest / corpus file, bad ones in `skips`."""
    for n, rec in read_records(path):
        where = f"{path}:{n}"
        if isinstance(rec, str):
            skips.append(Skip(where, "bad_manifest_line", rec))
            continue
        item = record_entries(rec, path.parent, where, f"{path.stem}:{n}", paired_needed, documents)
        if isinstance(item, Skip):
            skips.append(item)
            continue
        yield item


def _from_manifest(path: Path, out: Inputs, paired_needed: bool, documents: bool) -> None:
    group = DocGrouper()
    for item in entries_of_file(path, paired_needed, documents, out.skips):
        group.add(item)
    group.flush()
    out.docs += group.docs


def _translation_pair(rec: dict, base: Path, where: str, default_id: str) -> list[Entry] | Skip:
    """A speech-translation record -> [source, target] entries whose texts carry the paper's
    `<language>xx</language>` prefix (CVSS-T fine-tuning format)."""
    for key in ("source_audio", "target_audio", "source_text", "target_text"):
        if not isinstance(rec.get(key), str) or not rec[key].strip():
            reason = "missing_transcript" if key.endswith("text") else "bad_manifest_line"
            return Skip(where, reason, f"translation pair needs a non-empty string '{key}'")
    rid = str(rec.get("id", default_id))
    entries = []
    for side in ("source", "target"):
        lang = rec.get(f"{side}_lang")
        text = rec[f"{side}_text"].strip()
        entries.append(
            Entry(
                id=f"{rid}:{side}",
                audio=str((base / rec[f"{side}_audio"]).resolve()),
                text=f"<language>{lang}</language>{text}" if lang else text,
                speaker=rec.get("speaker"),
                doc=rid,
                task="s2st",
            )
        )
    return entries


def _from_directory(path: Path, out: Inputs) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    streams = [p for p in files if is_record_file(p)]
    usable = [p for p in files if p.suffix.lower() in AUDIO_EXTENSIONS + TEXT_EXTENSIONS]
    if not usable and not streams:
        raise InputError(
            f"{path}: no audio ({', '.join(AUDIO_EXTENSIONS)}), text (.txt) or corpus "
            f"({', '.join(RECORD_SUFFIXES)}) files found"
        )
    out.streams += [p.resolve() for p in streams]
    for p in usable:
        rel = str(p.relative_to(path))
        if p.suffix.lower() in TEXT_EXTENSIONS:
            out.docs.append([Entry(id=rel, text_path=str(p.resolve()))])
        else:
            out.docs.append([Entry(id=rel, audio=str(p.resolve()))])


def discover(paths: list[str], paired_needed: bool, documents: bool = False) -> Inputs:
    """All documents of all inputs, in a stable order (so unit numbering is stable across re-runs).
    A `.jsonl` given directly is a manifest, read here; compressed JSONL and Parquet files are
    corpus files, listed for streaming."""
    out = Inputs()
    if not paths:
        raise InputError("no input given (--input MANIFEST.jsonl, DIRECTORY, or corpus files)")
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            _from_directory(p, out)
        elif p.is_file() and p.name.lower().endswith(RECORD_SUFFIXES) and p.suffix.lower() != ".jsonl":
            out.streams.append(p.resolve())
        elif p.is_file():
            _from_manifest(p, out, paired_needed, documents)
        else:
            raise InputError(
                f"{p}: input not found (expected a JSONL manifest, a directory, or a {', '.join(RECORD_SUFFIXES)} file)"
            )
    return out
