"""NumPy float32 building blocks shared by the architectures (CPU path).

Numerics follow transformers' llama implementation (the test oracle): RMSNorm in float32 then the weight
multiply; RoPE with rotate_half and cos/sin computed in float32; softmax in float32.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    """x: (T, H) float32, weight: (H,) -> (T, H)."""
    var = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(var + eps, dtype=np.float32))).astype(np.float32, copy=False) * weight


def silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x), computed stably for large |x| in float32
    return x / (np.float32(1.0) + np.exp(-x))


def rope_tables(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """inv_freq: (D/2,), positions: (T,) -> cos, sin: (T, D) in the rotate_half layout (freqs repeated twice)."""
    freqs = np.outer(positions.astype(np.float32), inv_freq.astype(np.float32))  # (T, D/2)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (n_heads, T, D), cos/sin: (T, D) -> rotated x (rotate_half convention: pairs (i, i + D/2))."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def softmax_lastdim(scores: np.ndarray) -> np.ndarray:
    m = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = np.max(logits, axis=-1, keepdims=True)
    return logits - m - np.log(np.sum(np.exp(logits - m), axis=-1, keepdims=True))
