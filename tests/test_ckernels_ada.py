"""The mixed dense + ADA decode kernel (kernels_c/attention_ada.c) against its NumPy twin
(PagedKVCache._scores + softmax_attend, i.e. AdaTier.scores / read_values for ADA pages).

Caches are built the way the model builds them (appends in chunks, so old tokens move to ADA pages), then
pages are shuffled within each head's table, some ADA pages are compacted to odd fills, and every float
slot past fill (dense k / v, ADA v_min / v_scale) is poisoned with NaN.

Tolerance: outputs are compared with atol = rtol = 1e-4 (observed max error ~1e-6 on outputs of magnitude ~0.5). The NumPy twin sums
the ADA logit in float64 over float32 LUT entries and uses np.cos / np.sin; the kernel sums in float32 in a
different order and evaluates cos / sin with its own vectorised sincos (|err| ~1e-7 on angles <= ~3 pi), plus a
rotation by 8 gamma per further block of 8 LUT entries (<= 7 steps, ~1e-7 each):
logit errors of ~1e-6 relative, which the softmax turns into output errors of the same order.
"""

from __future__ import annotations

import numpy as np
import pytest

from skvrt import ckernels
from skvrt.calibrate import Calibration
from skvrt.kv import make_policy
from skvrt.kv.ada import MAX_WIDTH, split_bits
from skvrt.kv.attention import softmax_attend
from skvrt.kv.cache import PagedKVCache

pytestmark = pytest.mark.skipif(ckernels.lib() is None, reason=f"C kernels unavailable: {ckernels.build_error}")

ATOL = RTOL = 1e-4


def random_keys(rng, n, D):
    h2 = D // 2
    ang = rng.uniform(-np.pi, np.pi, h2) + rng.normal(0, 0.6, (n, h2))
    rad = rng.uniform(0.2, 4, h2) * rng.lognormal(0, 0.3, (n, h2))
    return np.concatenate([rad * np.cos(ang), rad * np.sin(ang)], axis=1).astype(np.float32)


def polar_tables(rng, L, H, D):
    """Error tables like a sidecar's (angle_err, radius_err (L, H, D/2, MAX_WIDTH + 1), falling ~4x per bit, pair
    scales over decades): the allocation splits pairs unevenly (6-bit angles beside 0-bit radii and back)."""
    b = np.arange(MAX_WIDTH + 1)
    return tuple((rng.lognormal(0, 2.5, (L, H, D // 2, 1)) * 4.0 ** -b).astype(np.float32) for _ in range(2))


def build_cache(rng, L, H, D, P, T, tier, vb, dtype, sinks=4, window=24, chunk=37, skew=False, v_group=32,
                polar=False):
    """skew: calibration statistics spread over decades, so the allocation gives some pairs 0 bits and others
    up to 12 (angle fields of 5-6 bits take the kernel's wide-LUT lookups). polar: the calibration has error
    tables, so angle and radius widths are chosen separately (allocate_polar_bits)."""
    stat = (lambda: rng.lognormal(0, 2.5, (L, H, D))) if skew else (lambda: rng.uniform(0.1, 2, (L, H, D)))
    cal = Calibration(stat().astype(np.float32), stat().astype(np.float32), {})
    if polar:
        cal.angle_err, cal.radius_err = polar_tables(rng, L, H, D)
    pol = make_policy("ada", sinks=sinks, window=window, tier=tier, v_bits=vb, v_group=v_group, calibration=cal)
    cache = PagedKVCache(L, H, D, n_ctx=T + 8, kv_dtype=dtype, page_size=P, policy=pol)
    kv = [(np.stack([random_keys(rng, T, D) for _ in range(H)]), rng.normal(size=(H, T, D)).astype(np.float32))
          for _ in range(L)]
    for s in range(0, T, chunk):
        for layer, (K, V) in enumerate(kv):
            cache.append(layer, K[:, s : s + chunk], V[:, s : s + chunk])
        cache.advance(min(chunk, T - s))
    return cache


def scramble(rng, cache, compact=True):
    """Shuffle each head's pages; compact some ADA pages to odd fills; poison every unused float slot."""
    t = cache.table
    for layer in range(cache.n_layers):
        for h in range(cache.n_kv_heads):
            n = t.n_pages[layer, h]
            order = rng.permutation(n)
            t.page_ids[layer, h, :n] = t.page_ids[layer, h, :n][order]
            t.page_tiers[layer, h, :n] = t.page_tiers[layer, h, :n][order]
    if compact and len(cache.pools) > 1:
        ada = cache.pools[1]
        used = [p for p in range(ada.n_pages) if ada.in_use(p)]
        for pid in rng.choice(used, size=min(3, len(used)), replace=False):
            f = int(ada.fill[pid])
            keep = rng.random(f) < 0.6
            keep[0] = True
            ada.compact(int(pid), keep)
    for pool in cache.pools:
        pool.poison_unused()


def twin(cache, layer, q):
    """NumPy path: (nq, D) -> (nq, D)."""
    H = cache.n_kv_heads
    G = q.shape[0] // H
    out = np.empty_like(q)
    for h in range(H):
        s, v, kpos, _ = cache._scores(layer, h, q[h * G : (h + 1) * G, None])
        out[h * G : (h + 1) * G] = softmax_attend(s, v, kpos, np.array([10**9]))[:, 0]
    return out


def kernel(cache, layer, q, L=None, with_mass=False):
    """The C path for one layer: paged_decode over every pool's descriptor."""
    out = np.full_like(q, np.nan)
    t = cache.table
    descs = [ckernels.tier_desc(p, layer, cache._ada_bits.get(i), with_mass) for i, p in enumerate(cache.pools)]
    ckernels.paged_decode(q, descs, cache.arena.fill, t.page_ids[layer], t.page_tiers[layer], t.n_pages[layer],
                          cache.scale, out, L=L)
    return out


def check(cache, rng, G, L=None):
    H, D = cache.n_kv_heads, cache.head_dim
    for layer in range(cache.n_layers):
        q = rng.normal(0, 1, (H * G, D)).astype(np.float32)
        got = kernel(cache, layer, q, L)
        assert np.isfinite(got).all(), "the kernel read a NaN-poisoned slot"
        np.testing.assert_allclose(got, twin(cache, layer, q), atol=ATOL, rtol=RTOL)


CASES = [  # H, G, D, P, T, key bits, v bits, dense dtype
    (3, 3, 64, 64, 333, 192, 4, "float16"),
    (3, 3, 64, 16, 201, 128, 4, "float32"),
    (2, 1, 64, 16, 150, 64, 2, "float16"),
    (2, 1, 128, 64, 300, 256, 8, "float32"),
    (1, 8, 128, 16, 171, 192, 2, "float16"),
    (2, 8, 64, 64, 290, 256, 4, "float32"),
    (1, 8, 64, 16, 99, 128, 8, "float16"),
    (4, 3, 128, 16, 123, 64, 4, "float16"),
    (1, 3, 128, 64, 260, 128, 2, "float32"),
    (2, 1, 128, 16, 77, 192, 8, "float16"),
]


@pytest.mark.parametrize("H,G,D,P,T,key_bits,vb,dtype", CASES)
def test_mixed_decode_matches_numpy_twin(H, G, D, P, T, key_bits, vb, dtype, klib):
    rng = np.random.default_rng(H * 1000 + G * 100 + D + P + T + key_bits + vb)
    cache = build_cache(rng, 2, H, D, P, T, key_bits, vb, dtype)
    assert T % P and (cache.table.page_tiers == 1).any() and (cache.table.page_tiers == 0).any()
    scramble(rng, cache)
    check(cache, rng, G, klib)


@pytest.mark.parametrize("key_bits", [64, 128, 192, 256])
@pytest.mark.parametrize("vb", [2, 4, 8])
@pytest.mark.parametrize("vg", [8, 16, 32, 64])  # value groups: the 8- / 16-dim chunk runs of each ISA path
def test_mixed_decode_tiers_and_value_bits(key_bits, vb, vg, klib):
    rng = np.random.default_rng(key_bits * 10 + vb + vg)
    cache = build_cache(rng, 1, 2, 64, 16, 117, key_bits, vb, "float16", window=16, v_group=vg)
    assert cache.pools[1].tier.v_group == vg
    scramble(rng, cache)
    check(cache, rng, G=3, L=klib)


@pytest.mark.parametrize("key_bits", [40, 72, 128, 192, 256])  # 40, 72: rows of 5 / 9 bytes (no dword reads)
@pytest.mark.parametrize("D", [64, 128])
def test_mixed_decode_skewed_allocation(key_bits, D, klib):
    rng = np.random.default_rng(key_bits + D)
    cache = build_cache(rng, 1, 2, D, 16, 150, key_bits, 4, "float16", window=16, skew=True)
    ba, br = cache.pools[1].tier.widths_at()
    assert (ba == 0).any() if key_bits <= 128 else ba.max() >= 6
    scramble(rng, cache)
    check(cache, rng, G=4, L=klib)


@pytest.mark.parametrize("key_bits", [64, 128, 256])
@pytest.mark.parametrize("D", [64, 128])
def test_mixed_decode_polar_widths(key_bits, D, klib):
    rng = np.random.default_rng(key_bits + D + 1)
    cache = build_cache(rng, 2, 2, D, 16, 150, key_bits, 4, "float16", window=16, polar=True)
    ba, br = cache.pools[1].tier.widths_at()
    assert (ba != split_bits(ba + br)[0]).any() and ((ba == 0) & (br > 0)).any() and (ba + br).sum(-1).min() == key_bits
    scramble(rng, cache)
    check(cache, rng, G=3, L=klib)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_head_without_ada_pages_and_head_with_only_ada_pages(dtype):
    rng = np.random.default_rng(5)
    cache = build_cache(rng, 1, 3, 64, 16, 140, 192, 4, dtype)
    t = cache.table
    for h, drop in ((0, 1), (1, 0)):  # head 0: dense pages only; head 1: ADA pages only
        i = 0
        while i < t.n_pages[0, h]:
            if t.page_tiers[0, h, i] == drop:
                t.remove(0, h, i)
            else:
                i += 1
    assert (t.page_tiers[0, 0, : t.n_pages[0, 0]] == 0).all()
    assert (t.page_tiers[0, 1, : t.n_pages[0, 1]] == 1).all() and t.n_pages[0, 1] > 0
    scramble(rng, cache)
    check(cache, rng, G=3)


def test_never_reads_past_fill(klib):
    """Partly filled pages of both tiers (fills not multiples of the 8-token SIMD block) with every float slot
    past fill NaN and the integer codes past fill random garbage."""
    rng = np.random.default_rng(11)
    cache = build_cache(rng, 1, 2, 64, 64, 203, 128, 4, "float16", window=40)
    ada = cache.pools[1]
    for pid in range(ada.n_pages):
        if ada.in_use(pid):
            keep = rng.random(int(ada.fill[pid])) < 0.5
            keep[0] = True
            ada.compact(pid, keep)
    mine = ada.arena.owner == ada.index  # frames holding ADA pages (the others hold dense pages)
    unused = (np.arange(ada.page_size)[None, :] >= ada.fill[:, None]) & mine[:, None]
    for name in ("codes", "v_codes"):
        arr = ada.data[name]
        arr[unused] = rng.integers(0, 256, arr[unused].shape, dtype=np.uint8)
    scramble(rng, cache, compact=False)
    fills = ada.fill[[p for p in range(ada.n_pages) if ada.in_use(p)]]
    assert (fills % 8 != 0).any()
    check(cache, rng, G=8, L=klib)


def test_empty_table_gives_zeros_and_limits_raise():
    rng = np.random.default_rng(3)
    cache = build_cache(rng, 1, 2, 64, 16, 90, 128, 4, "float16")
    q = rng.normal(size=(4, 64)).astype(np.float32)
    saved = cache.table.n_pages.copy()
    cache.table.n_pages[:] = 0
    assert (kernel(cache, 0, q) == 0).all()
    cache.table.n_pages[:] = saved
    t, out = cache.table, np.empty_like(q)
    ba, br = cache._ada_bits[1]
    args = (cache.arena.fill, t.page_ids[0], t.page_tiers[0], t.n_pages[0], cache.scale)
    bad = ba.copy()
    bad[0, 0, 0] = 13  # a field wider than 12 bits
    descs = [ckernels.tier_desc(cache.pools[0], 0), ckernels.tier_desc(cache.pools[1], 0, (bad, br))]
    with pytest.raises(ValueError):
        ckernels.paged_decode(q, descs, *args, out)
    descs = [ckernels.tier_desc(p, 0, cache._ada_bits.get(i)) for i, p in enumerate(cache.pools)]
    q17 = rng.normal(size=(34, 64)).astype(np.float32)  # G = 17
    with pytest.raises(ValueError):
        ckernels.paged_decode(q17, descs, *args, np.empty_like(q17))
    t.page_tiers[0, 0, 0] = 5  # no such tier
    with pytest.raises(ValueError):
        ckernels.paged_decode(q, descs, *args, out)


@pytest.mark.parametrize("key_bits,D,skew", [(192, 64, False), (128, 128, False), (72, 64, True), (256, 64, True)])
def test_ada_decode_pages_matches_numpy_twin(key_bits, D, skew, klib):
    """The prefill path's transient keys / values (C) equal AdaTier.decode_keys / read_values on every valid
    slot. Keys: the twin evaluates angles in float64, the kernel in float32 (|angle| <~ 10: ~1e-6 absolute)."""
    rng = np.random.default_rng(key_bits + D)
    cache = build_cache(rng, 1, 2, D, 16, 150, key_bits, 4, "float16", window=16, skew=skew)
    scramble(rng, cache)
    ada = cache.pools[1]
    ba, br = ada.tier.widths_at()
    for h in range(2):
        ids, tiers = cache.table.pages(0, h)
        pids = ids[tiers == 1]
        assert len(pids)
        k, v = ckernels.ada_decode_pages(ada, pids, ba[0, h], br[0, h], L=klib)
        valid = np.arange(ada.page_size)[None, :] < ada.fill[pids][:, None]
        np.testing.assert_allclose(k[valid], ada.tier.decode_keys(ada.data, pids, (0, h))[valid], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(v[valid], ada.tier.read_values(ada.data, pids)[valid], atol=1e-6, rtol=1e-6)
