"""RDR: the allocator (skvrt.kv.rdr) against brute force, and the budgeted policies (spherical, snapkv, h2o)
under random use (hypothesis): budget never exceeded at any step, no page leaked, no token stored twice,
pages tier-homogeneous, dropped tokens never read, pinned tokens never demoted, deterministic."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skvrt import ckernels
from skvrt.calibrate import DEFAULT_LADDER, Calibration
from skvrt.errors import InputError
from skvrt.kv import make_policy, rdr
from skvrt.kv.attention import attend_dense
from skvrt.kv.cache import DENSE, PagedKVCache, parse_budget

# ---- the allocator alone ---------------------------------------------------------------------------------


def brute_force(lh, cur, util, dist, sizes, capacity, n_lh, allow_drop=True):
    """Minimum of sum util * distortion over every assignment that fits (tiny cases)."""
    T = len(sizes)
    d = np.concatenate([dist, np.ones((n_lh, 1))], axis=1)
    best = np.inf
    for combo in itertools.product(range(1, T + 2 if allow_drop else T + 1), repeat=len(lh)):
        c = np.array(combo)
        if (c < np.maximum(cur, 1)).any() or rdr.frames_needed(lh, c, sizes, n_lh) > capacity:
            continue
        best = min(best, float((util * d[lh, c - 1]).sum()))
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 7), st.integers(0, 6))
def test_assign_fits_and_is_near_optimal(seed, n, capacity):
    rng = np.random.default_rng(seed)
    n_lh, sizes = 2, np.array([2, 3])
    lh = rng.integers(0, n_lh, n)
    cur = rng.integers(0, 3, n)
    util = rng.exponential(1, n)
    dist = np.sort(rng.uniform(0, 1, (n_lh, 2)), axis=1)  # richer tier -> lower distortion
    got, lam = rdr.assign(lh, cur, util, dist, sizes, capacity, n_lh)
    assert (got >= np.maximum(cur, 1)).all(), "a token was promoted"
    assert rdr.frames_needed(lh, got, sizes, n_lh) <= capacity
    assert (got == rdr.assign(lh, cur, util, dist, sizes, capacity, n_lh)[0]).all()  # deterministic
    # a warm start from any multiplier also ends on a fitting plan
    for hint in (lam * 0.3, lam * 3, 1e-6, 1e6):
        got2, _ = rdr.assign(lh, cur, util, dist, sizes, capacity, n_lh, hint=hint)
        assert rdr.frames_needed(lh, got2, sizes, n_lh) <= capacity
    d = np.concatenate([dist, np.ones((n_lh, 1))], axis=1)
    cost = float((util * d[lh, got - 1]).sum())
    opt = brute_force(lh, cur, util, dist, sizes, capacity, n_lh)
    # the Lagrangian solution is optimal up to the integrality of pages: never worse than dropping one more
    # token's worth of each (layer-head, tier) page remainder; in practice equal on most draws
    assert cost <= opt + util.sum() * 0.75 + 1e-9


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 7), st.integers(0, 3))
def test_assign_without_drops_places_fixed_tokens_once_and_is_near_optimal(seed, n, spare):
    """allow_drop False: tokens at the cheapest tier have one option and are not searched; the plan still fits,
    never drops or promotes, and is as good as brute force over the plans without drops."""
    rng = np.random.default_rng(seed)
    n_lh, sizes = 2, np.array([2, 3])
    lh = rng.integers(0, n_lh, n)
    cur = rng.choice([0, 1, 2, 2, 2], n)  # most tokens already at the cheapest tier
    util = rng.exponential(1, n)
    dist = np.sort(rng.uniform(0, 1, (n_lh, 2)), axis=1)
    capacity = rdr.frames_needed(lh, np.full(n, 2), sizes, n_lh) + spare  # everyone fits the cheapest tier
    assert rdr.all_fit_cheapest(lh, sizes, capacity, n_lh)
    got, lam = rdr.assign(lh, cur, util, dist, sizes, capacity, n_lh, allow_drop=False)
    assert (got <= 2).all() and (got >= np.maximum(cur, 1)).all()
    assert (got[cur == 2] == 2).all()
    assert rdr.frames_needed(lh, got, sizes, n_lh) <= capacity
    assert (rdr.choose(lh, cur, util, dist, sizes, n_lh, lam, allow_drop=False) == got).all()
    d = np.concatenate([dist, np.ones((n_lh, 1))], axis=1)
    cost = float((util * d[lh, got - 1]).sum())
    opt = brute_force(lh, cur, util, dist, sizes, capacity, n_lh, allow_drop=False)
    assert cost <= opt + util.sum() * 0.75 + 1e-9


def test_assign_prefers_high_utility_and_spends_the_budget():
    n_lh, sizes = 1, np.array([4])
    util = np.array([5.0, 0.1, 3.0, 0.2, 4.0, 0.3, 2.0, 0.01])
    lh, cur = np.zeros(8, np.int64), np.zeros(8, np.int64)
    got, _ = rdr.assign(lh, cur, util, np.zeros((1, 1)), sizes, 1, n_lh)  # room for 4 tokens
    assert sorted(np.nonzero(got == 1)[0]) == [0, 2, 4, 6]


def test_assign_keep_if_fits_drops_nothing_while_the_cheapest_tier_holds_everyone():
    n_lh, sizes = 1, np.array([2, 4])  # tier 1: 2 tokens per page, tier 2: 4
    util = np.array([5.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0])  # most tokens were never looked at
    lh, cur = np.zeros(8, np.int64), np.zeros(8, np.int64)
    dist = np.array([[0.1, 0.5]])

    def keep_if_fits(capacity):  # the cache's rule: no drops while everyone fits the cheapest tier
        allow = not rdr.all_fit_cheapest(lh, sizes, capacity, n_lh)
        got, lam = rdr.assign(lh, cur, util, dist, sizes, capacity, n_lh, allow_drop=allow)
        # a departure between searches at the same multiplier follows the same rule
        assert (rdr.choose(lh, cur, util, dist, sizes, n_lh, lam, allow_drop=allow) == got).all()
        return got

    plain, _ = rdr.assign(lh, cur, util, dist, sizes, 2, n_lh)  # (its multiplier tends to 0: the search ends)
    assert (plain == 3).sum() >= 4  # zero-utility tokens cost nothing to drop
    kept = keep_if_fits(2)
    assert (kept == 2).all()  # 8 tokens in 2 pages of the cheapest tier: nothing dropped
    richer = keep_if_fits(3)
    assert (richer <= 2).all() and set(np.nonzero(richer == 1)[0]) == {0, 4}  # the spare page: the useful pair
    # when even the cheapest tier cannot hold everyone, tokens are dropped as without the rule
    tight = keep_if_fits(1)
    tight_plain, _ = rdr.assign(lh, cur, util, dist, sizes, 1, n_lh)
    assert (tight == tight_plain).all() and (tight == 3).sum() == 6  # one page of the richest tier: the pair


def test_util_floor_adds_a_uniform_share():
    pol = make("spherical", 0.25).policy
    caches = [PagedKVCache(L, H, D, n_ctx=600, kv_dtype="float32", page_size=16,
                           policy=dataclasses.replace(pol, util_floor=f, surprisal=0.0)) for f in (0.0, 0.5)]
    pos, mass = np.array([10, 150]), np.array([0.0, 3.0])
    for c in caches:
        c.offset, c._obs = 200, list(range(100, 200))
    base = caches[0].utilities(pos, mass)
    np.testing.assert_allclose(base, [0.0, 3.0 / 50])  # mass per observing query (queries at or after pos)
    np.testing.assert_allclose(caches[1].utilities(pos, mass), base + 0.5 / 200)


def test_pool_neighbours_is_a_max_filter_per_head():
    lh = np.array([0, 0, 0, 0, 0, 1, 1])
    pos = np.array([4, 0, 1, 2, 3, 0, 9])
    u = np.array([0.0, 0.0, 9.0, 0.0, 0.0, 1.0, 0.0])
    got = rdr.pool_neighbours(lh, pos, u, radius=1)
    # head 0 in position order: 0 9 0 0 0 -> 9 9 9 0 0; head 1 separate: 1 0 -> 1 1
    assert got.tolist() == [0.0, 9.0, 9.0, 9.0, 0.0, 1.0, 1.0]


# ---- budgeted caches under random use --------------------------------------------------------------------

L, H, D = 2, 2, 64


def calibration(rng):
    """Random statistics and head sensitivity (so spherical caches weigh their heads, as from a real sidecar)."""
    return Calibration(rng.uniform(0.1, 2, (L, H, D)).astype(np.float32),
                       rng.uniform(0.1, 2, (L, H, D)).astype(np.float32), {},
                       head_sensitivity=rng.lognormal(-6, 1, (L, H)).astype(np.float32))


def random_keys(rng, n):
    h2 = D // 2
    ang = rng.uniform(-np.pi, np.pi, h2) + rng.normal(0, 0.6, (n, h2))
    rad = rng.uniform(0.2, 4, h2) * rng.lognormal(0, 0.3, (n, h2))
    return np.concatenate([rad * np.cos(ang), rad * np.sin(ang)], axis=1).astype(np.float32)


LADDER = "192:4,96:4,48:2"
DENSE_LADDER = "dense," + LADDER  # old tokens may also stay dense (pool 1)


def make(policy, budget, n_ctx=600, window=8, sinks=2, use_c=True, seed=0, ladder=LADDER, **opts):
    rng = np.random.default_rng(seed)
    pol = make_policy(policy, sinks=sinks, window=window, budget=budget, calibration=calibration(rng),
                      ladder=ladder, kv_dtype="float32", **opts)
    cache = PagedKVCache(L, H, D, n_ctx=n_ctx, kv_dtype="float32", page_size=16, policy=pol)
    cache.use_c = use_c and cache.use_c
    return cache


def held(cache, layer, h):
    """positions (n,) and tier (n,) of every token (layer, h) holds."""
    ids, tiers = cache.table.pages(layer, h)
    pos, tier = [], []
    for pid, t in zip(ids, tiers):
        pool = cache.pools[t]
        assert pool.in_use(pid), "the table lists a page its pool does not own"
        f = int(cache.arena.fill[pid])
        assert 0 < f <= pool.page_size
        pos += pool.positions[pid, :f].tolist()
        tier += [int(t)] * f
    return np.array(pos, np.int64), np.array(tier, np.int64)


def check(cache, history):
    """Invariants after a step. history[(layer, h, pos)] = richest tier seen so far (demotions only)."""
    p = cache.policy
    arena = cache.arena
    used = sum(pool.n_used for pool in cache.pools)
    assert used * (arena.frame_bytes + 4) <= cache.budget, "budget exceeded"
    assert used + arena.n_free == arena.n_frames, "page leaked"
    for t, pool in enumerate(cache.pools):
        listed = sorted(int(pid) for l in range(L) for h in range(H)
                        for pid, tt in zip(*cache.table.pages(l, h)) if tt == t)
        assert listed == sorted(np.nonzero(arena.owner == t)[0].tolist()), "pool / table disagree"
    pinned_hi = cache.offset - p.window
    for layer in range(L):
        for h in range(H):
            pos, tier = held(cache, layer, h)
            assert len(pos) == len(set(pos.tolist())), "a token is stored twice"
            assert set(pos.tolist()) <= set(range(cache.offset))
            # sinks and the recent window are dense and present
            for q in list(range(min(p.sinks, cache.offset))) + list(range(max(p.sinks, pinned_hi), cache.offset)):
                assert q in pos and tier[pos.tolist().index(q)] == DENSE, f"pinned token {q} not dense"
            for q, t in zip(pos.tolist(), tier.tolist()):
                prev = history.get((layer, h, q))
                assert prev is None or t >= prev, "a token was promoted"
                history[(layer, h, q)] = t
            for key in [k for k in history if k[:2] == (layer, h) and k[2] not in set(pos.tolist())]:
                history[key] = 99  # dropped: may never come back
            assert not any(history.get((layer, h, q)) == 99 and q in pos for q in pos.tolist())


def run_ops(cache, ops, rng):
    history = {}
    for n in ops:
        n = min(n, cache.n_ctx - cache.offset, cache.max_chunk)
        if n <= 0:
            break
        for layer in range(L):
            cache.append(layer, np.stack([random_keys(rng, n) for _ in range(H)]),
                         rng.normal(size=(H, n, D)).astype(np.float32))
            cache.attend(layer, rng.normal(size=(H * 3, n, D)).astype(np.float32),
                         np.arange(cache.offset, cache.offset + n))
            check_dense_released(cache, layer, n)
        cache.advance(n)
        check(cache, history)
    return history


def check_dense_released(cache, layer, T):
    """Once a layer attended a chunk of T > 1 tokens, the tokens that leave the window by the end of the
    forward have left its dense pages: the budget holds one layer's chunk at a time, not every layer's.
    (Decode steps, T = 1, leave at advance, every `batch` tokens.)"""
    p = cache.policy
    for h in range(H):
        pos, tier = held(cache, layer, h)
        limit = p.sinks + p.window + cache.batch - (T > 1)
        assert (tier == DENSE).sum() <= limit, "a layer kept its chunk dense"


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["spherical", "spherical-dense", "snapkv", "h2o"]),
       st.lists(st.integers(1, 64), min_size=1, max_size=14), st.sampled_from([0.1, 0.15, 0.25, 0.5]),
       st.integers(0, 2**31 - 1))
def test_budgeted_policies_keep_their_invariants(policy, ops, budget, seed):
    # budgets of 0.1-0.5 x 1500 tokens: ops fill past them; spherical-dense: the ladder with a dense old tier
    cache = make(policy.split("-")[0], budget, n_ctx=1500, ladder=DENSE_LADDER if "dense" in policy else LADDER)
    run_ops(cache, ops, np.random.default_rng(seed))
    cache.reset()
    assert sum(pool.n_used for pool in cache.pools) == 0 and cache.arena.n_free == cache.arena.n_frames


def test_long_decode_holds_the_budget_and_uses_every_tier():
    # ~ 13 % of the tokens this run holds: pressure on every tier (drop cost 1: with the default 2 and these
    # synthetic distortions every kept token ends in the cheapest tier)
    cache = make("spherical", 0.04, n_ctx=2000, drop_cost=1.0)
    rng = np.random.default_rng(1)
    run_ops(cache, [64] * 4 + [1] * 300, rng)
    st_ = cache.stats(per_head=True)
    assert st_["bytes_used"] <= cache.budget
    assert st_["tokens_by_tier"][cache.pools[DENSE].tier.name] >= L * H * (cache.policy.sinks + cache.policy.window)
    assert sum(v > 0 for v in st_["tokens_by_tier"].values()) >= 3  # dense + at least two ADA tiers
    assert cache.allocator_runs > 0


@pytest.mark.parametrize("policy,budget", [("spherical", 0.1), ("snapkv", 0.1), ("spherical", 0.2)])
def test_a_stale_multiplier_does_not_idle_the_budget(policy, budget):
    """Decode departures take their tiers at the last search's multiplier without a search while nothing may be
    dropped (spherical at 0.2: keep_if_fits); when that multiplier is stale (here: far too high, so every
    departure would go to the cheapest tier or be dropped, leaving frames idle), the round searches instead, and
    the frames are used again. While the allocator may drop, every round searches."""
    cache = make(policy, budget, n_ctx=1500)
    rng = np.random.default_rng(6)
    while not cache._lam and cache.offset < 1200:  # until the budget binds
        run_ops(cache, [16], rng)
    assert cache._lam, "the budget binds"
    assert cache._allow_drop == (budget < 0.2)
    stale = cache._lam * 1e6
    cache._lam = stale
    runs = cache.allocator_runs
    run_ops(cache, [1] * (cache.batch + 1), rng)  # at least one decode round
    assert cache.allocator_runs > runs and cache._lam < stale
    idle = cache.arena.n_free + int(cache._waste().sum())
    assert idle <= cache._ahead_cap() + L * H * len(cache.pools), idle


@pytest.mark.parametrize("policy,budget,ladder", [("spherical", 0.1, LADDER), ("h2o", 0.1, LADDER),
                                                  ("spherical", 0.3, DENSE_LADDER)])
def test_decode_attention_reads_exactly_what_is_held(policy, budget, ladder):
    """After compression, the decode path (C and NumPy) equals brute-force attention over the held tokens
    as their tiers reconstruct them; dropped tokens contribute nothing."""
    cache = make(policy, budget, n_ctx=1500, ladder=ladder)
    rng = np.random.default_rng(2)
    run_ops(cache, [40, 40, 40, 30, 1, 1, 1], rng)
    q = rng.normal(size=(H * 3, 1, D)).astype(np.float32)
    qpos = np.array([cache.offset])
    for layer in range(L):
        outs = []
        for use_c in ([True, False] if ckernels.lib() is not None else [False]):
            cache.use_c = use_c
            outs.append(cache.attend(layer, q, qpos))
        for h in range(H):
            ks, vs = [], []
            ids, tiers = cache.table.pages(layer, h)
            for pid, t in zip(ids, tiers):
                f = int(cache.arena.fill[pid])
                k, v = cache._read_page(int(t), int(pid), f, (layer, h))
                ks.append(k)
                vs.append(v)
            k, v = np.concatenate(ks), np.concatenate(vs)
            ref = attend_dense(q[h * 3 : (h + 1) * 3], k, v, np.zeros(len(k), np.int32), qpos, D ** -0.5)
            for out in outs:
                np.testing.assert_allclose(out[h * 3 : (h + 1) * 3], ref, atol=3e-5)


def stored_tokens(cache):
    """{(layer, h, position): (tier, k, v)} of every held token, as its tier reconstructs it."""
    out = {}
    for layer in range(L):
        for h in range(H):
            ids, tiers = cache.table.pages(layer, h)
            for pid, t in zip(ids, tiers):
                f = int(cache.arena.fill[pid])
                k, v = cache._read_page(int(t), int(pid), f, (layer, h))
                for j, p in enumerate(cache.pools[t].positions[pid, :f]):
                    out[(layer, h, int(p))] = (int(t), k[j], v[j])
    return out


def test_reclaim_merges_holes_into_frames_and_loses_no_token():
    """Demotions and drops leave holes in old-tier pages; _reclaim merges them into free frames only when asked,
    keeping every token in its tier with its value codes, and its key up to re-quantisation in a fresh frame."""
    cache = make("spherical", 0.25, n_ctx=1500)
    rng = np.random.default_rng(5)
    run_ops(cache, [60] * 6, rng)
    # punch holes: drop every other token of every old-tier page (the way demotions leave them)
    for layer in range(L):
        for h in range(H):
            i = 0
            while i < cache.table.n_pages[layer, h]:
                t, pid = int(cache.table.page_tiers[layer, h, i]), int(cache.table.page_ids[layer, h, i])
                f = int(cache.arena.fill[pid])
                out = (np.arange(f) % 2 == 1) if t != DENSE and f > 1 else np.zeros(f, bool)
                if not (out.any() and cache._remove_slots(layer, h, i, cache.pools[t], pid, out)):
                    i += 1
    waste = int(cache._waste().sum())
    assert waste >= 2, "the test needs pages to merge"
    before = stored_tokens(cache)
    free0 = cache.arena.n_free
    cache._reclaim(free0 + waste)
    assert cache.arena.n_free == free0 + waste and not cache._waste().any()
    check(cache, {})
    after = stored_tokens(cache)
    assert {x: a[0] for x, a in after.items()} == {x: b[0] for x, b in before.items()}  # every token, same tier
    for x, (t, k, v) in after.items():
        k0, v0 = before[x][1:]
        np.testing.assert_allclose(v, v0, atol=2e-3)  # per-token value codes re-encode to themselves
        assert np.linalg.norm(k - k0) <= 0.5 * np.linalg.norm(k0)  # keys re-quantised in the merged page's frame
    cache._reclaim(cache.arena.n_frames)  # nothing left to merge: returns, frees nothing more
    assert cache.arena.n_free == free0 + waste


def test_kernel_mass_equals_numpy_mass():
    """The decode kernel's attention mass (utility) equals the NumPy path's, slot by slot."""
    if ckernels.lib() is None:
        pytest.skip("C kernels unavailable")
    caches = [make("spherical", 0.1, n_ctx=1500, seed=3) for _ in range(2)]
    for c, use_c in zip(caches, (True, False)):
        rng = np.random.default_rng(4)
        run_ops(c, [40, 40, 40], rng)
        c.use_c = use_c
        for _ in range(3):
            for layer in range(L):
                c.attend(layer, rng.normal(size=(H * 3, 1, D)).astype(np.float32), np.array([c.offset]))
    a, b = caches
    for t in range(len(a.pools)):
        mine = a.arena.owner == t
        assert (mine == (b.arena.owner == t)).all()
        # float16 sums, rounded stochastically: equal but where the float32 weights differ next to a threshold
        assert (a.pools[t].mass[mine] == b.pools[t].mass[mine]).sum() >= 0.99 * a.pools[t].mass[mine].size
        np.testing.assert_allclose(a.pools[t].mass[mine], b.pools[t].mass[mine], rtol=2.0**-10, atol=2.0**-24)


def test_deterministic():
    runs = []
    for _ in range(2):
        cache = make("spherical", 0.1, n_ctx=1500)
        run_ops(cache, [33, 40, 17, 1, 1, 50], np.random.default_rng(7))
        runs.append((cache.table.page_ids.copy(), cache.table.page_tiers.copy(), cache.arena.buf.copy()))
    for x, y in zip(*runs):
        assert (x == y).all()


def test_budget_syntax_and_minimum():
    full = 1000
    assert parse_budget("25%", full) == 250 and parse_budget("0.5", full) == 500 and parse_budget(0.1, full) == 100
    assert parse_budget("64MiB", full) == 64 * 2**20 and parse_budget("2kb", full) == 2000
    assert parse_budget("123456", full) == 123456 and parse_budget(4096, full) == 4096
    for bad in ("25 percent", "-3%", "150%", "MiB", ""):
        with pytest.raises(InputError, match="kv-budget"):
            parse_budget(bad, full)
    with pytest.raises(InputError, match=r"at least [\d,]+ bytes"):
        make("spherical", 0.01)
    with pytest.raises(InputError, match="needs a --kv-budget"):
        make_policy("h2o")
    with pytest.raises(InputError, match="valid: .*spherical"):
        make_policy("lru")
    for bad in ({"keep_if_fits": "maybe"}, {"drop_cost": 0}, {"util_floor": -1}):
        with pytest.raises(InputError, match="|".join(bad)):
            make("spherical", 0.25, **bad)
    assert make("spherical", 0.25, keep_if_fits="off").policy.keep_if_fits is False


def test_ladder_with_a_dense_old_tier():
    """`dense` first in the ladder: old tokens may stay dense (distortion 0) in their own pool, in frames sized by
    the richest coded tier; stats name the two dense pools apart; dense elsewhere in the ladder is refused."""
    coded, mixed = make("spherical", 0.5, n_ctx=1500), make("spherical", 0.5, n_ctx=1500, ladder=DENSE_LADDER)
    assert mixed.arena.frame_bytes == coded.arena.frame_bytes
    assert [type(p.tier).__name__ for p in mixed.pools] == ["DenseTier", "DenseTier", "AdaTier", "AdaTier", "AdaTier"]
    assert mixed.pools[1].page_size == mixed.pools[DENSE].page_size
    d = mixed._distortion()
    assert (d[:, 0] == 0).all() and np.allclose(d[:, 1:], coded._distortion())
    run_ops(mixed, [64] * 12, np.random.default_rng(3))
    st_ = mixed.stats(per_head=True)
    assert list(st_["pages_by_tier"]) == [p.label for p in mixed.pools] and len(set(st_["pages_by_tier"])) == 5
    assert mixed.pools[1].label == "old-" + mixed.pools[DENSE].label
    assert st_["tokens_by_tier"][mixed.pools[1].label] > 0, "at half the fp16 bytes some old tokens stay dense"
    assert sum(st_["pages_by_tier"].values()) == st_["pages_used"]
    for bad in ("192:4,dense", "dense,dense,96:4", "dense:4", "192:3"):
        with pytest.raises(InputError, match="bad ladder"):
            make("spherical", 0.25, ladder=bad)


def test_default_ladder_takes_the_steps_the_budget_calls_for():
    """The default ladder (dense + the coded steps): when the budget holds the whole context at the richest coded
    tier, dense and that tier only (the cheaper steps would only pay for dense old tokens); below that, the coded
    steps (a dense step would only hold tokens while the budget is loose). An explicit ladder is kept whole."""
    def pools(budget, ladder=None, n_ctx=1500):
        return [p.label for p in make("spherical", budget, n_ctx=n_ctx, ladder=ladder).pools]

    coded = ["dense-float32", *(f"ada{kb}-v{vb}" for kb, vb in DEFAULT_LADDER)]
    assert len(coded) > 2  # a cheaper step to leave out
    assert pools(0.25) == pools(0.3) == coded
    assert pools(0.5) == pools(0.8) == [coded[0], "old-dense-float32", coded[1]]
    explicit = "dense," + ",".join(x.split("ada")[1].replace("-v", ":") for x in coded[1:])
    assert pools(0.25, explicit) == pools(0.5, explicit) == [coded[0], "old-dense-float32", *coded[1:]]
    full = make("spherical", 0.5, n_ctx=1500, ladder=explicit).policy.distortion
    for budget, old in ((0.5, [0, 1]), (0.25, list(range(1, len(coded))))):
        cache = make("spherical", budget, n_ctx=1500, ladder=None)
        np.testing.assert_array_equal(cache.policy.distortion, full[..., old])  # each tier keeps its distortion
        assert len(cache.policy.old_tiers) == len(cache.pools) - 1 == len(old)
        run_ops(cache, [64] * 6, np.random.default_rng(4))
    # at the smallest budget that takes dense + the richest coded tier, a whole context fits: nothing is dropped
    def rich(budget):
        return pools(budget, n_ctx=700)[1] == "old-dense-float32"

    lo, hi = 0.25, 0.5
    assert not rich(lo) and rich(hi)
    while hi - lo > 1e-4:
        lo, hi = (lo, (lo + hi) / 2) if rich((lo + hi) / 2) else ((lo + hi) / 2, hi)
    cache = make("spherical", hi, n_ctx=700, ladder=None)
    history = run_ops(cache, [32] * 10 + [1] * 380, np.random.default_rng(6))
    assert cache.offset == 700 and 99 not in history.values()


def test_budgeted_pages_keep_short_positions_only_while_the_context_fits_them():
    """Budgeted (CPU-only) caches store slot positions as int16 when every position of the context fits, which
    leaves 2 bytes per token to the codes; longer contexts and the fifo policies (whose pages the CUDA kernels
    read) keep int32. Both widths hold the same tokens under the same random use."""
    for n_ctx, want in ((1500, np.int16), (32767, np.int16), (32768, np.int32), (100_000, np.int32)):
        cache = make("spherical", 0.25, n_ctx=n_ctx)
        assert {p.positions.dtype for p in cache.pools} == {np.dtype(want)}
        assert np.iinfo(want).max >= n_ctx - 1, "a position of the context would not fit"
    wide, short = make("spherical", 0.25, n_ctx=40_000), make("spherical", 0.25, n_ctx=1500)
    assert short.arena.frame_bytes < wide.arena.frame_bytes  # the same ladder: only the positions shrank
    assert all(a.page_size >= b.page_size for a, b in zip(short.pools, wide.pools))
    fifo = PagedKVCache(L, H, D, n_ctx=1500, policy=make_policy("ada", calibration=calibration(np.random.default_rng(0))))
    assert {p.positions.dtype for p in fifo.pools} == {np.dtype(np.int32)}
    # the same ops on both widths: every invariant holds (positions read back exactly, never a wrapped one)
    for cache in (wide, short):
        history = run_ops(cache, [64] * 8 + [1] * 40, np.random.default_rng(5))
        assert max(q for (_, _, q), t in history.items() if t != 99) == cache.offset - 1
