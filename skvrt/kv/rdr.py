"""RDR: rate-distortion retention. Which tier (or drop) each cached token gets, under a page budget.

Pure NumPy on token metadata (no tensors). The cache (skvrt.kv.cache, allocator "rdr") collects every token
outside the pinned sinks + recent window of every (layer, kv head) and calls `assign`, which minimises

    sum_i  utility_i * distortion[lh_i, tier_i]      subject to   sum_(lh, tier) ceil(n_(lh, tier) / P_tier) <= capacity

over all layers and heads at once: tiers are the old-token tiers 1..T (richest first) and drop (T + 1, zero
bytes, distortion 1); distortions come from calibration (relative to dropping the token). For a Lagrange
multiplier lam each token independently takes the tier minimising utility * distortion + lam * bytes (bytes
= 1 / P_tier frames per token); lam is found by bisection so the exact page count (partly filled pages
included) fits the capacity. Tokens are never promoted -- a stored token keeps its tier or moves to a
cheaper one -- which is also what keeps tokens from flapping between tiers. Per-layer and per-head budgets
therefore come out of the data.
"""

from __future__ import annotations

import numpy as np

POOL_RADIUS = 2  # utilities are max-pooled over +-2 neighbouring tokens (SnapKV's pooling)


def pool_neighbours(lh: np.ndarray, pos: np.ndarray, util: np.ndarray, radius: int = POOL_RADIUS) -> np.ndarray:
    """Max of each token's utility and its +-radius neighbours (in position order, same (layer, head))."""
    if len(util) == 0 or radius == 0:
        return util.astype(np.float64)
    order = np.lexsort((pos, lh))
    u, g = util[order].astype(np.float64), lh[order]
    out = u.copy()
    for s in range(1, radius + 1):
        same = g[s:] == g[:-s]
        out[:-s] = np.where(same, np.maximum(out[:-s], u[s:]), out[:-s])
        out[s:] = np.where(same, np.maximum(out[s:], u[:-s]), out[s:])
    res = np.empty_like(out)
    res[order] = out
    return res


def frames_needed(lh: np.ndarray, tier: np.ndarray, sizes: np.ndarray, n_lh: int) -> int:
    """Pages the assignment needs: sum over (layer-head, kept tier) of ceil(tokens / page size)."""
    n_t = len(sizes)
    keep = tier <= n_t
    counts = np.bincount(lh[keep] * n_t + (tier[keep] - 1), minlength=n_lh * n_t).reshape(n_lh, n_t)
    return int(np.ceil(counts / sizes[None, :]).sum())


def assign(lh: np.ndarray, cur: np.ndarray, util: np.ndarray, dist: np.ndarray, sizes: np.ndarray,
           capacity: int, n_lh: int, iters: int = 40) -> np.ndarray:
    """lh (n,) layer * H + head of each token; cur (n,) its tier now (0 = still dense, leaving the window;
    1..T an old tier); util (n,) >= 0; dist (n_lh, T) relative distortion of each old tier; sizes (T,) tokens
    per page of each old tier; capacity: pages the old tiers may use. -> tier (n,) in 1..T + 1 (T + 1 = drop),
    never richer than cur. Deterministic (ties go to the richer tier)."""
    n, T = len(lh), len(sizes)
    if n == 0:
        return np.zeros(0, np.int64)
    d = np.concatenate([np.asarray(dist, np.float64), np.ones((n_lh, 1))], axis=1)  # (n_lh, T + 1)
    cost = util.astype(np.float64)[:, None] * d[lh]  # (n, T + 1) utility x distortion
    rate = np.append(1.0 / np.asarray(sizes, np.float64), 0.0)  # (T + 1,) pages per token
    allowed = np.arange(1, T + 2)[None, :] >= np.maximum(cur, 1)[:, None]  # demotions only

    def choose(lam: float) -> np.ndarray:
        return np.argmin(np.where(allowed, cost + lam * rate, np.inf), axis=1) + 1

    best = choose(0.0)
    if frames_needed(lh, best, sizes, n_lh) <= capacity:
        return best
    lo, hi = 0.0, max(float(cost.max()), 1e-12) * float(sizes.max()) * 4 + 1e-12
    best = choose(hi)  # every token dropped: 0 pages
    for _ in range(iters):
        mid = (lo + hi) / 2
        c = choose(mid)
        if frames_needed(lh, c, sizes, n_lh) <= capacity:
            hi, best = mid, c
        else:
            lo = mid
    return best
