"""RDR: rate-distortion retention. Which tier (or drop) each cached token gets, under a page budget.

Pure NumPy on token metadata (no tensors). The cache (skvrt.kv.cache, allocator "rdr") collects every token
outside the pinned sinks + recent window of every (layer, kv head) and calls `assign`, which minimises

    sum_i  utility_i * distortion[lh_i, tier_i]      subject to   sum_(lh, tier) ceil(n_(lh, tier) / P_tier) <= capacity

over all layers and heads at once: tiers are the old-token tiers 1..T (richest first) and drop (T + 1, zero
bytes, distortion 1); distortions come from calibration (relative to dropping the token; the cache multiplies
each head's, dropping included, by its calibrated head weight, skvrt.head_sensitivity). For a Lagrange
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


def tier_counts(lh: np.ndarray, tier: np.ndarray, n_t: int, n_lh: int) -> np.ndarray:
    """-> (n_lh, n_t) tokens of each (layer-head, kept tier); tier in 1..n_t (n_t + 1 = drop, not counted)."""
    keep = tier <= n_t
    return np.bincount(lh[keep] * n_t + (tier[keep] - 1), minlength=n_lh * n_t).reshape(n_lh, n_t)


def frames_needed(lh: np.ndarray, tier: np.ndarray, sizes: np.ndarray, n_lh: int, base: np.ndarray | None = None) -> int:
    """Pages the assignment needs: sum over (layer-head, kept tier) of ceil(tokens / page size); base (n_lh,
    n_t): tokens already placed there besides these."""
    counts = tier_counts(lh, tier, len(sizes), n_lh)
    if base is not None:
        counts = counts + base
    return int(np.ceil(counts / sizes[None, :]).sum())


def _costs(lh, cur, util, dist, sizes, n_lh: int, drop_cost: float, allow_drop: bool = True):
    """-> cost (n, T + 1) utility x distortion of each tier and drop (inf where it would promote, and for drop
    when not allow_drop), rate (T + 1,) pages per token."""
    T = len(sizes)
    drop = np.broadcast_to(np.asarray(drop_cost, np.float64).reshape(-1, 1), (n_lh, 1))  # a number or one per head
    d = np.concatenate([np.asarray(dist, np.float64), drop], axis=1)  # (n_lh, T + 1)
    cost = util.astype(np.float64)[:, None] * d[lh]  # (n, T + 1)
    cost[np.arange(T + 1)[None, :] < np.maximum(cur, 1)[:, None] - 1] = np.inf  # demotions only
    if not allow_drop:
        cost[:, T] = np.inf
    return cost, np.append(1.0 / np.asarray(sizes, np.float64), 0.0)


def all_fit_cheapest(lh: np.ndarray, sizes: np.ndarray, capacity: int, n_lh: int) -> bool:
    """Whether every token fits the capacity at the cheapest tier (the keep_if_fits rule: then nothing need be
    dropped -- a token no query has looked at yet may be the one a later query retrieves)."""
    return frames_needed(lh, np.full(len(lh), len(sizes)), sizes, n_lh) <= capacity


def choose(lh: np.ndarray, cur: np.ndarray, util: np.ndarray, dist: np.ndarray, sizes: np.ndarray, n_lh: int,
           lam: float, drop_cost: float = 1.0, allow_drop: bool = True) -> np.ndarray:
    """Each token's tier at a given multiplier (no search): the rule `assign` applies once it found lam. Used
    for tokens that leave the window between two searches (their pages are checked by the caller)."""
    if len(lh) == 0:
        return np.zeros(0, np.int64)
    cost, rate = _costs(lh, cur, util, dist, sizes, n_lh, drop_cost, allow_drop)
    return np.argmin(cost + lam * rate, axis=1) + 1


def assign(lh: np.ndarray, cur: np.ndarray, util: np.ndarray, dist: np.ndarray, sizes: np.ndarray,
           capacity: int, n_lh: int, hint: float | None = None, rel_tol: float = 1e-3,
           drop_cost: float = 1.0, allow_drop: bool = True) -> tuple[np.ndarray, float]:
    """lh (n,) layer * H + head of each token; cur (n,) its tier now (0 = still dense, leaving the window;
    1..T an old tier); util (n,) >= 0; dist (n_lh, T) relative distortion of each old tier; sizes (T,) tokens
    per page of each old tier; capacity: pages the old tiers may use; hint: the multiplier of the previous
    call (the search starts around it); drop_cost: the distortion of dropping (1 = the token's whole
    contribution; larger values price in that a dropped token is lost for every later query, which past
    attention does not predict). -> (tier (n,) in 1..T + 1 (T + 1 = drop), never richer than cur;
    the multiplier used). drop_cost may also be (n_lh,), one per layer-head. The smallest multiplier that fits,
    to rel_tol. Deterministic (ties go to the richer tier). allow_drop False: no token is dropped (the caller
    checked `all_fit_cheapest`)."""
    n = len(lh)
    if n == 0:
        return np.zeros(0, np.int64), 0.0
    cost, rate = _costs(lh, cur, util, dist, sizes, n_lh, drop_cost, allow_drop)
    finite = np.isfinite(cost)
    top = max(float(np.max(cost[finite])), 1e-12) * float(np.max(sizes)) * 4  # all dropped (or all at the cheapest
    # tier): fits
    # tokens with one option (at the cheapest tier when nothing may be dropped) are placed once, not searched
    fixed = finite.sum(axis=1) == 1
    out = np.argmax(finite, axis=1) + 1  # (n,) the fixed tokens' only tier
    base = tier_counts(lh[fixed], out[fixed], len(sizes), n_lh)
    free = ~fixed
    lh_f, cost = lh[free], cost[free]

    def pick(lam: float) -> np.ndarray:  # the searched tokens' tiers
        return np.argmin(cost + lam * rate, axis=1) + 1

    def choose(lam: float) -> np.ndarray:
        out[free] = pick(lam)
        return out.copy()

    def fits(lam: float) -> bool:
        return frames_needed(lh_f, pick(lam), sizes, n_lh, base) <= capacity

    if fits(0.0):
        return choose(0.0), 0.0
    lo, hi = (hint, hint) if hint and 0 < hint < top else (0.0, top)
    if lo == hi:  # bracket the previous multiplier
        if fits(hi):
            lo = hi / 2
            while lo > 1e-30 and fits(lo):
                hi, lo = lo, lo / 2
        else:
            while not fits(hi) and hi < top:
                lo, hi = hi, min(hi * 2, top)
    for _ in range(200):  # (a plan that fits at every multiplier > 0 but not at 0 ends near 0, not in a loop)
        if hi - lo <= rel_tol * hi:
            break
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return choose(hi), hi
