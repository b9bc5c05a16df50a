"""KV policies and tiers: codecs against independent twins, page-pool invariants under random use
(hypothesis), and attention over mixed-tier pages against brute force over what the policy keeps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skvrt.errors import InputError
from skvrt.kv import make_policy
from skvrt.kv.attention import attend_dense
from skvrt.kv.cache import DENSE, PagedKVCache
from skvrt.kv.tiers import QuantTier, pack, unpack


# ---- codecs -------------------------------------------------------------------------------------------

@given(st.sampled_from([2, 4, 8]), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(bits, rows, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, size=(rows, 64)).astype(np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (rows, 64 * bits // 8)
    assert (unpack(packed, bits, 64) == codes).all()
    # element 0 sits in the low bits of byte 0
    assert packed[0, 0] & ((1 << bits) - 1) == codes[0, 0]


def twin_quantize(x, axis, bits):
    """Independent twin: asymmetric uniform quantization with fp16 min / scale, per slice along `axis`."""
    levels = 2**bits - 1
    lo = x.min(axis=axis, keepdims=True).astype(np.float16).astype(np.float64)
    hi = x.max(axis=axis, keepdims=True).astype(np.float64)
    scale = ((hi - lo) / levels).astype(np.float16).astype(np.float64)
    scale[scale <= 0] = 1.0
    codes = np.clip(np.floor((x - lo) / scale + 0.5), 0, levels)
    return codes, codes * scale + lo


@pytest.mark.parametrize("kb,vb", [(4, 4), (2, 4), (8, 8), (2, 2)])
def test_quant_tier_matches_twin(kb, vb):
    rng = np.random.default_rng(kb * 10 + vb)
    D, P = 64, 64
    k = (rng.normal(0, 1, (P, D)) * rng.uniform(0.1, 5, D)).astype(np.float32)
    v = rng.normal(0, 1, (P, D)).astype(np.float32)
    tier = QuantTier(kb, vb, 32)
    data = tier.alloc(2, P, D)
    tier.write_page(data, 1, k, v)
    K, V = tier.read(data, np.array([1]))
    _, k_ref = twin_quantize(k, 0, kb)  # per channel over the page
    _, v_ref = twin_quantize(v.reshape(P, 2, 32), 2, vb)
    # float32 arithmetic vs float64 twin: codes equal except at exact .5 ties (none in random data)
    np.testing.assert_allclose(K[0], k_ref, rtol=0, atol=1e-5 * np.abs(k).max())
    np.testing.assert_allclose(V[0], v_ref.reshape(P, D), rtol=0, atol=1e-5 * np.abs(v).max())
    err = np.abs(K[0] - k).max(0) / (k.max(0) - k.min(0))
    assert (err <= 0.5 / (2**kb - 1) + 1e-3).all()  # within half a step of the channel's range
    # fields (each 16-byte aligned) + positions + the fill count
    al = lambda n: -(-n // 16) * 16  # noqa: E731
    assert tier.page_bytes(P, D) == (al(P * D * kb // 8) + al(2 * D) * 2 + al(P * D * vb // 8) + al(P * 2 * 2) * 2
                                     + al(4 * P) + 4)


def test_bad_policy_options():
    with pytest.raises(InputError, match="valid: full, window, ada, quant, snapkv, h2o, spherical"):
        make_policy("h2o-ish")
    with pytest.raises(InputError, match="bits"):
        make_policy("quant", k_bits=3)


# ---- invariants under random use ------------------------------------------------------------------------

def held_positions(cache, layer, h):
    ids, tiers = cache.table.pages(layer, h)
    out = []
    for pid, t in zip(ids, tiers):
        pool = cache.pools[t]
        assert pool.in_use(pid)
        out.extend(pool.positions[pid, : pool.fill[pid]].tolist())
        assert (pool.positions[pid, pool.fill[pid]:] == -1).all()
    return out


def check_invariants(cache):
    p = cache.policy
    for layer in range(cache.n_layers):
        for h in range(cache.n_kv_heads):
            pos = held_positions(cache, layer, h)
            assert len(pos) == len(set(pos)), "a token is stored twice"
            if p.keep_all or p.old_tier is not None:
                assert sorted(pos) == list(range(cache.offset))
            else:  # window: sinks + everything after the dropped range
                kept = list(range(min(p.sinks, cache.offset))) + list(range(p.sinks + cache.n_old, cache.offset))
                assert sorted(pos) == kept
            if not p.keep_all:  # the dense tier holds sinks + at most window + P - 1 recent tokens
                dense = [q for pid, t in zip(*cache.table.pages(layer, h)) if t == DENSE
                         for q in cache.pools[DENSE].positions[pid, : cache.pools[DENSE].fill[pid]]]
                assert len([q for q in dense if q >= p.sinks]) < p.window + cache.page_size
    # no leak: the frames each pool owns are exactly the pages the table lists for that tier
    arena = cache.arena
    for t, pool in enumerate(cache.pools):
        listed = sorted(int(pid) for l in range(cache.n_layers) for h in range(cache.n_kv_heads)
                        for pid, tt in zip(*cache.table.pages(l, h)) if tt == t)
        assert listed == sorted(np.nonzero(arena.owner == t)[0].tolist())
        assert pool.n_used == len(listed)
    assert sum(p.n_used for p in cache.pools) + arena.n_free == arena.n_frames


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["full", "window", "quant"]),
    st.lists(st.one_of(st.integers(1, 70).map(lambda n: ("append", n)),
                       st.integers(0, 400).map(lambda n: ("truncate", n))), min_size=1, max_size=12),
    st.integers(0, 6), st.integers(1, 40),
)
def test_pool_invariants_random_use(policy, ops, sinks, window):
    L, H, D, P = 2, 2, 8, 16
    cache = PagedKVCache(L, H, D, n_ctx=600, page_size=P, policy=make_policy(policy, sinks=sinks, window=window,
                                                                             v_group=8))
    rng = np.random.default_rng(0)
    for op, n in ops:
        if op == "append":
            n = min(n, cache.n_ctx - cache.offset)
            if n == 0:
                continue
            for layer in range(L):
                cache.append(layer, rng.normal(size=(H, n, D)).astype(np.float32),
                             rng.normal(size=(H, n, D)).astype(np.float32))
            cache.advance(n)
        else:
            cache.truncate(min(n, cache.offset))
        check_invariants(cache)
    cache.reset()
    assert all(pool.n_used == 0 for pool in cache.pools)


# ---- attention over what the policy keeps -----------------------------------------------------------------

@pytest.mark.parametrize("policy", ["window", "quant"])
def test_decode_attention_matches_brute_force(policy):
    L, H, G, D, P, T = 1, 2, 3, 64, 16, 150
    rng = np.random.default_rng(5)
    pol = make_policy(policy, sinks=3, window=20, k_bits=4, v_bits=4, v_group=32)
    cache = PagedKVCache(L, H, D, n_ctx=256, kv_dtype="float32", page_size=P, policy=pol)
    K = rng.normal(size=(H, T, D)).astype(np.float32)
    V = rng.normal(size=(H, T, D)).astype(np.float32)
    for s in range(0, T, 37):  # chunks, compression between them
        cache.append(0, K[:, s : s + 37], V[:, s : s + 37])
        cache.advance(min(37, T - s))
    q = rng.normal(size=(H * G, 1, D)).astype(np.float32)
    out = cache.attend(0, q, np.array([T]))
    moved = np.arange(pol.sinks, pol.sinks + cache.n_old)
    kept_dense = np.setdiff1d(np.arange(T), moved)
    assert len(kept_dense) < pol.sinks + pol.window + P
    for h in range(H):
        k, v = K[h][kept_dense], V[h][kept_dense]
        if policy == "quant":  # moved tokens as their independent twin reconstructs them, page by page
            ks, vs = [k], [v]
            for s in range(0, len(moved), P):
                idx = moved[s : s + P]
                ks.append(twin_quantize(K[h][idx], 0, 4)[1].astype(np.float32))
                vs.append(twin_quantize(V[h][idx].reshape(len(idx), 2, 32), 2, 4)[1].reshape(len(idx), D)
                          .astype(np.float32))
            k, v = np.concatenate(ks), np.concatenate(vs)
        ref = attend_dense(q[h * G : (h + 1) * G], k, v, np.zeros(len(k), np.int32), np.array([T]), D ** -0.5)
        np.testing.assert_allclose(out[h * G : (h + 1) * G], ref, atol=2e-5)
