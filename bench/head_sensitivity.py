"""How much does the model's output care about each (layer, kv head)'s attention? A per-head exchange rate between
RDR's objective (utility x distortion: dropping a token costs its attention mass) and the output KL -- and what
weighting each head's utility by it does to the budgeted KL. Scratch research (session 14), not a policy yet.

    # 1. measure on a text (never the evaluation text): one dense float32 pass, then one per (layer, kv head)
    OPENBLAS_NUM_THREADS=1 python bench/head_sensitivity.py measure TEXT --tokens 1024 --out sens.npy
    # 2. the dev KL with every head's utility x (s_h / geometric mean of s)^alpha (bench/rdr_dev.py's arguments)
    OPENBLAS_NUM_THREADS=1 python bench/head_sensitivity.py dev --weights sens.npy --alpha 0.5 \
        --text GPL-3 --windows 2 --policy "spherical:budget=0.10"

measure: a fixed random half (--frac) of the tokens outside sinks (4) + window (32) is dropped from the attention
of one (layer, kv head) at a time -- for every query of its group, the dropped keys masked out before the
softmax -- and everything after that head runs as usual. s_h = mean over positions >= 64 of KL(dense || perturbed)
/ the mean attention mass dropped (summed over the group, as the allocator's utility). Writes (L, H, 2): the KL
and the mass. 30 layers x 3 heads of the default model at 1,024 tokens: ~25 min on one core.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import skvrt  # noqa: E402
from skvrt import evaluate  # noqa: E402
from skvrt.evaluate import tokenize_text  # noqa: E402
from skvrt.kv import make_cache  # noqa: E402
from skvrt.ops import log_softmax  # noqa: E402

SINKS, WINDOW, FIRST_SCORED = 4, 32, 64


def perturbed_log_probs(model, tokens: np.ndarray, dropped: np.ndarray, target=None) -> tuple[np.ndarray, float]:
    """Log-probabilities (N - FIRST_SCORED, V) of a dense float32 pass over tokens (N,), with the tokens `dropped`
    (N,) bool outside sinks + window masked out of the attention of (layer, kv head) `target` (None: exact) ->
    (log-probabilities, mean dropped attention mass over the scored positions)."""
    a = model.args
    N, D = len(tokens), a.head_dim
    G = a.num_attention_heads // a.num_key_value_heads
    cache = make_cache(a, n_ctx=N, kv_policy="full", kv_dtype="float32")
    attend, append = cache.attend, cache.append
    held, mass = {}, np.zeros(N)

    def keeping_append(layer, k, v):  # k, v (H, T, D)
        if target and layer == target[0]:
            held["k"], held["v"] = k[target[1]].astype(np.float64), v[target[1]].astype(np.float64)
        return append(layer, k, v)

    def dropping_attend(layer, q, qpos):  # q (nq, T, D) -> (nq, T, D)
        o = attend(layer, q, qpos)
        if not target or layer != target[0]:
            return o
        g = slice(target[1] * G, (target[1] + 1) * G)
        s = (q[g].astype(np.float64) @ held["k"].T) * D ** -0.5  # (G, T, N)
        kpos = np.arange(N)
        causal = kpos[None, :] > qpos[:, None]  # (T, N)
        gone = dropped[None, :] & (kpos[None, :] >= SINKS) & (qpos[:, None] - kpos[None, :] > WINDOW)
        p = np.exp(log_softmax(np.where(causal, -np.inf, s)))
        mass[qpos] = (p * gone).sum(axis=(0, 2))
        o = np.array(o, copy=True)
        o[g] = (np.exp(log_softmax(np.where(causal | gone, -np.inf, s))) @ held["v"]).astype(o.dtype)
        return o

    cache.append, cache.attend = keeping_append, dropping_attend
    logits = model.forward(tokens, cache, all_logits=True)[FIRST_SCORED:]
    return log_softmax(logits.astype(np.float64)), float(mass[FIRST_SCORED:].mean())


def measure(a) -> None:
    llm = skvrt.load(a.model, n_ctx=64, threads=1, device="cpu")
    model = llm.model
    tokens = np.asarray(tokenize_text(llm.tokenizer, Path(a.text).read_text()))[: a.tokens]
    dropped = np.random.default_rng(a.seed).random(len(tokens)) < a.frac
    L, H = model.args.num_hidden_layers, model.args.num_key_value_heads
    t0 = time.perf_counter()
    ref, _ = perturbed_log_probs(model, tokens, dropped)
    out = np.zeros((L, H, 2))
    for layer in range(L):
        for h in range(H):
            lp, m = perturbed_log_probs(model, tokens, dropped, (layer, h))
            out[layer, h] = (np.exp(ref) * (ref - lp)).sum(-1).mean(), m
            print(f"layer {layer} head {h}: KL {out[layer, h, 0]:.5f} / mass {m:.4f} = {out[layer, h, 0] / m:.5f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            np.save(a.out, out)
    s = np.log(out[..., 0] / out[..., 1])
    print(f"{len(tokens)} tokens; log s: sd {s.std():.2f}; layer means explain {1 - s.var(1).mean() / s.var():.2f}")


def head_weights(path: str, alpha: float) -> np.ndarray:
    """(L * H,) (s_h / geometric mean of s)^alpha from a `measure` output."""
    r = np.load(path)
    s = np.log(r[..., 0] / np.maximum(r[..., 1], 1e-12)).reshape(-1)
    return np.exp(alpha * (s - s.mean()))


def dev(a, rest: list[str]) -> None:
    w = head_weights(a.weights, a.alpha)
    print(f"head weights {w.min():.3f} .. {w.max():.3f} (alpha {a.alpha})", flush=True)

    def weighted_make_cache(args, n_ctx=None, kv_policy="full", kv_dtype="float16", **opts):
        cache = make_cache(args, n_ctx=n_ctx, kv_policy=kv_policy, kv_dtype=kv_dtype, **opts)
        measured = cache.utilities
        cache.utilities = lambda pos, mass, lh=None: measured(pos, mass, lh) * (1.0 if lh is None else w[lh])
        return cache

    evaluate.make_cache = weighted_make_cache
    sys.argv = ["rdr_dev.py", *rest]
    runpy.run_path(str(Path(__file__).with_name("rdr_dev.py")), run_name="__main__")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("text")
    m.add_argument("--model", default=None)
    m.add_argument("--tokens", type=int, default=1024)
    m.add_argument("--frac", type=float, default=0.5, help="share of the old tokens dropped")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)
    d = sub.add_parser("dev", help="bench/rdr_dev.py with weighted utilities; other arguments go to it")
    d.add_argument("--weights", required=True)
    d.add_argument("--alpha", type=float, default=0.5)
    a, rest = ap.parse_known_args()
    if a.cmd == "measure":
        if rest:
            ap.error(f"unknown arguments {rest}")
        if "wiki" in Path(a.text).name.lower():
            raise SystemExit("measure on dev or calibration text: WikiText is the evaluation set")
        measure(a)
    else:
        dev(a, rest)


if __name__ == "__main__":
    main()
