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
from pathlib import Path

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
        raise RuntimeError(
            "espeak-ng not found: install it (Debian/Ubuntu: apt-get install espeak-ng); `make` does this"
        )
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
