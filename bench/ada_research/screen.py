"""Screening proxy for key codecs: per (layer, head), attention KL over the last E queries of a window,
sinks (4) + recent (64) exact, other keys replaced by the codec's reconstruction. Values exact."""
import numpy as np

def attn_kl(Q, K, Kq, V, E=256, sinks=4, recent=64, scale=0.125):
    # Q (G,T,D), K/Kq (T,D)
    G, T, D = Q.shape
    kls, errs = [], []
    for t in range(T - E, T, 8):
        n = t + 1
        kk = Kq[:n].copy()
        kk[:sinks] = K[:sinks]; kk[max(0, n - recent):n] = K[max(0, n - recent):n]
        q = Q[:, t]  # (G,D)
        s = q @ K[:n].T * scale; sq = q @ kk.T * scale
        p = np.exp(s - s.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
        pq = np.exp(sq - sq.max(1, keepdims=True)); pq /= pq.sum(1, keepdims=True)
        kls.append((p * (np.log(p + 1e-30) - np.log(pq + 1e-30))).sum(1).mean())
        o = p @ V[:n]; oq = pq @ V[:n]
        errs.append((np.linalg.norm(o - oq, axis=1) / np.linalg.norm(o, axis=1)).mean())
    return float(np.mean(kls)), float(np.mean(errs))

def perchannel(K, bits, block=64):
    T, D = K.shape
    out = np.empty_like(K)
    for s in range(0, T, block):
        x = K[s:s+block]; lo = x.min(0); hi = x.max(0)
        sc = (hi - lo) / (2**bits - 1); sc[sc == 0] = 1
        out[s:s+block] = np.round((x - lo) / sc) * sc + lo
    return out

def evaluate(codec, wiki, layers=None, E=256):
    Ks, Qs, Vs = wiki["K"].astype(np.float32), wiki["Q"].astype(np.float32), wiki["V"].astype(np.float32)
    L, H, T, D = Ks.shape; G = Qs.shape[1] // H
    res = []
    for l in (layers or range(L)):
        for h in range(H):
            K = Ks[l, h]; Kq = codec(l, h, K)
            res.append(attn_kl(Qs[l, h*G:(h+1)*G], K, Kq, Vs[l, h], E))
    r = np.array(res)
    return r[:, 0].mean(), np.percentile(r[:, 0], 99), r[:, 1].mean()
