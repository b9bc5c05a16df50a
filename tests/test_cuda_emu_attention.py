"""The CUDA decode kernels (kernels_cu/dense_decode.cu, ada_decode.cu), run unmodified on the CPU by the
project's CUDA emulator (skvrt/cuda/emu) through the same launch code as on a GPU (skvrt/cuda/attention.py,
xp = numpy), against the NumPy twins: PagedKVCache._scores + softmax_attend (ADA pages: AdaTier.scores /
read_values). Every case runs under the three thread orders (forward, reverse, seeded random).

Caches are built the way the model builds them (tests/test_ckernels_ada.py build_cache / scramble: chunked
appends, old tokens moved to ADA pages, pages shuffled in each head's table, some ADA pages compacted to odd
fills, every float slot past fill NaN), over the frame arena (strided pools, per-tier page sizes). Lengths are
never multiples of the page size; the split-K grid is forced to several splits, some of them empty.

Tolerance atol = rtol = 1e-4, as for the C kernels (test_ckernels_ada.py): the kernels sum in float32 in
another order than NumPy, the ADA LUT uses a Cody-Waite + Taylor sincos (~1e-7) instead of np.cos / np.sin,
and exp / log are the emulator's expf / logf (the GPU's __expf differs by a few ulp, within the same bound).
"""

from __future__ import annotations

import numpy as np
import pytest

from skvrt.calibrate import Calibration
from skvrt.cuda import attention as cuda_attention
from skvrt.cuda import emu
from skvrt.kv import make_policy, slot_mass
from skvrt.kv.ada import AdaTier
from skvrt.kv.attention import softmax_attend
from skvrt.kv.cache import PagedKVCache

from .test_ckernels_ada import build_cache, random_keys, scramble

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no g++ for the CUDA emulator")

ATOL = RTOL = 1e-4


@pytest.fixture(params=emu.ORDERS)
def module(request):
    """The emulator's module factory under one thread order."""
    return emu.factory(request.param, seed=7)


@pytest.fixture(scope="module")
def report(request):
    """Rows (test, layer, max |error| of out, of page mass), written to the terminal when the module ends."""
    rows: list[tuple] = []
    yield rows
    plugins = request.config.pluginmanager
    tr = plugins.get_plugin("terminalreporter")
    if rows and tr is not None:
        with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
            tr.write_line("")
            tr.write_line("CUDA kernels emulated (max |kernel - NumPy twin| per layer; tolerance 1e-4):")
            for name, layer, e_out, e_mass in rows:
                tr.write_line(f"  {name} layer {layer}: out {e_out:.1e}, page mass {e_mass:.1e}")


@pytest.fixture
def record(request, report):
    return lambda layer, e_out, e_mass: report.append((request.node.name, layer, e_out, e_mass))


def twin(cache, layer, q, seed=0):
    """NumPy path for one decode step: q (nq, D) -> out (nq, D), slot mass {(pool, pid): (fill,)} (float16, a
    step added to zero with the stochastic rounding of seed: kv/slot_mass.py), and the per-table-entry mass
    (H, max_pages) (softmax weights summed over each KV head's G query heads)."""
    H, t = cache.n_kv_heads, cache.table
    G = q.shape[0] // H
    out = np.empty_like(q)
    slot, page = {}, np.zeros((H, t.max_pages), np.float32)
    for h in range(H):
        s, v, kpos, where = cache._scores(layer, h, q[h * G : (h + 1) * G, None])
        out[h * G : (h + 1) * G] = softmax_attend(s, v, kpos, np.array([10**9]))[:, 0]
        p = np.exp(s[:, 0] - s[:, 0].max(-1, keepdims=True))
        m = (p / p.sum(-1, keepdims=True)).sum(0)  # (N,) summed over the group
        o = 0
        ids, tiers = t.pages(layer, h)
        for pool, pids, valid in where:
            for pid, row in zip(pids, valid):
                n = int(row.sum())
                slot[(pool.index, int(pid))] = slot_mass.accumulate(
                    np.zeros(n, np.float16), m[o : o + n], slot_mass.slot_keys(np.full(n, pid), np.arange(n), seed))
                pi = int(np.nonzero((ids == pid) & (tiers == pool.index))[0][0])
                page[h, pi] = m[o : o + n].sum()
                o += n
    return out, slot, page


def gpu_tiers(cache, layer, with_mass, seed=0):
    tiers = []
    for i, pool in enumerate(cache.pools):
        mass = pool.mass if with_mass else None
        if isinstance(pool.tier, AdaTier):
            ba, br = pool.tier.widths_at(layer)
            tiers.append(cuda_attention.ada_tier(np, pool.data, ba, br, pool.tier.v_bits, pool.tier.v_group, mass,
                                                 seed))
        else:
            tiers.append(cuda_attention.dense_tier(np, pool.k, pool.v, mass, seed))
    return tiers


def check(module, record, cache, rng, G, pages_per_split=2, with_mass=True):
    """Every layer: output, slot mass and page mass of the kernel against the twin."""
    H, D, t = cache.n_kv_heads, cache.head_dim, cache.table
    for layer in range(cache.n_layers):
        seed = 1000 + 7 * layer  # the slot mass's rounding seed (the observing query's position in the cache)
        q = rng.normal(0, 1, (H * G, D)).astype(np.float32)
        out = np.full_like(q, np.nan)
        page_mass = np.full((H, t.max_pages), np.nan, np.float32)
        for pool in cache.pools:
            if pool.mass is not None:
                pool.mass[:] = 0
        args = (np.ascontiguousarray(t.page_ids[layer]), np.ascontiguousarray(t.n_pages[layer]))
        used = int(t.n_pages[layer].max())
        if len(cache.pools) == 1:
            pool = cache.pools[0]
            cuda_attention.dense_decode(module, np, q, pool.k, pool.v, pool.fill, *args, cache.scale, out,
                                        slot_mass=pool.mass if with_mass else None, page_mass=page_mass,
                                        max_pages_used=used + 1, pages_per_split=pages_per_split, mass_seed=seed)
        else:
            cuda_attention.ada_decode(module, np, q, gpu_tiers(cache, layer, with_mass, seed), cache.arena.fill,
                                      args[0], np.ascontiguousarray(t.page_tiers[layer]), args[1], cache.scale,
                                      out, page_mass=page_mass, max_pages_used=used + 1,
                                      pages_per_split=pages_per_split)
        want, slot, page = twin(cache, layer, q, seed)
        assert np.isfinite(out).all(), "the kernel read a NaN-poisoned slot"
        np.testing.assert_allclose(out, want, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(page_mass, page, atol=ATOL, rtol=RTOL)
        record(layer, float(np.abs(out - want).max()), float(np.abs(page_mass - page).max()))
        n_slots = n_equal = 0
        for (i, pid), m in slot.items():
            if with_mass and cache.pools[i].mass is not None:
                # float16: the same stochastic rounding as the twin, but where the kernel's float32 weight (its own
                # exp and summation order) crosses a rounding threshold the twin's does not: one float16 step
                np.testing.assert_allclose(cache.pools[i].mass[pid, : len(m)], m, atol=2.0**-24, rtol=2.0**-10)
                n_slots += len(m)
                n_equal += int((cache.pools[i].mass[pid, : len(m)] == m).sum())
        assert n_equal >= 0.98 * n_slots


def dense_cache(rng, H, D, P, T):
    cache = PagedKVCache(2, H, D, n_ctx=T + 8, kv_dtype="float16", page_size=P)
    for layer in range(2):
        cache.append(layer, rng.normal(size=(H, T, D)).astype(np.float32), rng.normal(size=(H, T, D)).astype(np.float32))
    cache.advance(T)
    return cache


DENSE_CASES = [  # H, G, D, P, T
    (2, 1, 64, 16, 75),
    (1, 3, 128, 16, 53),
    (2, 8, 64, 32, 90),
]


@pytest.mark.parametrize("H,G,D,P,T", DENSE_CASES)
def test_dense_decode_matches_twin(module, record, H, G, D, P, T):
    rng = np.random.default_rng(H * 100 + G * 10 + D + P + T)
    cache = dense_cache(rng, H, D, P, T)
    assert T % P
    scramble(rng, cache)
    check(module, record, cache, rng, G, with_mass=False)


def test_dense_decode_many_splits(module, record):
    """More splits than decode_combine merges per round (COMBINE_CH = 32): 45 pages, one per block."""
    rng = np.random.default_rng(8)
    cache = dense_cache(rng, 1, 64, 16, 711)
    scramble(rng, cache)
    check(module, record, cache, rng, 3, pages_per_split=1, with_mass=False)


ADA_CASES = [  # H, G, D, P, T, key bits, v bits, v group
    (2, 1, 64, 16, 150, 64, 2, 32),
    (1, 1, 128, 32, 111, 256, 8, 64),
    (2, 3, 64, 16, 117, 40, 4, 16),  # 5-byte code rows: fields straddle bytes, no word alignment
    (1, 3, 128, 64, 203, 192, 4, 32),
    (1, 8, 64, 64, 171, 128, 8, 8),
    (1, 8, 128, 16, 99, 192, 2, 32),
]


@pytest.mark.parametrize("H,G,D,P,T,key_bits,vb,vg", ADA_CASES)
def test_ada_decode_matches_twin(module, record, H, G, D, P, T, key_bits, vb, vg):
    rng = np.random.default_rng(H * 1000 + G * 100 + D + P + T + key_bits + vb)
    cache = build_cache(rng, 1, H, D, P, T, key_bits, vb, "float16", window=16, skew=key_bits in (40, 192),
                        v_group=vg)
    assert T % P and (cache.table.page_tiers == 1).any() and (cache.table.page_tiers == 0).any()
    scramble(rng, cache)
    check(module, record, cache, rng, G, pages_per_split=3)


@pytest.mark.parametrize("key_bits", [64, 192])
def test_ada_decode_polar_widths(module, record, key_bits):
    """Angle and radius widths chosen separately (a sidecar with error tables): uneven splits, 0-bit angles."""
    rng = np.random.default_rng(key_bits + 7)
    cache = build_cache(rng, 1, 2, 64, 16, 140, key_bits, 4, "float16", window=16, polar=True)
    ba, br = cache.pools[1].tier.widths_at()
    assert ((ba == 0) & (br > 0)).any() and (ba + br).sum(-1).min() == key_bits
    scramble(rng, cache)
    check(module, record, cache, rng, 3, pages_per_split=3)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the twin decodes NaN-poisoned slots too
def test_ada_decode_several_ada_tiers_and_slot_mass(module, record):
    """A spherical (RDR) cache: dense pages of 5 tokens and two ADA tiers of other key bits, value bits and
    page sizes (6-byte code rows) in one table, with the per-slot mass fields of every pool."""
    rng = np.random.default_rng(4)
    L, H, D, G, T = 1, 2, 64, 3, 300
    cal = Calibration(*(rng.uniform(0.1, 2, (L, H, D)).astype(np.float32) for _ in range(2)), {})
    pol = make_policy("spherical", sinks=2, window=8, budget=0.4, calibration=cal, ladder="192:4,96:4,48:2",
                      kv_dtype="float16")
    cache = PagedKVCache(L, H, D, n_ctx=T + 8, kv_dtype="float16", page_size=16, policy=pol)
    K = np.stack([random_keys(rng, T, D) for _ in range(H)])
    V, Q = rng.normal(size=(H, T, D)).astype(np.float32), rng.normal(size=(H * G, T, D)).astype(np.float32)
    for s in range(0, T, 37):  # the model's order: the chunk's attention observes mass, then RDR reassigns
        cache.append(0, K[:, s : s + 37], V[:, s : s + 37])
        cache.attend(0, Q[:, s : s + 37], np.arange(s, min(s + 37, T)))
        cache.advance(min(37, T - s))
    used = set(cache.table.page_tiers[0][: cache.table.n_pages[0].max()].ravel().tolist()) - {-1}
    assert {0, 2, 3} <= used and len({p.page_size for p in cache.pools}) == 4
    scramble(rng, cache, compact=False)
    check(module, record, cache, rng, G, pages_per_split=2)


def test_empty_table_gives_zeros(module):
    rng = np.random.default_rng(3)
    cache = build_cache(rng, 1, 2, 64, 16, 90, 128, 4, "float16")
    cache.table.n_pages[:] = 0
    q = rng.normal(size=(4, 64)).astype(np.float32)
    out = np.full_like(q, np.nan)
    mass = np.full((2, cache.table.max_pages), np.nan, np.float32)
    t = cache.table
    cuda_attention.ada_decode(module, np, q, gpu_tiers(cache, 0, False), cache.arena.fill, t.page_ids[0],
                              t.page_tiers[0], t.n_pages[0], cache.scale, out, page_mass=mass)
    assert (out == 0).all() and (mass == 0).all()


def test_launch_checks_reject_bad_inputs(module):
    """Wrong shapes, strides, widths or scalar types fail before any launch, with the reason."""
    rng = np.random.default_rng(5)
    cache = build_cache(rng, 1, 2, 64, 16, 90, 128, 4, "float16")
    t, pool = cache.table, cache.pools[0]
    q, out = rng.normal(size=(4, 64)).astype(np.float32), np.empty((4, 64), np.float32)
    ids, n = t.page_ids[0], t.n_pages[0]
    with pytest.raises(ValueError, match="group size"):
        cuda_attention.dense_decode(module, np, rng.normal(size=(34, 64)).astype(np.float32), pool.k, pool.v,
                                    pool.fill, ids, n, 1.0, np.empty((34, 64), np.float32))
    with pytest.raises(ValueError, match="head_dim"):
        cuda_attention.dense_decode(module, np, q[:, :48].copy(), pool.k, pool.v, pool.fill, ids, n, 1.0, out)
    with pytest.raises(ValueError, match="strides"):
        cuda_attention.dense_decode(module, np, q, pool.k[:, ::2], pool.v[:, ::2], pool.fill, ids, n, 1.0, out)
    ada = cache.pools[1]
    ba, br = ada.tier.widths_at(0)
    ba[0, 0] = 13
    with pytest.raises(ValueError, match="12 bits"):
        cuda_attention.ada_tier(np, ada.data, ba, br, 4, 32)
    fn = module("dense_decode", {"HEAD_DIM": 64, "GQA": 2, "MAX_PAGE": 16}).get_function("decode_combine")
    with pytest.raises(TypeError, match="np.int32"):  # a Python int: CuPy would pass 64 bits
        fn((1,), (128,), (None,) * 9 + (3, np.int32(1), out, None))
