"""A speaker "embedding" simple enough to compute by hand: `soda eval --speaker tests.speaker_probe:embed`
(the module:function plug-in), so a test can recompute the similarity a report should hold."""

import numpy as np


def embed(audio: np.ndarray, rate: int) -> np.ndarray:
    x = np.asarray(audio, dtype=np.float64)
    return np.array([np.sqrt(np.mean(x * x)), np.mean(np.abs(np.diff(x))), np.mean(np.abs(x)), x.max() - x.min()])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    ea, eb = embed(a, 0), embed(b, 0)
    return float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))
