"""Which attention signal available at the end of a prompt predicts the attention of the queries that follow it
(the utility RDR needs)? Dev text only.

    OPENBLAS_NUM_THREADS=1 python bench/utility_predictors.py --text /usr/share/common-licenses/GPL-3 --windows 2

Per window of N + 1 tokens (as bench/rdr_dev.py: the first N - E are the prompt, the last E are scored), one dense
float32 pass records every layer's queries and keys. For each (layer, kv head), over the prompt's tokens outside
sinks + window:
- oracle: the attention the E scored queries give each token (summed over the query group, mean over queries);
- `last:n`: the same from the prompt's last n queries (lookahead records n = obs = 32);
- `mean`: each token's mean attention over every later prompt query (the measured utility with every query an
  observer); `mean+last:32` their sum (what spherical adds when lookahead is on); `ema:tau`: the mean with
  exponential forgetting, query weights exp(-age / tau) (a running average that forgets);
each max-pooled over +-POOL_RADIUS neighbours as the allocator does (--pool-radius). Score: keep each head's top fraction f of
tokens by the predictor; report the oracle mass kept, as a share of what keeping the oracle's own top f keeps.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import skvrt  # noqa: E402
from skvrt.evaluate import split_windows, tokenize_text  # noqa: E402
from skvrt.kv import make_cache, rdr  # noqa: E402
from skvrt.ops import log_softmax  # noqa: E402


def record(model, tokens: np.ndarray) -> tuple[dict, dict]:
    """One dense float32 pass -> {layer: q (nq, N, D)}, {layer: k (H, N, D)} float64."""
    N = len(tokens)
    cache = make_cache(model.args, n_ctx=N, kv_policy="full", kv_dtype="float32")
    qs, ks = {}, {}
    attend, append = cache.attend, cache.append

    def recording_attend(layer, q, qpos):  # q (nq, T, D)
        qs.setdefault(layer, []).append(q.astype(np.float64))
        return attend(layer, q, qpos)

    def recording_append(layer, k, v):  # k (H, T, D)
        ks.setdefault(layer, []).append(k.astype(np.float64))
        return append(layer, k, v)

    cache.attend, cache.append = recording_attend, recording_append
    for s in range(0, N, 512):
        model.forward(tokens[s : s + 512], cache)
    return ({l: np.concatenate(x, axis=1) for l, x in qs.items()}, {l: np.concatenate(x, axis=1) for l, x in ks.items()})


def predictors(q: np.ndarray, k: np.ndarray, prompt: int, lasts) -> dict:
    """q (G, N, D), k (N, D) of one (layer, kv head) -> {name: (prompt,) utility of the prompt's tokens}."""
    N, D = k.shape
    s = (q @ k.T) * D ** -0.5  # (G, N, N)
    p = np.exp(log_softmax(np.where(np.arange(N)[None, :] > np.arange(N)[:, None], -np.inf, s)))  # (G, N, N)
    att = p.sum(axis=0)[:, :prompt]  # (N queries, prompt keys), summed over the group
    out = {"oracle": att[prompt:].mean(axis=0)}
    for n in lasts:
        out[f"last:{n}"] = att[prompt - n : prompt].mean(axis=0)
    later = np.tril(np.ones((prompt, prompt), bool))  # [query, key]: query at or after key
    n_obs = later.sum(axis=0)
    out["mean"] = att[:prompt].sum(axis=0) / n_obs
    out["mean+last:32"] = out["mean"] + out["last:32"]
    for tau in (64, 256, 1024):  # running average with exponential forgetting (time constant tau queries)
        w = np.exp(-(prompt - 1 - np.arange(prompt)) / tau)  # (prompt,) weight of each query
        out[f"ema:{tau}"] = (w @ att[:prompt]) / np.maximum(w @ later, 1e-300)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", action="append", required=True)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=256)
    ap.add_argument("--keep", default="0.2,0.35,0.5", help="kept fractions")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=32, help="the pinned window")
    ap.add_argument("--pool-radius", type=int, default=rdr.POOL_RADIUS, help="max-pooling radius (0: none)")
    a = ap.parse_args()
    if any("wiki" in Path(t).name.lower() for t in a.text):
        raise SystemExit("dev text only: WikiText is the evaluation set")
    llm = skvrt.load(None, n_ctx=64, threads=1, device="cpu")
    H, L = llm.args.num_key_value_heads, llm.args.num_hidden_layers
    G = llm.args.num_attention_heads // H
    keeps = [float(x) for x in a.keep.split(",")]
    lasts = (16, 32, 64, 128, 256)
    prompt = a.window - a.eval_tokens
    scores: dict = {}
    for text in a.text:
        for wt in split_windows(tokenize_text(llm.tokenizer, Path(text).read_text()), a.window, a.eval_tokens,
                                a.windows):
            qs, ks = record(llm.model, np.asarray(wt[: a.window]))
            for layer in range(L):
                for h in range(H):
                    pr = predictors(qs[layer][h * G : (h + 1) * G], ks[layer][h], prompt, lasts)
                    sel = slice(a.sinks, prompt - a.recent)  # the tokens the allocator chooses among
                    pos = np.arange(prompt)[sel]
                    lh = np.zeros(len(pos), np.int64)
                    oracle = pr["oracle"][sel]
                    best = np.sort(oracle)[::-1]
                    for name, u in pr.items():
                        u = rdr.pool_neighbours(lh, pos, u[sel], a.pool_radius)
                        order = np.argsort(-u, kind="stable")
                        for f in keeps:
                            K = int(f * len(pos))
                            scores.setdefault((name, f), []).append(oracle[order[:K]].sum() / best[:K].sum())
            print(f"{Path(text).name}: window done", flush=True)
    print("| predictor | " + " | ".join(f"keep {f:.0%}" for f in keeps) + " |")
    print("|---|" + "---:|" * len(keeps))
    for name in dict.fromkeys(k[0] for k in scores):
        print(f"| `{name}` | " + " | ".join(f"{np.mean(scores[(name, f)]):.3f}" for f in keeps) + " |")


if __name__ == "__main__":
    main()
