"""Microbenchmark: one decode step's attention for one layer (SmolLM2-135M shape: 9 query heads, 3 KV heads,
head_dim 64, page 64) over 2K / 8K / 32K cached tokens, one thread.

    C dense    kernels_c/attention_dense.c, every page dense float16 (the full policy)
    C ada128 / C ada192
               kernels_c/attention_ada.c, sinks + window dense float16, older tokens ADA pages (v4)
    NumPy ...  the same caches through cache.attend with the C kernels off (the NumPy twins)

Bit allocation: the default model's calibration sidecar (layer --layer) when it is in the store, else random
statistics. Keys: RoPE-like random pairs (only timing is measured here, not quality). Reports the median
of --repeats timed calls, the ratio to C dense, and the bytes of the pages the step reads (pages' bytes:
payload + per-page / per-token scales + fill + positions, over the layer's pages).

    OPENBLAS_NUM_THREADS=1 python bench/attention_micro.py [--lengths 2048 8192 32768] [--repeats 30]
        [--flush-mib 1024]

'hot' rows repeat the call on the same layer, so its pages stay in L2 / L3; 'cold' rows stream --flush-mib
MiB through the caches before each call first, which is what a real decode step does to a layer's pages (the
other layers' KV and ~0.5 GB of weights pass through the caches between two visits of a layer).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from skvrt import ckernels, threads  # noqa: E402
from skvrt.calibrate import Calibration, load_calibration  # noqa: E402
from skvrt.kv import make_policy  # noqa: E402
from skvrt.kv.cache import PagedKVCache  # noqa: E402

H, G, D, P = 3, 3, 64, 64


def calibration(layer: int) -> tuple[Calibration, str]:
    try:
        from skvrt.store import store_root

        cal = load_calibration(store_root() / "models" / "smollm2-135m-instruct")
    except Exception:  # noqa: BLE001 -- any store problem: fall back to random statistics
        cal = None
    if cal is not None and cal.q_sq.shape[1:] == (H, D):
        return Calibration(cal.q_sq[layer : layer + 1], cal.k_range_sq[layer : layer + 1], {}), \
            f"SmolLM2-135M calibration, layer {layer}"
    rng = np.random.default_rng(0)
    return Calibration(rng.lognormal(0, 1, (1, H, D)).astype(np.float32),
                       rng.lognormal(0, 1, (1, H, D)).astype(np.float32), {}), "random statistics"


def random_keys(rng, n):
    h2 = D // 2
    ang = rng.uniform(-np.pi, np.pi, h2) + rng.normal(0, 0.6, (n, h2))
    rad = rng.uniform(0.2, 4, h2) * rng.lognormal(0, 0.3, (n, h2))
    return np.concatenate([rad * np.cos(ang), rad * np.sin(ang)], axis=1).astype(np.float32)


def build(n: int, policy, rng) -> PagedKVCache:
    cache = PagedKVCache(1, H, D, n_ctx=n + 1, kv_dtype="float16", page_size=P, policy=policy)
    K = np.stack([random_keys(rng, n) for _ in range(H)])
    V = rng.normal(size=(H, n, D)).astype(np.float32)
    for s in range(0, n, 512):
        cache.append(0, K[:, s : s + 512], V[:, s : s + 512])
        cache.advance(min(512, n - s))
    return cache


def step_bytes(cache) -> int:
    """Bytes of the pages (frames + fill counts) the layer's step reads."""
    t = cache.table
    return sum(cache.pools[int(tier)].page_bytes for h in range(H) for tier in t.pages(0, h)[1])


def flusher(mib: int):
    """A callable that evicts the caches by reading `mib` MiB (untimed), or None for mib = 0."""
    if mib <= 0:
        return None
    buf = np.ones(mib << 18, np.float32)  # mib MiB

    def flush():
        float(buf.sum())  # read every line (reads only: no dirty lines left to write back in the timed call)

    return flush


def timeit(fns: list, repeats: int, flush=None) -> list[float]:
    """Median seconds of each callable; repeats interleaved so load drift on a shared machine hits all alike.
    flush: called (untimed) before every timed call -- the 'cold' measurement."""
    for fn in fns:
        fn()  # warm-up (and first-use build)
    ts = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, ts):
            if flush is not None:
                flush()
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in ts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--layer", type=int, default=10)
    ap.add_argument("--no-numpy", action="store_true", help="skip the (slow) NumPy paths")
    ap.add_argument("--flush-mib", type=int, default=1024,
                    help="also time the C kernels 'cold': this many MiB are streamed through the caches before "
                         "each call, as the other layers' KV and the weights do in a real decode step (0: off)")
    a = ap.parse_args()
    if ckernels.lib() is None:
        raise SystemExit(f"C kernels unavailable: {ckernels.build_error}")
    threads.set_threads(1)
    cal, cal_name = calibration(a.layer)
    print(f"one decode step, one layer: nq={H * G} H={H} D={D} P={P}, 1 thread; bits from {cal_name}")
    rng = np.random.default_rng(0)
    rows = []
    for n in a.lengths:
        q = rng.normal(size=(H * G, D)).astype(np.float32)
        qpos = np.array([n])
        out = np.empty((H * G, D), np.float32)
        full = build(n, make_policy("full"), rng)
        t = full.table
        named = [("C dense f16", lambda: ckernels.dense_decode(q, full.pools[0], t.page_ids[0], t.n_pages[0],
                                                               full.scale, out), full)]
        ada = {}
        for tier in (128, 192):
            c = build(n, make_policy("ada", tier=tier, v_bits=4, calibration=cal), rng)
            ada[tier] = c
            descs = [ckernels.tier_desc(p, 0, c._ada_bits.get(i)) for i, p in enumerate(c.pools)]
            arr = (ckernels.TierDesc * len(descs))(*descs)
            tc = c.table
            named.append((f"C ada{tier}-v4", lambda c=c, tc=tc, arr=arr: ckernels.paged_decode_unchecked(
                ckernels.lib(), q, arr, c.arena.fill, tc.page_ids[0], tc.page_tiers[0], tc.n_pages[0], c.scale, out),
                c))
        secs = timeit([fn for _, fn, _ in named], a.repeats)
        res = [(name, sec, step_bytes(c)) for (name, _, c), sec in zip(named, secs)]
        flush = flusher(a.flush_mib)
        if flush is not None:
            secs = timeit([fn for _, fn, _ in named], a.repeats, flush)
            res += [(name + " cold", sec, step_bytes(c)) for (name, _, c), sec in zip(named, secs)]
        if not a.no_numpy:
            q3 = q[:, None]
            slow = [("NumPy dense f16", full)] + [(f"NumPy ada{tier}-v4", c) for tier, c in ada.items()]
            for _, c in slow:
                c.use_c = False
            secs = timeit([lambda c=c: c.attend(0, q3, qpos) for _, c in slow], max(3, a.repeats // 5))
            res += [(name, sec, step_bytes(c)) for (name, c), sec in zip(slow, secs)]
        base = {False: res[0][1], True: next((sec for name, sec, _ in res if name.endswith(" cold")), None)}
        for name, sec, nbytes in res:
            rows.append((n, name, sec, sec / base[name.endswith(" cold")], nbytes, nbytes / res[0][2]))
    print("x C dense: against C dense in the same cache state (hot: repeated calls; cold: caches flushed first)")
    print(f"{'tokens':>7} {'path':<22} {'median ms':>10} {'x C dense':>10} {'bytes/step':>12} {'x dense bytes':>13}")
    for n, name, sec, ratio, nbytes, bratio in rows:
        print(f"{n:>7} {name:<22} {sec * 1e3:>10.3f} {ratio:>10.2f} {nbytes:>12,} {bratio:>13.2f}")


if __name__ == "__main__":
    main()
