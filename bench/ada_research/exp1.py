import numpy as np, time, sys
from screen import attn_kl, perchannel
from polar import fit_table, allocate, reconstruct
c = np.load('calib_qkv.npz'); w = np.load('wiki_qkv.npz')
Kc, Qc = c["K"].astype(np.float32), c["Q"].astype(np.float32)
Kw, Qw, Vw = w["K"].astype(np.float32), w["Q"].astype(np.float32), w["V"].astype(np.float32)
layers = [int(x) for x in sys.argv[1].split(",")]
Bs = [int(x) for x in sys.argv[2].split(",")]
H = 3; G = 3
res = {B: [] for B in Bs}; base = {b: [] for b in (2, 3, 4)}
t = time.time()
for l in layers:
    for h in range(H):
        K = Kw[l, h]; Q = Qw[l, h*G:(h+1)*G]; V = Vw[l, h]
        for b in (2, 3, 4):
            base[b].append(attn_kl(Q, K, perchannel(K, b), V))
        Qg = Qc[l, h*G:(h+1)*G].reshape(-1, 64)[::3]
        table = fit_table(Kc[l, h], Qg)
        for B in Bs:
            bits, books = allocate(table, B)
            res[B].append(attn_kl(Q, K, reconstruct(K, bits, books), V))
            if h == 0: print(l, B, bits, flush=True)
    print("layer", l, time.time() - t, flush=True)
for b, r in base.items(): r = np.array(r); print(f"perchannel int{b}: kl {r[:,0].mean():.5f} p99 {np.percentile(r[:,0],99):.4f} out {r[:,1].mean():.4f}")
for B, r in res.items(): r = np.array(r); print(f"polar B={B}: kl {r[:,0].mean():.5f} p99 {np.percentile(r[:,0],99):.4f} out {r[:,1].mean():.4f}")
