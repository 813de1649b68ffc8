"""The bundled tiny corpus: espeak-ng speech of generated English sentences in several voices.

No speech data can be downloaded here, so the demo and the tests speak their own. Sentences come
from a seeded grammar (stable across machines); espeak-ng writes 22,050 Hz WAVs, which exercises
the resampling path on the way to Mimi's 24 kHz. Utterances are grouped into short multi-utterance
documents per speaker, like the timestamped chunks of one recording in the paper's data.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from megatron_soda.config import UserError

VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb+f2", "en-gb-x-rp+m4", "en-us+m7")

_SUBJECTS = (
    "the old sailor",
    "a quiet student",
    "my neighbour",
    "the small robot",
    "our teacher",
    "the baker",
    "a tired traveller",
    "the young pilot",
    "her brother",
    "the clever fox",
    "a busy doctor",
    "the farmer",
)
_VERBS = (
    "carried",
    "painted",
    "found",
    "repaired",
    "described",
    "counted",
    "opened",
    "followed",
    "watched",
    "remembered",
    "borrowed",
    "cleaned",
)
_OBJECTS = (
    "a wooden boat",
    "the broken clock",
    "seven green apples",
    "an empty letter",
    "the long river",
    "a red umbrella",
    "the heavy box",
    "two silver keys",
    "the morning train",
    "a paper map",
    "the bright lantern",
    "an old song",
)
_PLACES = (
    "near the harbour",
    "before sunrise",
    "in the garden",
    "after the storm",
    "on the narrow bridge",
    "at the market",
    "under the tall trees",
    "during the winter",
    "by the window",
    "in the library",
)
_EXTRAS = (
    "and then smiled.",
    "without saying a word.",
    "while the dog slept.",
    "because it was raining.",
    "and everyone laughed.",
    "as the bells rang.",
    "for the first time.",
    "with great care.",
)
_QUESTIONS = ("Did you see {o} {p}?", "Why has {s} {v} {o}?", "Who {v} {o} {p}?")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        s, v, o, p = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_PLACES)
        if rng.random() < 0.2:
            text = rng.choice(_QUESTIONS).format(s=s, v=v, o=o, p=p)
        else:
            text = f"{s} {v} {o} {p}" + (f" {rng.choice(_EXTRAS)}" if rng.random() < 0.5 else ".")
            text = text[0].upper() + text[1:]
            text = text if text.endswith((".", "?")) else text + "."
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def require_espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise UserError("espeak-ng not found: install it (Debian/Ubuntu: apt-get install espeak-ng); `make` does this")
    return exe


def make_corpus(out_dir: str | Path, num_utterances: int = 240, num_text_docs: int = 16, seed: int = 0) -> Path:
    """Write OUT/audio/*.wav, OUT/manifest.jsonl and OUT/text/*.txt; returns the manifest path."""
    exe = require_espeak()
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    texts = sentences(num_utterances + num_text_docs * 6, seed)
    lines, doc, left = [], 0, 0
    voice = VOICES[0]
    for i, text in enumerate(texts[:num_utterances]):
        if left == 0:  # a new "recording": one speaker, 1-4 utterances in order
            doc, left, voice = doc + 1, rng.randint(1, 4), rng.choice(VOICES)
        left -= 1
        wav = out / "audio" / f"utt{i:04d}.wav"
        if not wav.is_file():
            speed = str(rng.randint(140, 190))
            subprocess.run([exe, "-v", voice, "-s", speed, "-w", str(wav), text], check=True, capture_output=True)
        rec = {
            "id": f"utt{i:04d}",
            "audio": f"audio/{wav.name}",
            "text": text,
            "speaker": voice,
            "doc": f"doc{doc:04d}",
        }
        lines.append(json.dumps(rec))
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    (out / "text").mkdir(exist_ok=True)
    rest = texts[num_utterances:]
    for j in range(num_text_docs):
        (out / "text" / f"doc{j:03d}.txt").write_text(" ".join(rest[j * 6 : (j + 1) * 6]) + "\n")
    (out / "sentences.txt").write_text("\n".join(texts) + "\n")
    return manifest


# --- the tiny speech-to-speech translation corpus (French -> English) ---------------------------

_S2ST_SUBJECTS = (
    ("the cat", "le chat"),
    ("the dog", "le chien"),
    ("my brother", "mon frère"),
    ("the teacher", "le professeur"),
    ("the baker", "le boulanger"),
    ("the child", "l'enfant"),
    ("my father", "mon père"),
    ("the doctor", "le médecin"),
)
_S2ST_VERBS = (
    ("found", "a trouvé"),
    ("opened", "a ouvert"),
    ("painted", "a peint"),
    ("watched", "a regardé"),
    ("repaired", "a réparé"),
    ("carried", "a porté"),
)
_S2ST_OBJECTS = (
    ("the red box", "la boîte rouge"),
    ("a small boat", "un petit bateau"),
    ("the old clock", "la vieille horloge"),
    ("a green apple", "une pomme verte"),
    ("the big door", "la grande porte"),
    ("a paper map", "une carte en papier"),
)
_S2ST_PLACES = (
    ("in the garden", "dans le jardin"),
    ("at the market", "au marché"),
    ("this morning", "ce matin"),
    ("near the river", "près de la rivière"),
    ("yesterday", "hier"),
)
# one voice variant per pair, used for both languages: the target keeps the source's voice
S2ST_VARIANTS = ("m1", "m3", "m7", "f2", "f4")


def parallel_sentences(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(French, English) pairs from a seeded parallel grammar (passé composé with avoir: no agreement)."""
    rng = random.Random(seed)
    combos = [(s, v, o, p) for s in _S2ST_SUBJECTS for v in _S2ST_VERBS for o in _S2ST_OBJECTS for p in _S2ST_PLACES]
    rng.shuffle(combos)
    out = []
    for s, v, o, p in combos[:n]:
        fr = f"{s[1]} {v[1]} {o[1]} {p[1]}."
        en = f"{s[0]} {v[0]} {o[0]} {p[0]}."
        out.append((fr[0].upper() + fr[1:], en[0].upper() + en[1:]))
    return out


def make_s2st_corpus(out_dir: str | Path, num_pairs: int = 64, seed: int = 0) -> Path:
    """OUT/audio/{fr,en}_*.wav and OUT/s2st.jsonl (source_audio/source_text/source_lang, target_*),
    plus OUT/sentences.txt (both languages, for a tokenizer). Returns the manifest path."""
    exe = require_espeak()
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    pairs = parallel_sentences(num_pairs, seed)
    for i, (fr, en) in enumerate(pairs):
        variant, speed = rng.choice(S2ST_VARIANTS), str(rng.randint(140, 180))
        for lang, voice, text in (("fr", f"fr+{variant}", fr), ("en", f"en-us+{variant}", en)):
            wav = out / "audio" / f"{lang}_{i:04d}.wav"
            if not wav.is_file():
                subprocess.run([exe, "-v", voice, "-s", speed, "-w", str(wav), text], check=True, capture_output=True)
        rec = {
            "id": f"pair{i:04d}",
            "source_audio": f"audio/fr_{i:04d}.wav",
            "source_text": fr,
            "source_lang": "fr",
            "target_audio": f"audio/en_{i:04d}.wav",
            "target_text": en,
            "target_lang": "en",
            "speaker": f"espeak+{variant}",
        }
        lines.append(json.dumps(rec, ensure_ascii=False))
    manifest = out / "s2st.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "sentences.txt").write_text("\n".join(t for p in pairs for t in p) + "\n", encoding="utf-8")
    return manifest


@dataclass
class CorpusConfig:
    out: str = field(default="data/tiny", metadata={"help": "output directory"})
    utterances: int = 160
    text_docs: int = 16
    seed: int = 0
    s2st: int = field(
        default=0,
        metadata={
            "metavar": "PAIRS",
            "help": "instead: a French->English speech-translation corpus of PAIRS pairs (same voice both sides)",
        },
    )


def corpus_job(cfg: CorpusConfig) -> None:
    """`soda corpus`: the bundled tiny espeak-ng corpus (demo and tests)."""
    if cfg.s2st:
        print(f"tiny S2ST corpus: {make_s2st_corpus(cfg.out, cfg.s2st, cfg.seed)} ({cfg.s2st} fr->en pairs)")
        return
    manifest = make_corpus(cfg.out, cfg.utterances, cfg.text_docs, cfg.seed)
    print(
        f"tiny corpus: {manifest} ({cfg.utterances} utterances) and {Path(cfg.out) / 'text'} "
        f"({cfg.text_docs} text documents)"
    )
