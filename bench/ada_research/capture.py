"""Capture post-RoPE q, k, v per layer for a text: saves npz with K (L,H,T,D), V, Q (L,nq,T,D)."""
import sys, numpy as np, skvrt
from skvrt.kv import make_cache
from skvrt.generate import prefill
txt = open(sys.argv[1]).read()
out = sys.argv[2]
ntok = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
llm = skvrt.load(threads=1)
ids = llm.tokenizer.encode(txt)[:ntok]
print("tokens", len(ids))
cache = make_cache(llm.args, len(ids) + 8, "full", "float32")
Qs = {}
orig_attend = cache.attend
def attend(layer, q, pos):
    Qs.setdefault(layer, []).append(q.copy())
    return orig_attend(layer, q, pos)
cache.attend = attend
prefill(llm.model, cache, ids, chunk=256)
L, H, D = llm.args.num_hidden_layers, llm.args.num_key_value_heads, llm.args.head_dim
from skvrt.kv.attention import gather_dense
K = np.zeros((L, H, len(ids), D), np.float32); V = np.zeros_like(K)
for l in range(L):
    for h in range(H):
        ids_, _ = cache.table.pages(l, h)
        k, v, pos = gather_dense(cache.pools[0], ids_)
        K[l, h, pos] = k; V[l, h, pos] = v
Q = np.stack([np.concatenate(Qs[l], axis=1) for l in range(L)])
np.savez(out, K=K.astype(np.float16), V=V.astype(np.float16), Q=Q.astype(np.float16))
print(K.shape, Q.shape)
