"""ADA tier: bit allocation against exhaustive search, the code stream, the page-local polar codec's error
bounds, logits from codes equal to dot products with the keys the codes stand for, and the cache's ADA
attention against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skvrt.calibrate import Calibration
from skvrt.kv import make_policy
from skvrt.kv.ada import (MAX_WIDTH, AdaTier, allocate_bits, allocate_polar_bits, pack_bits, polar_error_tables,
                          split_bits, unpack_bits)
from skvrt.kv.attention import attend_dense
from skvrt.kv.cache import PagedKVCache


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 100), min_size=2, max_size=4), st.integers(0, 10))
def test_allocation_is_optimal(weights, total):
    w = np.array(weights)
    got = allocate_bits(w, total, max_bits=6)
    assert got.sum() == total
    cost = lambda b: float(np.sum(w * np.exp2(-np.asarray(b, float))))  # noqa: E731
    best = min(cost(b) for b in itertools.product(range(7), repeat=len(w)) if sum(b) == total)
    assert cost(got) <= best * (1 + 1e-9)


@given(st.lists(st.integers(0, 8), min_size=1, max_size=8), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_bit_stream_roundtrip(widths, n, seed):
    rng = np.random.default_rng(seed)
    fields = [(rng.integers(0, 1 << w, size=n) if w else np.zeros(n, np.int64), w) for w in widths]
    n_bytes = (sum(widths) + 7) // 8
    packed = pack_bits(fields, n_bytes)
    assert packed.shape == (n, n_bytes)
    for (codes, _), got in zip(fields, unpack_bits(packed, widths)):
        assert (got == codes).all()


def make_tier(L=1, H=2, D=64, key_bits=192, seed=0):
    w = np.random.default_rng(seed).uniform(0.1, 10, (L, H, D // 2))
    return AdaTier(allocate_bits(w, key_bits), v_bits=4, v_group=32)


def random_keys(rng, n, D):
    # RoPE-like: most pairs with a dominant direction per page plus spread; the first quarter rotate fast,
    # covering the whole circle within a page (span > pi); radii of varied scale
    h2 = D // 2
    ang = rng.uniform(-np.pi, np.pi, h2) + rng.normal(0, 0.6, (n, h2))
    ang[:, : h2 // 4] = rng.uniform(-np.pi, np.pi, (n, h2 // 4))
    rad = rng.uniform(0.2, 4, h2) * rng.lognormal(0, 0.3, (n, h2))
    return np.concatenate([rad * np.cos(ang), rad * np.sin(ang)], axis=1).astype(np.float32)


def test_codec_error_bounded_by_the_frame():
    rng = np.random.default_rng(1)
    D, P = 64, 64
    tier = make_tier(D=D)
    data = tier.alloc(3, P, D)
    k = random_keys(rng, P, D)
    tier.write_page(data, 2, k, rng.normal(size=(P, D)).astype(np.float32), (0, 1))
    kh = tier.decode_keys(data, np.array([2]), (0, 1))[0]
    fr = data["frame"][2].astype(np.float64)
    h2 = D // 2
    rho, rho_h = np.hypot(k[:, :h2], k[:, h2:]), np.hypot(kh[:, :h2], kh[:, h2:])
    dphi = np.abs(np.angle(np.exp(1j * (np.arctan2(k[:, h2:], k[:, :h2]) - np.arctan2(kh[:, h2:], kh[:, :h2])))))
    ba, br = tier.widths_at((0, 1))
    for i in range(h2):
        if ba[i] > 0:  # angle within half a step (plus fp16 rounding of the frame)
            # fp16 frame: theta0 off by <= 1 ulp at pi (0.002), gamma by 2**-11 relative per step
            assert dphi[:, i].max() <= fr[i, 1] / 2 + 2e-3 + 2.0 ** ba[i] * fr[i, 1] * 2**-10
        if br[i] > 0:
            assert np.abs(rho[:, i] - rho_h[:, i]).max() <= fr[i, 3] / 2 + 2**-10 * (fr[i, 2] + 2.0 ** br[i] * fr[i, 3])
    rel = np.linalg.norm(k - kh) / np.linalg.norm(k)
    assert rel < 0.25  # 3 bits per key dim on average, a quarter of the pairs spread over the whole circle


@pytest.mark.parametrize("key_bits", [64, 128, 192, 256])
def test_logits_from_codes_equal_dot_with_coded_keys(key_bits):
    rng = np.random.default_rng(key_bits)
    D, P, G, T = 64, 64, 3, 5
    tier = make_tier(key_bits=key_bits, seed=key_bits)
    data = tier.alloc(4, P, D)
    for pid in (0, 3):
        tier.write_page(data, pid, random_keys(rng, P, D), rng.normal(size=(P, D)).astype(np.float32), (0, 0))
    q = rng.normal(size=(G, T, D)).astype(np.float32)
    pids = np.array([3, 0])
    s = tier.scores(data, pids, q, (0, 0), 0.125)  # (G, T, 2, P)
    kh = tier.decode_keys(data, pids, (0, 0))  # (2, P, D)
    ref = np.einsum("gtd,npd->gtnp", q.astype(np.float64), kh.astype(np.float64)) * 0.125
    np.testing.assert_allclose(s, ref, atol=2e-4 * np.abs(ref).max())


def test_cache_ada_attention_matches_brute_force():
    L, H, G, D, P, T = 1, 2, 3, 64, 16, 170
    rng = np.random.default_rng(9)
    cal = Calibration(rng.uniform(0.1, 2, (L, H, D)).astype(np.float32),
                      rng.uniform(0.1, 2, (L, H, D)).astype(np.float32), {})
    pol = make_policy("ada", sinks=2, window=24, tier=160, v_bits=8, calibration=cal)
    cache = PagedKVCache(L, H, D, n_ctx=256, kv_dtype="float32", page_size=P, policy=pol)
    K = np.stack([random_keys(rng, T, D) for _ in range(H)])
    V = rng.normal(size=(H, T, D)).astype(np.float32)
    for s in range(0, T, 41):
        cache.append(0, K[:, s : s + 41], V[:, s : s + 41])
        cache.advance(min(41, T - s))
    q = rng.normal(size=(H * G, 1, D)).astype(np.float32)
    out = cache.attend(0, q, np.array([T]))
    tier, pool = pol.old_tier, cache.pools[1]
    for h in range(H):
        ids, tiers = cache.table.pages(0, h)
        ada_ids = ids[tiers == 1]
        kd = tier.decode_keys(pool.data, ada_ids, (0, h)).reshape(-1, D)
        vd = tier.read_values(pool.data, ada_ids).reshape(-1, D)
        moved = pool.positions[ada_ids].reshape(-1)
        kept = np.setdiff1d(np.arange(T), moved)
        k = np.concatenate([K[h][kept], kd])
        v = np.concatenate([V[h][kept], vd])
        ref = attend_dense(q[h * G : (h + 1) * G], k, v, np.zeros(len(k), np.int32), np.array([T]), D ** -0.5)
        np.testing.assert_allclose(out[h * G : (h + 1) * G], ref, atol=3e-5)
        assert np.abs(vd - V[h][moved]).max() < 0.02 * np.abs(V).max()  # int8 values


def test_ada_without_calibration_falls_back_to_dense(capsys):
    pol = make_policy("ada", calibration=None)
    assert pol.keep_all and "calibrate" in capsys.readouterr().err


def test_prefill_path_equals_decode_path_over_ada_pages():
    """Chunks of queries (GEMM over transiently decoded keys) give the logits the LUT path gives per query."""
    L, H, G, D, P, T = 1, 1, 3, 64, 16, 120
    rng = np.random.default_rng(11)
    cal = Calibration(rng.uniform(0.1, 2, (L, H, D)).astype(np.float32),
                      rng.uniform(0.1, 2, (L, H, D)).astype(np.float32), {})
    pol = make_policy("ada", sinks=2, window=16, tier=128, calibration=cal)
    cache = PagedKVCache(L, H, D, n_ctx=256, kv_dtype="float32", page_size=P, policy=pol)
    cache.append(0, random_keys(rng, T, D)[None], rng.normal(size=(1, T, D)).astype(np.float32))
    cache.advance(T)
    cache.use_c = False
    q = rng.normal(size=(G, 12, D)).astype(np.float32)
    together = cache.attend(0, q, np.full(12, T))
    one_by_one = np.concatenate([cache.attend(0, q[:, t : t + 1], np.array([T])) for t in range(12)], axis=1)
    np.testing.assert_allclose(together, one_by_one, atol=2e-5)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 16))
def test_polar_allocation_is_optimal_for_convex_tables(seed, total):
    """Decreasing convex error tables (each bit saves less than the one before): the greedy allocation of angle
    and radius bits reaches the brute-force optimum of sum_i angle_err[i, ba_i] + radius_err[i, br_i]."""
    rng = np.random.default_rng(seed)
    W = 4
    steps = np.sort(rng.uniform(0, 1, (2, 2, W)), axis=-1)[..., ::-1] * rng.lognormal(0, 2, (2, 2, 1))  # saves
    tables = rng.uniform(0, 0.1, (2, 2, 1)) + np.concatenate([steps[..., ::-1].cumsum(-1)[..., ::-1],
                                                              np.zeros((2, 2, 1))], axis=-1)  # (2 tables, 2 pairs, W+1)
    ea, er = tables
    ba, br = allocate_polar_bits(ea, er, total, max_pair=8)
    assert ba.sum() + br.sum() == total and (ba <= W).all() and (br <= W).all()
    cost = lambda a, r: float(sum(ea[i, a[i]] + er[i, r[i]] for i in range(2)))  # noqa: E731
    best = min(cost(c[:2], c[2:]) for c in itertools.product(range(W + 1), repeat=4) if sum(c) == total)
    assert cost(ba, br) <= best + 1e-12


def test_polar_allocation_skips_a_useless_first_bit():
    """A 1-bit angle code can cost more than none (its two levels sit on the arc's ends): two bits together win."""
    ea = np.array([[1.0, 1.5, 0.05, 0.04, 0.03, 0.02, 0.01]])
    er = np.array([[0.5, 0.3, 0.2, 0.15, 0.1, 0.08, 0.06]])
    assert [int(x[0]) for x in allocate_polar_bits(ea, er, 2)] == [2, 0]
    assert [int(x[0]) for x in allocate_polar_bits(ea, er, 3)] == [2, 1]
    with pytest.raises(ValueError, match="do not fit"):
        allocate_polar_bits(ea, er, 13)


def test_polar_error_tables_predict_the_tiers_logit_error():
    """The tables are the logit error of each pair's angle code alone and radius code alone; a tier coding both
    (write_page, decode_keys) has within a few % of their sum, pair by pair, for fine radius codes."""
    rng = np.random.default_rng(5)
    D, P = 64, 64
    h2 = D // 2
    k = random_keys(rng, 4 * P, D)
    q = rng.normal(size=(500, D)) * rng.lognormal(0, 1, D)
    q[:, h2:] += 0.5 * q[:, :h2]  # correlated pair coordinates: the cross moment matters
    mom = np.stack([np.mean(q[:, :h2] ** 2, 0), np.mean(q[:, h2:] ** 2, 0), np.mean(q[:, :h2] * q[:, h2:], 0)], -1)
    ea, er = polar_error_tables(k, mom, P)
    per_token = polar_error_tables(k, np.broadcast_to(mom, (len(k), h2, 3)), P)  # the same weights for every key
    np.testing.assert_allclose(per_token, (ea, er), rtol=1e-12)
    assert ea.shape == er.shape == (h2, MAX_WIDTH + 1) and (ea[:, 2:] > 0).all()
    # from one bit on, each bit halves the step (0 bits: the mean; 1 bit: the two ends, which can be worse)
    assert (np.diff(ea[:, 1:], axis=-1) <= 1e-12).all() and (np.diff(er[:, 1:], axis=-1) <= 1e-12).all()
    for b in (1, 2, 3, 4):
        tier = AdaTier.polar(np.full((1, 1, h2), b), np.full((1, 1, h2), MAX_WIDTH), v_bits=4, v_group=32)
        data = tier.alloc(4, P, D)
        for p in range(4):
            tier.write_page(data, p, k[p * P : (p + 1) * P], np.zeros((P, D), np.float32), (0, 0))
        e = tier.decode_keys(data, np.arange(4), (0, 0)).reshape(-1, D).astype(np.float64) - k
        ex, ey = e[:, :h2], e[:, h2:]
        measured = np.mean(mom[:, 0] * ex**2 + mom[:, 1] * ey**2 + 2 * mom[:, 2] * ex * ey, axis=0) / D  # (h2,)
        predicted = ea[:, b] + er[:, MAX_WIDTH]
        np.testing.assert_allclose(measured, predicted, rtol=0.1)
