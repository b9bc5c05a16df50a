import numpy as np
from screen import attn_kl, perchannel
from polar import fit_table, allocate, reconstruct
c = np.load('calib_qkv.npz'); w = np.load('wiki_qkv.npz')
l, h = 15, 1
Kc = c["K"][l, h].astype(np.float32); K = w["K"][l, h].astype(np.float32)
Q = w["Q"][l, 3*h:3*h+3].astype(np.float32); V = w["V"][l, h].astype(np.float32)
Qc = c["Q"][l, 3*h:3*h+3].astype(np.float32).reshape(-1, 64)[::3]
def rel(Kq): return np.sum((K - Kq)**2) / np.sum(K**2)
def qerr(Kq):  # logit error std relative to logit std
    s = Q.reshape(-1, 64)[::7] @ K.T; sq = Q.reshape(-1, 64)[::7] @ Kq.T
    return np.std(s - sq) / np.std(s)
for b in (4, 8):
    Kq = perchannel(K, b); print("perchannel", b, rel(Kq), qerr(Kq), attn_kl(Q, K, Kq, V))
tb = fit_table(Kc, Qc)
for B in (192, 256):
    bits, books = allocate(tb, B); Kq = reconstruct(K, bits, books)
    print("polar", B, rel(Kq), qerr(Kq), attn_kl(Q, K, Kq, V))
    Kq2 = reconstruct(Kc, bits, books); print("  on calib: rel", np.sum((Kc-Kq2)**2)/np.sum(Kc**2))
# per-pair radius stats
D=64; hh=32
r = np.hypot(K[:, :hh], K[:, hh:]); print("radius mean/std per pair (first 8):", np.round(r.mean(0)[:8],2), np.round(r.std(0)[:8],2))
rc = np.hypot(Kc[:, :hh], Kc[:, hh:]); print("calib radius mean/std:", np.round(rc.mean(0)[:8],2), np.round(rc.std(0)[:8],2))
