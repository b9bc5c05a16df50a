"""Page-local polar per RoPE pair: angle offsets from the page's circular mean quantized uniformly within the
page's angular range, radius uniformly within the page's radius range; bits per pair from query-weighted
allocation (same as exp3, pair bits = 2 x channel bits)."""
import numpy as np, sys
from screen import attn_kl, perchannel
from exp3 import alloc, Kc, Qc, Kw, Qw, Vw, P
def uq(x, lo, hi, n):
    if n <= 1: return np.full_like(x, (lo + hi) / 2)
    sc = (hi - lo) / (n - 1) if hi > lo else 1.0
    return np.round((x - lo) / sc) * sc + lo
def polar_page(K, pbits, split):
    out = np.zeros_like(K)
    for s in range(0, len(K), P):
        x = K[s:s+P]
        for i in range(32):
            b = pbits[i]; a, bb = x[:, i], x[:, i + 32]
            if b == 0: out[s:s+P, i], out[s:s+P, i+32] = a.mean(), bb.mean(); continue
            rho = np.hypot(a, bb); phi = np.arctan2(bb, a)
            mean = np.angle(np.sum(rho * np.exp(1j * phi)))
            d = np.angle(np.exp(1j * (phi - mean)))
            ba = split(b); br = b - ba
            dq = uq(d, d.min(), d.max(), 2**ba); rq = uq(rho, rho.min(), rho.max(), 2**br)
            out[s:s+P, i], out[s:s+P, i+32] = rq * np.cos(mean + dq), rq * np.sin(mean + dq)
    return out
res = {}
for l in (3, 15, 27):
    for h in range(3):
        K = Kw[l, h]; Q = Qw[l, 3*h:3*h+3]; V = Vw[l, h]
        Qg = Qc[l, 3*h:3*h+3].reshape(-1, 64)
        for B in (192, 256):
            bits = alloc(Kc[l, h], Qg, B)[:32] * 2
            for name, split in (("a=b/2", lambda b: (b + 1) // 2), ("a=2b/3", lambda b: min(b, (2 * b + 2) // 3))):
                res.setdefault(f"polar{B} {name}", []).append(attn_kl(Q, K, polar_page(K, bits, split), V))
    print("layer", l, flush=True)
for k, r in res.items():
    r = np.array(r); print(f"{k}: kl {r[:,0].mean():.5f} p99 {np.percentile(r[:,0],99):.4f} out {r[:,1].mean():.4f}")
