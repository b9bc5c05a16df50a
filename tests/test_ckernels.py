"""C kernels against their NumPy twins: random page tables (pages out of order, partly filled pages),
GQA 1:1 / 3:1 / 8:1, head_dim 64 and 128, float16 and float32 pools, unused slots poisoned with NaN."""

from __future__ import annotations

import numpy as np
import pytest

from skvrt import ckernels
from skvrt.kv import slot_mass
from skvrt.kv.attention import attend_dense, gather_dense
from skvrt.kv.pool import DenseTier, TierPool

pytestmark = pytest.mark.skipif(ckernels.lib() is None, reason=f"C kernels unavailable: {ckernels.build_error}")


def random_layer(rng, H, D, P, dtype, max_pages=12, track_mass=False):
    pool = TierPool(DenseTier(dtype), n_pages=H * max_pages + 5, page_size=P, head_dim=D, track_mass=track_mass)
    page_ids = np.full((H, max_pages), -1, dtype=np.int32)
    n_pages = np.zeros(H, dtype=np.int32)
    pos = 0
    for h in range(H):
        n = int(rng.integers(1, max_pages + 1))
        for i in range(n):
            pid = pool.alloc()
            f = int(rng.integers(1, P + 1))  # partly filled pages anywhere, not only the last
            pool.k[pid, :f] = rng.normal(0, 1, (f, D))
            pool.v[pid, :f] = rng.normal(0, 1, (f, D))
            pool.positions[pid, :f] = np.arange(pos, pos + f)
            pos += f
            pool.fill[pid] = f
            page_ids[h, i] = pid
        n_pages[h] = n
        order = rng.permutation(n)  # pages need not be in position order
        page_ids[h, :n] = page_ids[h, :n][order]
    pool.poison_unused()
    return pool, page_ids, n_pages


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-5), ("float16", 2e-5)])
@pytest.mark.parametrize("H,G,D,P", [(3, 3, 64, 64), (4, 1, 64, 16), (1, 8, 128, 32), (2, 8, 128, 64)])
def test_dense_decode_matches_numpy_twin(dtype, atol, H, G, D, P, klib):
    rng = np.random.default_rng(H * 100 + G * 10 + D + P)
    pool, page_ids, n_pages = random_layer(rng, H, D, P, dtype)
    nq = H * G
    q = rng.normal(0, 1, (nq, D)).astype(np.float32)
    scale = D ** -0.5
    out = np.empty((nq, D), dtype=np.float32)
    ckernels.dense_decode(q, pool, page_ids, n_pages, scale, out, L=klib)
    assert np.isfinite(out).all(), "the kernel read a NaN-poisoned slot"
    for h in range(H):
        k, v, kpos = gather_dense(pool, page_ids[h, : n_pages[h]])
        ref = attend_dense(q[h * G : (h + 1) * G, None], k, v, kpos, np.array([10**6]), scale)[:, 0]
        # both accumulate in float32 over the same fp16-rounded inputs; order of summation differs
        np.testing.assert_allclose(out[h * G : (h + 1) * G], ref, atol=atol, rtol=1e-4)


def test_dense_decode_reports_attention_mass():
    """with_mass adds, to every slot's float16 mass, its softmax weight summed over the G query heads of its KV
    head, rounded stochastically as kv/slot_mass.py does with the step's seed (twice: it accumulates)."""
    rng = np.random.default_rng(7)
    H, G, D, P = 2, 3, 64, 16
    pool, page_ids, n_pages = random_layer(rng, H, D, P, "float16", max_pages=6, track_mass=True)
    q = rng.normal(0, 1, (H * G, D)).astype(np.float32)
    out = np.empty((H * G, D), dtype=np.float32)
    seeds = (41, 42)
    for seed in seeds:
        ckernels.dense_decode(q, pool, page_ids, n_pages, D ** -0.5, out, with_mass=True, mass_seed=seed)
    for h in range(H):
        k, v, _ = gather_dense(pool, page_ids[h, : n_pages[h]])
        step = np.zeros(len(k))
        for j in range(h * G, (h + 1) * G):
            s = k @ q[j] * D ** -0.5
            p = np.exp(s - s.max())
            p /= p.sum()
            step += p
            np.testing.assert_allclose(out[j], p @ v, atol=2e-5)
        ids = np.concatenate([np.full(pool.fill[pid], pid) for pid in page_ids[h, : n_pages[h]]])
        slots = np.concatenate([np.arange(pool.fill[pid]) for pid in page_ids[h, : n_pages[h]]])
        twin = np.zeros(len(k), np.float16)
        for seed in seeds:
            twin = slot_mass.accumulate(twin, step.astype(np.float32), slot_mass.slot_keys(ids, slots, seed))
        got = np.concatenate([pool.mass[pid, : pool.fill[pid]] for pid in page_ids[h, : n_pages[h]]])
        # the kernel's float32 weights differ from the twin's in the last bits: a rounding choice may differ by
        # one float16 step where y sits next to a threshold; both are within a step of the exact sum
        assert (got == twin).mean() > 0.95
        np.testing.assert_allclose(got, twin, rtol=2.0**-10, atol=2.0**-24)
        np.testing.assert_allclose(got, 2 * step, rtol=2.0**-9, atol=2.0**-23)
        assert abs(got.astype(np.float64).sum() - 2 * G) < 2e-3
