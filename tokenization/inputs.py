"""Finding what to tokenize: JSONL manifests, directories of audio, directories of text.

Input problems found here (a malformed manifest line, an entry with nothing in it) are turned
into counted skips like bad audio, so one bad line never stops a million-file run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.tokenization.audio_io import AUDIO_EXTENSIONS

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


def _from_manifest(path: Path, out: Inputs, paired_needed: bool) -> None:
    base = path.parent
    current: list[Entry] = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")  # strictly: a mangled transcript must not reach the shards
        except UnicodeDecodeError as e:
            out.skips.append(Skip(where, "bad_manifest_line", f"not UTF-8 ({e.reason} at byte {e.start})"))
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            out.skips.append(Skip(where, "bad_manifest_line", str(e)))
            continue
        if "source_audio" in rec or "target_audio" in rec:
            pair = _translation_pair(rec, base, where, f"{path.stem}:{lineno}")
            if isinstance(pair, Skip):
                out.skips.append(pair)
                continue
            if current:
                out.docs.append(current)
                current = []
            out.docs.append(pair)
            continue
        audio, text = rec.get("audio"), rec.get("text")
        if text is not None and not isinstance(text, str):
            out.skips.append(Skip(where, "bad_manifest_line", "field 'text' must be a string"))
            continue
        if audio is None and not (text or "").strip():
            out.skips.append(Skip(where, "bad_manifest_line", "needs 'audio' and/or a non-empty 'text'"))
            continue
        if audio is not None and paired_needed and not (text or "").strip():
            out.skips.append(Skip(f"{where} ({audio})", "missing_transcript"))
            continue
        entry = Entry(
            id=str(rec.get("id", f"{path.stem}:{lineno}")),
            audio=str((base / audio).resolve()) if audio is not None else None,
            text=text.strip() if text and text.strip() else None,
            speaker=rec.get("speaker"),
            doc=None if rec.get("doc") is None else str(rec["doc"]),
        )
        # a document is a run of entries with one doc id and one kind (paired/audio/text)
        if current and (entry.doc is None or entry.doc != current[-1].doc or entry.kind != current[-1].kind):
            out.docs.append(current)
            current = []
        current.append(entry)
    if current:
        out.docs.append(current)


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
    usable = [p for p in files if p.suffix.lower() in AUDIO_EXTENSIONS + TEXT_EXTENSIONS]
    if not usable:
        raise InputError(f"{path}: no audio ({', '.join(AUDIO_EXTENSIONS)}) or text (.txt) files found")
    for p in usable:
        rel = str(p.relative_to(path))
        if p.suffix.lower() in TEXT_EXTENSIONS:
            out.docs.append([Entry(id=rel, text_path=str(p.resolve()))])
        else:
            out.docs.append([Entry(id=rel, audio=str(p.resolve()))])


def discover(paths: list[str], paired_needed: bool) -> Inputs:
    """All documents of all inputs, in a stable order (so unit numbering is stable across re-runs)."""
    out = Inputs()
    if not paths:
        raise InputError("no input given (--input MANIFEST.jsonl or DIRECTORY)")
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            _from_directory(p, out)
        elif p.is_file():
            _from_manifest(p, out, paired_needed)
        else:
            raise InputError(f"{p}: input not found (expected a JSONL manifest or a directory)")
    return out
