"""Samplers: small functions over a logits row, built by one factory (temperature 0 = argmax).

Order as in llama.cpp / mlx-lm: repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass
class SamplerSettings:
    temp: float = 0.7
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    repetition_window: int = 64  # last N tokens the penalty looks at
    seed: int | None = None


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style: positive logits divided by `penalty`, negative multiplied."""
    if penalty == 1.0 or not len(history):
        return logits
    ids = np.unique(np.asarray(history, dtype=np.int64))
    out = logits.copy()
    sel = out[ids]
    out[ids] = np.where(sel > 0, sel / penalty, sel * penalty)
    return out


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= logits.size:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability sums to >= p."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = _softmax(logits[order])
    cum = np.cumsum(probs)
    n_keep = int(np.searchsorted(cum, p, side="left")) + 1
    out = np.full_like(logits, -np.inf)
    keep = order[:n_keep]
    out[keep] = logits[keep]
    return out


def filter_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = _softmax(logits)
    return np.where(probs < min_p * probs.max(), -np.inf, logits)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def make_sampler(s: SamplerSettings) -> Callable[[np.ndarray, Sequence[int]], int]:
    """-> sample(logits (V,), history) -> token id. Same seed and inputs give the same tokens."""
    rng = np.random.default_rng(s.seed)

    def sample(logits: np.ndarray, history: Sequence[int] = ()) -> int:
        logits = apply_repetition_penalty(logits.astype(np.float64), history[-s.repetition_window :],
                                          s.repetition_penalty)
        if s.temp <= 0:
            return int(np.argmax(logits))
        logits = logits / s.temp
        logits = filter_top_k(logits, s.top_k)
        logits = filter_top_p(logits, s.top_p)
        logits = filter_min_p(logits, s.min_p)
        probs = _softmax(logits)
        return int(rng.choice(probs.size, p=probs))

    return sample
