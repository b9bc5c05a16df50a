"""Pair-polar key codec experiment: per RoPE pair (i, i+D/2), angle codebook (circular k-means) x radius
levels (1-D Lloyd), bits per pair allocated greedily by query-weighted distortion."""
import numpy as np

def circ_kmeans(phi, w, n, iters=20):
    # phi (N,) angles, w (N,) weights -> centers (n,)
    if n == 1:
        c = np.angle(np.sum(w * np.exp(1j * phi)))
        return np.array([c])
    c = np.quantile(phi, (np.arange(n) + 0.5) / n)
    z = w * np.exp(1j * phi)
    for _ in range(iters):
        c = np.sort(c)
        a = nearest_angle(phi, c)
        zs = np.bincount(a, weights=z.real, minlength=n) + 1j * np.bincount(a, weights=z.imag, minlength=n)
        upd = np.abs(zs) > 0
        c[upd] = np.angle(zs[upd])
    return np.sort(c)

def nearest_angle(phi, c):
    """c sorted in [-pi, pi]: index of the circularly nearest center"""
    n = len(c)
    j = np.searchsorted(c, phi) % n
    i = (j - 1) % n
    dj = np.abs(np.angle(np.exp(1j * (phi - c[j]))))
    di = np.abs(np.angle(np.exp(1j * (phi - c[i]))))
    return np.where(dj < di, j, i)

def lloyd1d(r, n, iters=20):
    if n == 1:
        return np.array([r.mean()])
    c = np.quantile(r, (np.arange(n) + 0.5) / n)
    for _ in range(iters):
        a = np.abs(r[:, None] - c[None]).argmin(1)
        cnt = np.bincount(a, minlength=n); sm = np.bincount(a, weights=r, minlength=n)
        c = np.where(cnt > 0, sm / np.maximum(cnt, 1), c)
    return np.sort(c)

def encode_pair(x, ang, rad):
    # x (N,2) -> reconstruction using nearest angle and nearest radius (independent)
    phi = np.arctan2(x[:, 1], x[:, 0]); r = np.hypot(x[:, 0], x[:, 1])
    a = nearest_angle(phi, ang)
    ri = np.abs(r[:, None] - rad[None]).argmin(1)
    # radius: best scalar for chosen direction is r*cos(dphi); keep nearest-level (paper form)
    return np.stack([rad[ri] * np.cos(ang[a]), rad[ri] * np.sin(ang[a])], 1)

def wdist(x, xh, S):
    e = x - xh
    return float(np.mean(np.einsum("ni,ij,nj->n", e, S, e)))

def fit_pair(x, S, b):
    """best (n_a, n_r) split for b bits -> (dist, ang, rad)"""
    phi = np.arctan2(x[:, 1], x[:, 0]); r = np.hypot(x[:, 0], x[:, 1])
    if b == 0:
        return wdist(x, np.zeros_like(x), S), None, None
    best = None
    for rb in range(0, min(b, 3) + 1):
        na, nr = 2 ** (b - rb), 2 ** rb
        ang = circ_kmeans(phi, r ** 2, na); rad = lloyd1d(r, nr)
        d = wdist(x, encode_pair(x, ang, rad), S)
        if best is None or d < best[0]:
            best = (d, ang, rad)
    return best

def fit_table(K, Qg, max_bits=8):
    N, D = K.shape; h = D // 2
    pairs = [np.stack([K[:, i], K[:, i + h]], 1) for i in range(h)]
    Ss = [np.mean(np.einsum("ni,nj->nij", np.stack([Qg[:, i], Qg[:, i + h]], 1), np.stack([Qg[:, i], Qg[:, i + h]], 1)), 0) for i in range(h)]
    return [[fit_pair(pairs[i], Ss[i], b) for b in range(max_bits + 1)] for i in range(h)]

def allocate(table, B, max_bits=8):
    h = len(table); bits = [0] * h
    for _ in range(B):
        gains = [(table[i][bits[i]][0] - table[i][bits[i] + 1][0]) if bits[i] < max_bits else -1 for i in range(h)]
        i = int(np.argmax(gains)); bits[i] += 1
    return bits, [table[i][bits[i]] for i in range(h)]

def fit_head(K, Qg, B, max_bits=8):
    """K (N,D) calib keys, Qg (M,D) calib queries of the group -> per-pair codebooks with sum bits = B"""
    N, D = K.shape; h = D // 2
    pairs = [np.stack([K[:, i], K[:, i + h]], 1) for i in range(h)]
    Ss = [np.cov(np.stack([Qg[:, i], Qg[:, i + h]]), bias=True) + np.outer(
        [Qg[:, i].mean(), Qg[:, i + h].mean()], [Qg[:, i].mean(), Qg[:, i + h].mean()]) for i in range(h)]
    table = [[fit_pair(pairs[i], Ss[i], b) for b in range(max_bits + 1)] for i in range(h)]
    bits = [0] * h
    for _ in range(B):
        gains = [(table[i][bits[i]][0] - table[i][bits[i] + 1][0]) if bits[i] < max_bits else -1 for i in range(h)]
        i = int(np.argmax(gains)); bits[i] += 1
    return bits, [table[i][bits[i]] for i in range(h)]

def reconstruct(K, bits, books):
    D = K.shape[1]; h = D // 2
    out = np.zeros_like(K)
    for i in range(h):
        if bits[i] == 0: continue
        _, ang, rad = books[i]
        xh = encode_pair(np.stack([K[:, i], K[:, i + h]], 1), ang, rad)
        out[:, i], out[:, i + h] = xh[:, 0], xh[:, 1]
    return out
