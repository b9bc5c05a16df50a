"""Parity checks of the CUDA kernels against their NumPy twins, for any (module factory, array module):
the CPU emulator with numpy in the tests (tests/test_cuda_emu_ops.py), cupy RawModules on a GPU in
`python -m skvrt.selftest --gpu`. Each check builds random inputs on the host, runs the op through its
launch code (skvrt/cuda/ops.py, kv_write.py, attention.py) and the twin, raises AssertionError on a
mismatch and returns the worst error it measured (a dict of named figures) and the kernel's raw output
(host arrays, for emulator-vs-GPU comparisons).

Tolerances (why they are what they are: each kernel's header comment):
    rms_norm   rtol 1e-5 (summation order)            rope    atol 4e-6 * max|x| (sin / cos, fma)
    swiglu     rtol 1e-5, atol 1e-6 (expf)            dense_append   byte-exact (arena bytes, fill, table)
    ada_encode value codes / v_min / v_scale exact; frames within one float16 step (angles modulo 2 pi);
               >= 97 % of key fields identical; per page, the decoded keys' worst error within
               1.05 x the twin's worst error + 1e-3 max|k|
    decode     atol = rtol = 1e-4 (as the C kernels)
    prefill    atol = rtol = 1e-4 (float32 sums in another order; ADA keys from the Cody-Waite sincos, ~1e-7)
"""

from __future__ import annotations

import numpy as np

from .. import ops as np_ops
from . import attention as cuda_attention
from . import kv_write
from . import ops as cuda_ops
from . import prefill as cuda_prefill


def to_np(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def dev(xp, a):
    """A device copy (also under numpy: kernels write in place, the host inputs stay the twin's)."""
    return xp.array(a, copy=True)


def random_keys(rng, n: int, D: int) -> np.ndarray:
    """Post-RoPE-like keys: per pair a preferred angle (some near +-pi, to cross the wrap) and radius."""
    h2 = D // 2
    ang = rng.uniform(-np.pi, np.pi, h2) + rng.normal(0, 0.6, (n, h2))
    rad = rng.uniform(0.2, 4, h2) * rng.lognormal(0, 0.3, (n, h2))
    return np.concatenate([rad * np.cos(ang), rad * np.sin(ang)], axis=1).astype(np.float32)


# ---- row / elementwise ops ---------------------------------------------------------------------------

def check_rms_norm(module, xp, rng, T: int = 5, n: int = 576, residual: bool = True, eps: float = 1e-5):
    x = rng.normal(0, 2, (T, n)).astype(np.float32)
    r = rng.normal(0, 1, (T, n)).astype(np.float32) if residual else None
    w = rng.uniform(0.5, 1.5, n).astype(np.float32)
    xd, out = dev(xp, x), xp.full((T, n), np.nan, np.float32)
    cuda_ops.rms_norm(module, xp, xd, xp.asarray(w), eps, out, None if r is None else xp.asarray(r))
    want_x = x + r if residual else x
    want = np_ops.rms_norm(want_x, w, np.float32(eps))
    got, got_x = to_np(out), to_np(xd)
    np.testing.assert_array_equal(got_x, want_x)  # the residual sum is written back exactly
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return {"max_rel": float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-6)))}, got


def check_rope(module, xp, rng, T: int = 6, nq: int = 6, nkv: int = 2, D: int = 64, pos_max: int = 131072,
               theta: float = 500000.0):
    """Rotates the q and k heads of a q|k|v row block in place; v must stay untouched."""
    width = (nq + 2 * nkv) * D
    qkv = rng.normal(0, 1, (T, width)).astype(np.float32)
    pos = np.sort(rng.choice(pos_max, T, replace=False)).astype(np.int32)
    pos[0] = 0
    inv = (1.0 / theta ** (np.arange(0, D, 2).astype(np.float32) / D)).astype(np.float32)
    xd = dev(xp, qkv)
    cuda_ops.rope(module, xp, xd, xp.asarray(pos), xp.asarray(inv), nq + nkv, D)
    cos, sin = np_ops.rope_tables(inv, pos.astype(np.int64))
    heads = qkv.reshape(T, nq + 2 * nkv, D).transpose(1, 0, 2)
    want = heads.copy()
    want[: nq + nkv] = np_ops.apply_rope(heads[: nq + nkv], cos, sin)
    got = to_np(xd).reshape(T, nq + 2 * nkv, D).transpose(1, 0, 2)
    np.testing.assert_array_equal(got[nq + nkv :], heads[nq + nkv :])
    atol = 4e-6 * float(np.abs(qkv).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)
    return {"max_abs": float(np.abs(got - want).max()), "max_pos": int(pos.max())}, got


def check_swiglu(module, xp, rng, T: int = 3, F: int = 1536):
    gu = rng.normal(0, 3, (T, 2 * F)).astype(np.float32)
    gu[0, :4] = [-90.0, 90.0, 0.0, -0.0]  # exp overflow side, large gate, zeros
    out = xp.full((T, F), np.nan, np.float32)
    cuda_ops.swiglu(module, xp, xp.asarray(gu), out)
    with np.errstate(over="ignore"):
        want = np_ops.silu(gu[:, :F]) * gu[:, F:]
    got = to_np(out)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    return {"max_abs": float(np.abs(got - want).max())}, got


# ---- KV writes -------------------------------------------------------------------------------------------

def check_dense_append(module, xp, rng, H: int = 2, D: int = 64, P: int = 16, n_prev: int = 21, T: int = 37,
                       nq: int = 4, device_positions: bool = False):
    """New tokens into dense pages: the kernel (page plan from plan_dense_append) vs PagedKVCache.append on
    an identical cache: every arena byte, the fill counts and the page table equal. k, v are strided views of
    a q|k|v block, as the model would pass them. device_positions: positions from a device array (what a
    captured CUDA graph uses) instead of pos0."""
    from ..kv.cache import PagedKVCache

    a, b = (PagedKVCache(1, H, D, n_ctx=n_prev + T + 8, page_size=P) for _ in range(2))
    k0, v0 = (rng.normal(size=(H, n_prev, D)).astype(np.float32) for _ in range(2))
    for c in (a, b):
        c.append(0, k0, v0)
        c.advance(n_prev)
    qkv = rng.normal(size=(T, nq + 2 * H, D)).astype(np.float32)
    k, v = qkv[:, nq : nq + H].transpose(1, 0, 2), qkv[:, nq + H :].transpose(1, 0, 2)  # (H, T, D) views
    a.append(0, np.ascontiguousarray(k), np.ascontiguousarray(v))
    pids, slots = kv_write.plan_dense_append(b, 0, T)
    buf, fill = kv_write.device_arena(xp, b.arena)
    f = kv_write.pool_fields(xp, b.pools[0], buf)
    qd = xp.asarray(qkv)
    kd, vd = qd[:, nq : nq + H].transpose(1, 0, 2), qd[:, nq + H :].transpose(1, 0, 2)
    pos = xp.asarray(np.arange(b.offset, b.offset + T, dtype=np.int32)) if device_positions else None
    kv_write.dense_append(module, xp, kd, vd, xp.asarray(pids), xp.asarray(slots), f["k"], f["v"], f["positions"],
                          fill, -12345 if device_positions else b.offset, positions=pos)
    got_buf, got_fill = to_np(buf), to_np(fill)
    np.testing.assert_array_equal(got_fill, a.arena.fill)
    np.testing.assert_array_equal(b.table.page_ids, a.table.page_ids)
    np.testing.assert_array_equal(b.table.n_pages, a.table.n_pages)
    diff = int(np.count_nonzero(got_buf != a.arena.buf))
    assert diff == 0, f"{diff} arena bytes differ from PagedKVCache.append"
    return {"bytes_differing": diff, "pages": int(len(np.unique(pids)))}, got_buf


def check_ada_encode(module, xp, rng, H: int = 2, D: int = 64, P: int = 32, key_bits: int = 128, vb: int = 4,
                     vg: int = 32, n_jobs: int = 6, skew: bool = False, polar: bool = False):
    """Whole ADA pages: the kernel vs AdaTier.write_page (float64), pages of 1, P and odd token counts. polar:
    angle and radius widths chosen separately (allocate_polar_bits on random error tables, as a sidecar's)."""
    from ..kv.ada import MAX_WIDTH, AdaTier, allocate_bits, allocate_polar_bits
    from ..kv.pool import TierPool

    if polar:
        tables = [rng.lognormal(0, 2.5, (1, H, D // 2, 1)) * 4.0 ** -np.arange(MAX_WIDTH + 1) for _ in range(2)]
        tier = AdaTier.polar(*allocate_polar_bits(*tables, key_bits), vb, vg)
    else:
        w = rng.lognormal(0, 2.5 if skew else 0.5, (1, H, D // 2))
        tier = AdaTier(allocate_bits(w, key_bits), vb, vg)
    N = n_jobs + 3
    ref, gpu = (TierPool(tier, N, P, D) for _ in range(2))
    pids = rng.permutation(N)[:n_jobs].astype(np.int32)
    ns = rng.integers(1, P + 1, n_jobs)
    ns[0], ns[-1] = P, 1
    hs = rng.integers(0, H, n_jobs)
    jobs = np.stack([pids, ns, hs], axis=1).astype(np.int32)
    k = np.stack([random_keys(rng, P, D) for _ in range(n_jobs)])
    v = rng.normal(0, 1, (n_jobs, P, D)).astype(np.float32)
    for j in range(n_jobs):
        tier.write_page(ref.data, int(pids[j]), k[j, : ns[j]], v[j, : ns[j]], (0, int(hs[j])))
    ba, br = (np.ascontiguousarray(x[0], dtype=np.uint8) for x in tier.widths_at())
    buf, _ = kv_write.device_arena(xp, gpu.arena)
    f = kv_write.pool_fields(xp, gpu, buf)
    kv_write.ada_encode_pages(module, xp, xp.asarray(k), xp.asarray(v), xp.asarray(jobs), xp.asarray(ba),
                              xp.asarray(br), f, vb, vg)
    got = {name: np.ndarray(a.shape, a.dtype, to_np(buf), a.ctypes.data - gpu.arena.buf.ctypes.data, a.strides)
           for name, a in gpu.data.items()}
    stats = {"frame_ulps": 0.0, "codes_same": 1.0, "key_err_ratio": 0.0}
    same = total = 0
    for j in range(n_jobs):
        pid, n, h = int(pids[j]), int(ns[j]), int(hs[j])
        for name in ("v_codes", "v_min", "v_scale"):
            np.testing.assert_array_equal(got[name][pid, :n], ref.data[name][pid, :n], err_msg=f"{name} job {j}")
        fg, fr = got["frame"][pid].astype(np.float64), ref.data["frame"][pid].astype(np.float64)
        step = np.spacing(np.abs(ref.data["frame"][pid])).astype(np.float64)
        d = np.abs(fg - fr)
        d[:, 0] = np.minimum(d[:, 0], np.abs(d[:, 0] - 2 * np.pi))  # theta0 near +-pi may wrap either way
        ulps = d / step
        assert (d[:, 0] <= 2 * step[:, 0] + 1e-3).all() and (ulps[:, 1:] <= 1.0 + 1e-9).all(), \
            f"job {j}: frame off by {ulps.max():.1f} float16 steps"
        stats["frame_ulps"] = max(stats["frame_ulps"], float(ulps[:, 1:].max()))
        a_g, r_g = tier.codes(got, np.array([pid]), (0, h))
        a_r, r_r = tier.codes(ref.data, np.array([pid]), (0, h))
        same += int((a_g[0, :n] == a_r[0, :n]).sum() + (r_g[0, :n] == r_r[0, :n]).sum())
        total += 2 * n * (D // 2)
        dk_g = tier.decode_keys(got, np.array([pid]), (0, h))[0, :n]
        dk_r = tier.decode_keys(ref.data, np.array([pid]), (0, h))[0, :n]
        e_g, e_r = np.abs(dk_g - k[j, :n]).max(), np.abs(dk_r - k[j, :n]).max()
        bound = 1.05 * e_r + 1e-3 * np.abs(k[j, :n]).max()
        assert e_g <= bound, f"job {j}: decoded keys' worst error {e_g:.4g} > {bound:.4g} (twin {e_r:.4g})"
        stats["key_err_ratio"] = max(stats["key_err_ratio"], float(e_g / max(e_r, 1e-12)))
    stats["codes_same"] = same / total
    assert stats["codes_same"] >= 0.97, f"only {stats['codes_same']:.1%} of the key fields equal the twin's"
    return stats, to_np(buf)


# ---- decode attention -------------------------------------------------------------------------------------

def decode_twin(cache, layer, q):
    """NumPy decode step: q (nq, D) -> out (nq, D), per-table-entry mass (H, max_pages)."""
    from ..kv.attention import softmax_attend

    H, t = cache.n_kv_heads, cache.table
    G = q.shape[0] // H
    out = np.empty_like(q)
    page = np.zeros((H, t.max_pages), np.float32)
    for h in range(H):
        s, v, kpos, where = cache._scores(layer, h, q[h * G : (h + 1) * G, None])
        out[h * G : (h + 1) * G] = softmax_attend(s, v, kpos, np.array([10**9]))[:, 0]
        p = np.exp(s[:, 0] - s[:, 0].max(-1, keepdims=True))
        m = (p / p.sum(-1, keepdims=True)).sum(0)
        o = 0
        ids, tiers = t.pages(layer, h)
        for pool, pids, valid in where:
            for pid, row in zip(pids, valid):
                n = int(row.sum())
                pi = int(np.nonzero((ids == pid) & (tiers == pool.index))[0][0])
                page[h, pi] = m[o : o + n].sum()
                o += n
    return out, page


def _ada_cache(rng, H, D, P, T, key_bits, vb, vg, chunk=37):
    from ..calibrate import Calibration
    from ..kv import make_policy
    from ..kv.cache import PagedKVCache

    cal = Calibration(*(rng.uniform(0.1, 2, (1, H, D)).astype(np.float32) for _ in range(2)), {})
    pol = make_policy("ada", sinks=4, window=16, tier=key_bits, v_bits=vb, v_group=vg, calibration=cal)
    cache = PagedKVCache(1, H, D, n_ctx=T + 8, page_size=P, policy=pol)
    K = np.stack([random_keys(rng, T, D) for _ in range(H)])
    V = rng.normal(size=(H, T, D)).astype(np.float32)
    for s in range(0, T, chunk):
        cache.append(0, K[:, s : s + chunk], V[:, s : s + chunk])
        cache.advance(min(chunk, T - s))
    return cache


def check_decode(module, xp, rng, H: int = 2, G: int = 3, D: int = 64, P: int = 16, T: int = 117,
                 key_bits: int | None = 128, vb: int = 4, vg: int = 32, pages_per_split: int = 2):
    """One decode step over a cache built the model's way (key_bits None: dense pages only, dense_decode;
    else ada_decode over dense + ADA pages), pages shuffled in each head's table; out and page mass."""
    from ..kv.ada import AdaTier
    from ..kv.cache import PagedKVCache

    if key_bits is None:
        cache = PagedKVCache(1, H, D, n_ctx=T + 8, page_size=P)
        cache.append(0, rng.normal(size=(H, T, D)).astype(np.float32), rng.normal(size=(H, T, D)).astype(np.float32))
        cache.advance(T)
    else:
        cache = _ada_cache(rng, H, D, P, T, key_bits, vb, vg)
    t = cache.table
    for h in range(H):
        n = t.n_pages[0, h]
        order = rng.permutation(n)
        t.page_ids[0, h, :n], t.page_tiers[0, h, :n] = t.page_ids[0, h, :n][order], t.page_tiers[0, h, :n][order]
    q = rng.normal(0, 1, (H * G, D)).astype(np.float32)
    want, want_mass = decode_twin(cache, 0, q)
    buf, fill = kv_write.device_arena(xp, cache.arena)
    out = xp.full((H * G, D), np.nan, np.float32)
    mass = xp.full((H, t.max_pages), np.nan, np.float32)
    ids, n_pages = xp.asarray(np.ascontiguousarray(t.page_ids[0])), xp.asarray(np.ascontiguousarray(t.n_pages[0]))
    used = int(t.n_pages[0].max())
    if key_bits is None:
        f = kv_write.pool_fields(xp, cache.pools[0], buf)
        cuda_attention.dense_decode(module, xp, xp.asarray(q), f["k"], f["v"], fill, ids, n_pages, cache.scale, out,
                                    page_mass=mass, max_pages_used=used, pages_per_split=pages_per_split)
    else:
        tiers = []
        for pool in cache.pools:
            f = kv_write.pool_fields(xp, pool, buf)
            if isinstance(pool.tier, AdaTier):
                ba, br = pool.tier.widths_at(0)
                tiers.append(cuda_attention.ada_tier(xp, f, ba, br, pool.tier.v_bits, pool.tier.v_group))
            else:
                tiers.append(cuda_attention.dense_tier(xp, f["k"], f["v"]))
        cuda_attention.ada_decode(module, xp, xp.asarray(q), tiers, fill, ids,
                                  xp.asarray(np.ascontiguousarray(t.page_tiers[0])), n_pages, cache.scale, out,
                                  page_mass=mass, max_pages_used=used, pages_per_split=pages_per_split)
    got, got_mass = to_np(out), to_np(mass)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_mass, want_mass, atol=1e-4, rtol=1e-4)
    return {"out_max_abs": float(np.abs(got - want).max()), "mass_max_abs": float(np.abs(got_mass - want_mass).max())}, got


# ---- prefill attention -------------------------------------------------------------------------------------

def scramble_table(rng, cache) -> None:
    """Shuffle every head's table entries (pages need not be in position order) and NaN-poison every unused
    float slot (the kernels must never read past fill)."""
    t = cache.table
    for layer in range(cache.n_layers):
        for h in range(cache.n_kv_heads):
            n = t.n_pages[layer, h]
            order = rng.permutation(n)
            t.page_ids[layer, h, :n], t.page_tiers[layer, h, :n] = t.page_ids[layer, h, :n][order], t.page_tiers[layer, h, :n][order]
    for pool in cache.pools:
        pool.poison_unused()


def device_tiers(xp, cache, buf, layer: int = 0) -> tuple[list, list]:
    """The kernels' view of a cache's pools over the arena bytes `buf`: (tiers, positions fields)."""
    from ..kv.ada import AdaTier

    tiers, positions = [], []
    for pool in cache.pools:
        f = kv_write.pool_fields(xp, pool, buf)
        if isinstance(pool.tier, AdaTier):
            ba, br = pool.tier.widths_at(layer)
            tiers.append(cuda_attention.ada_tier(xp, f, ba, br, pool.tier.v_bits, pool.tier.v_group))
        else:
            tiers.append(cuda_attention.dense_tier(xp, f["k"], f["v"]))
        positions.append(f["positions"])
    return tiers, positions


def check_prefill(module, xp, rng, H: int = 2, G: int = 3, D: int = 64, P: int = 16, n_ctx: int = 75, T: int = 23,
                  key_bits: int | None = None, vb: int = 4, vg: int = 32):
    """Causal attention of the last T tokens of a cache built the model's way (key_bits None: dense pages only;
    else dense + ADA pages) against PagedKVCache.attend (NumPy twin), pages shuffled in each head's table,
    unused slots NaN; q a strided view of q|k|v-like rows."""
    import warnings

    from ..kv.cache import PagedKVCache

    if key_bits is None:
        cache = PagedKVCache(1, H, D, n_ctx=n_ctx + 8, page_size=P)
        for s in range(0, n_ctx, 29):
            n = min(29, n_ctx - s)
            cache.append(0, rng.normal(size=(H, n, D)).astype(np.float32), rng.normal(size=(H, n, D)).astype(np.float32))
            cache.advance(n)
    else:
        cache = _ada_cache(rng, H, D, P, n_ctx, key_bits, vb, vg)
    scramble_table(rng, cache)
    cache.use_c = False  # the NumPy twin
    qkv = rng.normal(0, 1, (T, H * G + 2 * H, D)).astype(np.float32)
    qpos = np.arange(n_ctx - T, n_ctx, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the twin decodes whole pages, NaN-poisoned slots too
        want = cache.attend(0, qkv[:, : H * G].transpose(1, 0, 2), qpos).transpose(1, 0, 2)  # (T, nq, D)
    buf, fill = kv_write.device_arena(xp, cache.arena)
    tiers, positions = device_tiers(xp, cache, buf)
    t = cache.table
    qd = xp.asarray(qkv)[:, : H * G]
    out = xp.full((T, H * G, D), np.nan, np.float32)
    cuda_prefill.prefill_attention(module, xp, qd, xp.asarray(qpos.astype(np.int32)), tiers, positions, fill,
                                   xp.asarray(np.ascontiguousarray(t.page_ids[0])),
                                   xp.asarray(np.ascontiguousarray(t.page_tiers[0])) if len(tiers) > 1 else None,
                                   xp.asarray(np.ascontiguousarray(t.n_pages[0])), cache.scale, out)
    got = to_np(out)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    tiers_used = sorted(set(t.page_tiers[0][t.page_tiers[0] >= 0].tolist()))
    return {"max_abs": float(np.abs(got - want).max()), "tiers": "/".join(map(str, tiers_used))}, got


# The suite: (name, check, kwargs). Small sizes for the emulator (--dry-run, CI); the same list on a GPU.
SUITE = [
    ("rms_norm residual n=576", check_rms_norm, dict(T=5, n=576, residual=True)),
    ("rms_norm n=4096", check_rms_norm, dict(T=3, n=4096, residual=False)),
    ("rope GQA 3:1 D=64 pos<131072", check_rope, dict(T=6, nq=6, nkv=2, D=64)),
    ("rope D=128 pos<8192", check_rope, dict(T=4, nq=4, nkv=4, D=128, pos_max=8192, theta=10000.0)),
    ("swiglu F=1536", check_swiglu, dict(T=3, F=1536)),
    ("dense_append D=64 P=16", check_dense_append, dict(H=2, D=64, P=16, n_prev=21, T=37)),
    ("dense_append D=128 P=32 device positions", check_dense_append, dict(H=3, D=128, P=32, n_prev=40, T=29,
                                                                          device_positions=True)),
    ("ada_encode D=64 128b v4", check_ada_encode, dict(H=2, D=64, P=32, key_bits=128, vb=4, vg=32)),
    ("ada_encode D=128 192b v2 skew", check_ada_encode, dict(H=2, D=128, P=16, key_bits=192, vb=2, vg=64, skew=True)),
    ("ada_encode D=64 128b v2 polar widths", check_ada_encode, dict(H=2, D=64, P=32, key_bits=128, vb=2, vg=64, polar=True)),
    ("dense_decode G=3 D=64", check_decode, dict(H=2, G=3, D=64, P=16, T=75, key_bits=None)),
    ("ada_decode G=3 D=64 128b", check_decode, dict(H=2, G=3, D=64, P=16, T=117, key_bits=128, vb=4, vg=32)),
    ("ada_decode G=8 D=128 192b", check_decode, dict(H=1, G=8, D=128, P=16, T=99, key_bits=192, vb=2, vg=32)),
    ("prefill dense G=3 D=64", check_prefill, dict(H=2, G=3, D=64, P=16, n_ctx=75, T=23)),
    ("prefill ada G=8 D=128 192b", check_prefill, dict(H=1, G=8, D=128, P=16, n_ctx=99, T=21, key_bits=192, vb=2,
                                                        vg=32)),
]
