import numpy as np
from screen import attn_kl, perchannel
c = np.load('calib_qkv.npz'); w = np.load('wiki_qkv.npz')
l, h = 15, 1
Kc = c["K"][l, h].astype(np.float32); K = w["K"][l, h].astype(np.float32)
Q = w["Q"][l, 3*h:3*h+3].astype(np.float32); V = w["V"][l, h].astype(np.float32)
def rel(Kq): return np.sum((K - Kq)**2) / np.sum(K**2)
def km2(X, n, it=15, seed=0):
    rng = np.random.default_rng(seed); C = X[rng.choice(len(X), n, replace=False)].copy()
    for _ in range(it):
        a = ((X[:, None] - C[None])**2).sum(-1).argmin(1)
        for d in range(2):
            s = np.bincount(a, weights=X[:, d], minlength=n); cnt = np.bincount(a, minlength=n)
            C[:, d] = np.where(cnt > 0, s / np.maximum(cnt, 1), C[:, d])
    return C
def vq(K, Kc, n, P=None):
    out = np.zeros_like(K)
    for i in range(32):
        X = np.stack([Kc[:, i], Kc[:, i+32]], 1); C = km2(X, n)
        Y = np.stack([K[:, i], K[:, i+32]], 1); a = ((Y[:, None] - C[None])**2).sum(-1).argmin(1)
        out[:, i], out[:, i+32] = C[a, 0], C[a, 1]
    return out
for n in (64, 256):
    Kq = vq(K, Kc, n); print("2D kmeans", n, rel(Kq), attn_kl(Q, K, Kq, V))
# per-page normalised: subtract page mean, divide by page per-channel std -> kmeans on normalised
def norm(K, P=64):
    mu = np.zeros_like(K); sd = np.zeros_like(K)
    for s in range(0, len(K), P):
        mu[s:s+P] = K[s:s+P].mean(0); sd[s:s+P] = K[s:s+P].std(0) + 1e-6
    return (K - mu) / sd, mu, sd
Nc, _, _ = norm(Kc); Nw, mu, sd = norm(K)
for n in (64, 256):
    Kq = mu + sd * vq(Nw, Nc, n); print("page-normalised 2D kmeans", n, rel(Kq), attn_kl(Q, K, Kq, V))
