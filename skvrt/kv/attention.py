"""Attention over a sequence's pages (NumPy, CPU). Reads only through the page table and fill counts.

Dense-tier pages are gathered and attended with plain dot products. Other tiers plug in here by tier
index (ADA pages compute logits from codes, never from rebuilt keys).
"""

from __future__ import annotations

import numpy as np

from .pool import TierPool


def gather_dense(pool: TierPool, page_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """page_ids (n,) of a dense pool -> K (N, D) f32, V (N, D) f32, positions (N,) for the N filled slots."""
    P = pool.page_size
    fill = pool.fill[page_ids]  # (n,)
    k = pool.k[page_ids]  # (n, P, D)
    v = pool.v[page_ids]
    pos = pool.positions[page_ids]  # (n, P)
    if len(page_ids) == 0 or np.all(fill[:-1] == P):
        # Common case: every page full but the last -> a prefix of the flattened slots.
        n_tok = int(fill.sum())
        D = k.shape[-1]
        return (
            k.reshape(-1, D)[:n_tok].astype(np.float32, copy=False),
            v.reshape(-1, D)[:n_tok].astype(np.float32, copy=False),
            pos.reshape(-1)[:n_tok],
        )
    valid = np.arange(P)[None, :] < fill[:, None]  # (n, P)
    return k[valid].astype(np.float32, copy=False), v[valid].astype(np.float32, copy=False), pos[valid]


def softmax_attend(scores: np.ndarray, v: np.ndarray, kpos: np.ndarray, qpos: np.ndarray) -> np.ndarray:
    """scores (G, T, N) scaled logits, v (N, D), kpos (N,), qpos (T,) -> (G, T, D); keys after a query masked."""
    G, T, N = scores.shape
    if N and kpos.max() > qpos.min():
        future = kpos[None, :] > qpos[:, None]  # (T, N)
        scores = np.where(future[None], np.float32(-np.inf), scores)
    m = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - m)
    p /= p.sum(axis=-1, keepdims=True)
    return (p.reshape(G * T, N) @ v).reshape(G, T, v.shape[-1])


def attend_dense(q: np.ndarray, k: np.ndarray, v: np.ndarray, kpos: np.ndarray, qpos: np.ndarray,
                 scale: float) -> np.ndarray:
    """Causal softmax attention for one KV head's query group.

    q: (G, T, D) post-RoPE queries of the G query heads sharing this KV head; qpos: (T,)
    k, v: (N, D) post-RoPE keys / values; kpos: (N,)  ->  (G, T, D)
    """
    G, T, D = q.shape
    scores = (q.reshape(G * T, D) @ k.T).reshape(G, T, -1) * np.float32(scale)  # (G, T, N)
    if len(kpos) and kpos.max() > qpos.min():
        future = kpos[None, :] > qpos[:, None]  # (T, N)
        scores = np.where(future[None], np.float32(-np.inf), scores)
    m = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - m)
    p /= p.sum(axis=-1, keepdims=True)
    return (p.reshape(G * T, -1) @ v).reshape(G, T, D)
