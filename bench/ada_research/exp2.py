import numpy as np, time, sys
from screen import attn_kl, perchannel
from polar import fit_table, allocate, reconstruct
c = np.load('calib_qkv.npz'); w = np.load('wiki_qkv.npz')
Kc, Qc = c["K"].astype(np.float32), c["Q"].astype(np.float32)
Kw, Qw, Vw = w["K"].astype(np.float32), w["Q"].astype(np.float32), w["V"].astype(np.float32)
layers = [int(x) for x in sys.argv[1].split(",")]
Bs = [int(x) for x in sys.argv[2].split(",")]
H = 3; G = 3; P = 64
def center(K):
    mu = np.zeros_like(K)
    for s in range(0, len(K), P):
        mu[s:s+P] = K[s:s+P].mean(0).astype(np.float16).astype(np.float32)
    return K - mu, mu
res = {B: [] for B in Bs}
t = time.time()
for l in layers:
    for h in range(H):
        K = Kw[l, h]; Q = Qw[l, h*G:(h+1)*G]; V = Vw[l, h]
        Rc, _ = center(Kc[l, h]); Rw, mu = center(K)
        Qg = Qc[l, h*G:(h+1)*G].reshape(-1, 64)[::3]
        table = fit_table(Rc, Qg)
        for B in Bs:
            bits, books = allocate(table, B)
            res[B].append(attn_kl(Q, K, mu + reconstruct(Rw, bits, books), V))
    print("layer", l, time.time() - t, flush=True)
for B, r in res.items(): r = np.array(r); print(f"centered polar B={B}+16: kl {r[:,0].mean():.5f} p99 {np.percentile(r[:,0],99):.4f} out {r[:,1].mean():.4f}")
