"""Finding what to tokenize: JSONL manifests, directories of audio and text, corpus files.

A manifest (`.jsonl` given as --input) is read here and its documents dealt into shards. Corpus
files (`.jsonl.gz`, `.jsonl.zst`, `.parquet`, `.arrow`, `.tar` given as --input, and those plus `.jsonl`
found in a directory; `hf://datasets/...` folders) are
only listed here: each becomes one unit of work, streamed record by record by whichever rank owns it
(`streams`), so a rank never reads what other ranks tokenize and no file is held in memory.
Input problems (a malformed line, an entry with nothing in it) are turned into counted skips like
bad audio, so one bad line never stops a million-file run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import UserError
from megatron_soda.tokenization.audio_io import AUDIO_EXTENSIONS
from megatron_soda.tokenization.readers import READERS, RECORD_SUFFIXES, is_record_file, read_records

TEXT_EXTENSIONS = (".txt",)
MANIFEST_SUFFIX = ".jsonl"  # given as --input: a manifest, read here; found in a directory: a corpus file
CORPUS_SUFFIXES = tuple(s for s in RECORD_SUFFIXES if s != MANIFEST_SUFFIX)  # given as --input: streamed
CORPUS_FILES = ", ".join(f"{s} ({READERS[s].name})" for s in CORPUS_SUFFIXES)
INPUT_HELP = (
    f"JSONL manifest, directory, corpus file ({'/'.join(CORPUS_SUFFIXES)}) or hf://datasets/OWNER/NAME[/FOLDER] "
    "(repeatable)"
)


class InputError(UserError, ValueError):
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
    audio_bytes: bytes | None = None  # the encoded file itself (tar member, Parquet cell); `audio` names it
    segment: tuple[float, float] | None = None  # (start, end) seconds of a longer recording

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


class _BadPath(Exception):
    """A manifest path no file can have (a NUL byte, over the system's length limit)."""


def _resolve(path: str, base: Path, field: str) -> str:
    """`path` (relative to the manifest's folder) made absolute, or _BadPath saying why it cannot be:
    the OS refuses such a path with an exception that would otherwise stop the whole run."""
    if "\0" in path:
        raise _BadPath(f"field '{field}' holds a NUL byte (no file has such a path)")
    try:
        return str((base / path).resolve())
    except (OSError, ValueError) as e:
        raise _BadPath(f"field '{field}': not a usable path ({e})") from None


def _audio_ref(audio, base: Path) -> tuple[str, bytes | None] | str:
    """(name or path, bytes) of a record's audio: a path, or Hugging Face's {"bytes", "path"}; else why not."""
    try:
        if isinstance(audio, str):
            return _resolve(audio, base, "audio"), None
        if isinstance(audio, dict):
            data, path = audio.get("bytes"), audio.get("path")
            if isinstance(data, bytes | bytearray | memoryview) and len(data):
                return str(path or "<bytes>").replace("\0", "\\0"), bytes(data)
            if isinstance(path, str) and path:
                return _resolve(path, base, "audio.path"), None
            return "field 'audio' holds neither bytes nor a path"
    except _BadPath as e:
        return str(e)
    return "field 'audio' must be a path or {'bytes', 'path'}"


def _segment(rec: dict) -> tuple[float, float] | None | str:
    """(start, end) seconds from a record's start/end fields, None without them, or why not."""
    if rec.get("start") is None and rec.get("end") is None:
        return None
    try:
        start, end = float(rec["start"]), float(rec["end"])
    except (KeyError, TypeError, ValueError):
        return "fields 'start' and 'end' must both be numbers of seconds"
    return (start, end) if end > start >= 0 else f"segment {start}-{end} s is empty or negative"


def record_entries(
    rec: dict, base: Path, where: str, default_id: str, paired_needed: bool, documents: bool, doc_key: str = "doc"
) -> list[Entry] | Entry | Skip:
    """One manifest or corpus record -> an entry, a list of entries that is a document of its own
    (a translation pair; a long recording with its `utterances` [{text, start, end}]), or why not.
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
    ref = _audio_ref(audio, base) if audio is not None else None
    if isinstance(ref, str):
        return Skip(where, "bad_manifest_line", ref)
    rid = str(rec.get("id", default_id))
    utterances = rec.get("utterances")
    if utterances is not None and ref is not None:  # one long recording, cut by its utterances' times
        if not isinstance(utterances, list) or not all(isinstance(u, dict) for u in utterances):
            return Skip(where, "bad_manifest_line", "field 'utterances' must be a list of {text, start, end}")
        timed = []
        for i, u in enumerate(utterances):
            seg, utext = _segment(u), u.get("text")
            if not isinstance(seg, tuple) or not isinstance(utext, str) or not utext.strip():
                return Skip(where, "bad_manifest_line", f"utterance {i}: needs a non-empty 'text', 'start' and 'end'")
            timed.append((seg, utext.strip()))
        timed.sort(key=lambda t: t[0])  # a document is its utterances in time order
        return [
            Entry(f"{rid}:{i}", ref[0], t, speaker=rec.get("speaker"), doc=rid, audio_bytes=ref[1], segment=seg)
            for i, (seg, t) in enumerate(timed)
        ] or Skip(where, "bad_manifest_line", "field 'utterances' is empty")
    if ref is None and not (text or "").strip():
        return Skip(where, "bad_manifest_line", "needs 'audio' and/or a non-empty 'text'")
    if ref is not None and paired_needed and not (text or "").strip():
        return Skip(f"{where} ({ref[0]})", "missing_transcript")
    seg = _segment(rec)
    if isinstance(seg, str):
        return Skip(where, "bad_manifest_line", seg)
    doc = rec.get(doc_key)
    return Entry(
        id=rid,
        audio=ref[0] if ref else None,
        text=text.strip() if text and text.strip() else None,
        speaker=rec.get("speaker"),
        doc=None if doc is None else str(doc),
        audio_bytes=ref[1] if ref else None,
        segment=seg,
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


def entries_of_file(path: Path, paired_needed: bool, documents: bool, skips: list[Skip], doc_key: str = "doc"):
    """The entries of every record of a manifest / corpus file, the bad ones counted in `skips`."""
    for n, rec in read_records(path):
        where = f"{path}:{n}"
        if isinstance(rec, str):
            skips.append(Skip(where, "bad_manifest_line", rec))
            continue
        item = record_entries(rec, path.parent, where, f"{path.stem}:{n}", paired_needed, documents, doc_key)
        if isinstance(item, Skip):
            skips.append(item)
            continue
        yield item


def _from_manifest(path: Path, out: Inputs, paired_needed: bool, documents: bool, doc_key: str) -> None:
    group = DocGrouper()
    for item in entries_of_file(path, paired_needed, documents, out.skips, doc_key):
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
        try:
            audio = _resolve(rec[f"{side}_audio"], base, f"{side}_audio")
        except _BadPath as e:
            return Skip(where, "bad_manifest_line", str(e))
        entries.append(
            Entry(
                id=f"{rid}:{side}",
                audio=audio,
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


def resolve_hf(url: str) -> Path:
    """`hf://datasets/OWNER/NAME[/FOLDER]` -> the local copy of that dataset folder, fetched into the
    Hugging Face cache (HF_HUB_CACHE) or, offline (HF_HUB_OFFLINE=1), found there."""
    import os

    parts = url[len("hf://") :].strip("/").split("/")
    if len(parts) < 3 or parts[0] != "datasets":
        raise InputError(f"{url}: expected hf://datasets/OWNER/NAME[/FOLDER]")
    repo, folder = "/".join(parts[1:3]), "/".join(parts[3:])
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        local = snapshot_download(
            repo,
            repo_type="dataset",
            allow_patterns=[f"{folder}/*"] if folder else None,
            cache_dir=os.environ.get("HF_HUB_CACHE"),
            local_files_only=offline,
        )
    except LocalEntryNotFoundError:
        raise InputError(f"{url}: not in the Hugging Face cache, and offline (HF_HUB_OFFLINE)") from None
    except (HfHubHTTPError, OSError) as e:
        raise InputError(f"{url}: could not be fetched ({str(e).splitlines()[0]})") from None
    path = Path(local) / folder
    if not path.exists():
        raise InputError(f"{url}: the dataset has no folder {folder!r}")
    return path


def discover(paths: list[str], paired_needed: bool, documents: bool = False, doc_key: str = "doc") -> Inputs:
    """All documents of all inputs, in a stable order (so unit numbering is stable across re-runs).
    A `.jsonl` given directly is a manifest, read here; compressed JSONL, Parquet, Arrow and tar
    files are corpus files, listed for streaming; `hf://datasets/...` is a dataset folder on the Hub."""
    out = Inputs()
    if not paths:
        raise InputError("no input given (--input MANIFEST.jsonl, DIRECTORY, or corpus files)")
    for raw in paths:
        p = resolve_hf(raw) if raw.startswith("hf://") else Path(raw)
        if p.is_dir():
            _from_directory(p, out)
        elif p.is_file() and p.name.lower().endswith(CORPUS_SUFFIXES):
            out.streams.append(p.resolve())
        elif p.is_file():
            _from_manifest(p, out, paired_needed, documents, doc_key)
        else:
            raise InputError(
                f"{p}: input not found (expected a JSONL manifest, a directory, or a corpus file: {CORPUS_FILES})"
            )
    return out
