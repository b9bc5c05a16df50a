"""Per-channel block quantization with query-weighted bit allocation across channels (bits per channel
0..8, same for the pair's two channels), vs uniform int-b. Allocation fit on calib, measured on wiki."""
import numpy as np, sys
from screen import attn_kl, perchannel
c = np.load('calib_qkv.npz'); w = np.load('wiki_qkv.npz')
Kc, Qc = c["K"].astype(np.float32), c["Q"].astype(np.float32)
Kw, Qw, Vw = w["K"].astype(np.float32), w["Q"].astype(np.float32), w["V"].astype(np.float32)
P = 64
def alloc(K, Q, B):
    # expected distortion of channel d at b bits: E[q_d^2] * mean_page(range_d^2) / (12 (2^b-1)^2)
    rng2 = np.mean([(K[s:s+P].max(0) - K[s:s+P].min(0))**2 for s in range(0, len(K) - P + 1, P)], 0)
    q2 = np.mean(Q**2, 0)
    wgt = q2 * rng2 / 12
    pw = wgt[:32] + wgt[32:]  # pair weight (both channels share bits)
    bits = np.zeros(32, int)
    def dist(b): return 0.0 if b >= 16 else (1.0 if b == 0 else 1.0 / (2**b - 1)**2)
    for _ in range(B // 2):  # each step adds one bit to both channels of a pair
        gain = [pw[i] * ((dist(bits[i]) if bits[i] else 4.0) - dist(bits[i] + 1)) if bits[i] < 8 else -1 for i in range(32)]
        bits[int(np.argmax(gain))] += 1
    return np.concatenate([bits, bits])
def quant_alloc(K, bits):
    out = np.zeros_like(K)
    for s in range(0, len(K), P):
        x = K[s:s+P]; lo = x.min(0); hi = x.max(0)
        for d in range(64):
            b = bits[d]
            if b == 0: out[s:s+P, d] = x[:, d].mean(); continue
            sc = (hi[d] - lo[d]) / (2**b - 1) or 1.0
            out[s:s+P, d] = np.round((x[:, d] - lo[d]) / sc) * sc + lo[d]
    return out

if __name__ == "__main__":
    layers = [int(x) for x in sys.argv[1].split(",") if x]
    res = {}
    for l in layers:
        for h in range(3):
            K = Kw[l, h]; Q = Qw[l, 3*h:3*h+3]; V = Vw[l, h]
            Qg = Qc[l, 3*h:3*h+3].reshape(-1, 64)
            for B in (128, 160, 192, 256):
                bits = alloc(Kc[l, h], Qg, B)
                res.setdefault(f"alloc{B}", []).append(attn_kl(Q, K, quant_alloc(K, bits), V))
            for b in (2, 3, 4):
                res.setdefault(f"int{b}", []).append(attn_kl(Q, K, perchannel(K, b), V))
        print("layer", l, flush=True)
    for k, r in res.items():
        r = np.array(r); print(f"{k}: kl {r[:,0].mean():.5f} p99 {np.percentile(r[:,0],99):.4f} out {r[:,1].mean():.4f}")
