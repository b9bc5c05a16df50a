"""How much of a budgeted policy's KL is its utility estimate: run bench/rdr_dev.py with each token's utility
replaced by the attention the scored queries will really give it (an oracle, not a policy).

    OPENBLAS_NUM_THREADS=1 python bench/rdr_oracle_utility.py --text /usr/share/common-licenses/GPL-3 \
        --windows 2 --policy "spherical:budget=0.10"            # same arguments as bench/rdr_dev.py

Per window, a dense float32 pass over the window's first N tokens records every layer's queries at the scored
positions N-E .. N-1 and every key; the oracle utility of (layer, kv head, token) is the attention those queries
give the token, summed over the query group, averaged over the queries -- the scale of the measured utility
(`PagedKVCache.utilities`), which the oracle replaces (ORACLE=only, default), replaces for the prompt's tokens only
(ORACLE=prompt) or adds to (ORACLE=add). The
policy then runs as usual (teacher-forced decode of the E scored tokens). Lookahead is off: the oracle knows more.

Decomposition modes (the prompt's tokens only, like ORACLE=prompt; no floor): the same pass also gives the prior,
the attention of the prompt's last 32 queries (what lookahead computes, here from exact queries and keys), and
its per-head reach (Policy.horizon, 256):
  ORACLE=prior          the prior
  ORACLE=prior-oscale   the prior, scaled per (layer, head) to the oracle's sum over the prompt's tokens
  ORACLE=prior-reach    the prior x reach / G (what horizon=256 does)
  ORACLE=oracle-pscale  the oracle, scaled per (layer, head) to the prior's sum
  ORACLE=prior-dist     the prior x, per token, how much less a query E tokens on gives a token than a last query
                        does, by the head's attention per distance (`distance_ratio`)
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from skvrt import evaluate  # noqa: E402
from skvrt.kv import make_cache  # noqa: E402
from skvrt.ops import log_softmax  # noqa: E402
from utility_predictors import record  # noqa: E402  (bench/, this script's folder)

MODE = os.environ.get("ORACLE", "only")
_current = {}  # the window being evaluated: model, tokens, N, E
_priors = {}  # window bytes -> attention_tables(...)


def oracle_prior(model, wt: np.ndarray, N: int, E: int) -> np.ndarray:
    """(L * H, N) attention of the queries at N-E .. N-1 to every token, summed over each query group, mean over
    the queries (dense float32 cache, one pass: bench/utility_predictors.record)."""
    return attention_tables(model, wt, N, E)["oracle"]


def distance_ratio(att: np.ndarray, qpos: np.ndarray, N: int, P: int, E: int) -> np.ndarray:
    """att (n, N): the prior queries' attention (at positions qpos (n,)) -> (N,) for each prompt token at distance
    delta = P - i from the prompt's end, the mean over j < E of g(delta + j) / g(delta), where g is the head's mean
    attention per token at a distance, in log2 bins of distance (a separable model: content x distance)."""
    d = qpos[:, None] - np.arange(N)[None, :]  # (n, N)
    ok = d >= 0
    b = np.floor(np.log2(np.maximum(d, 0) + 1)).astype(np.int64)
    nb = int(np.log2(N + E + 1)) + 2
    g = np.bincount(b[ok], weights=att[ok], minlength=nb) / np.maximum(np.bincount(b[ok], minlength=nb), 1)
    g = np.maximum(g, 1e-12)
    for k in range(1, nb):  # bins no query reached (beyond the context): the last reached bin's level
        if not (b[ok] == k).any():
            g[k] = g[k - 1]
    delta = np.arange(1, P + 1)  # token i = P - delta
    fut = np.floor(np.log2(delta[:, None] + np.arange(E)[None, :] + 1)).astype(np.int64)  # (P, E)
    r = g[fut].mean(axis=1) / g[np.floor(np.log2(delta + 1)).astype(np.int64)]
    out = np.zeros(N)
    out[P - delta] = r
    return out


def attention_tables(model, wt: np.ndarray, N: int, E: int, n_obs: int = 32, horizon: int = 256) -> dict:
    """One dense float32 pass over the window's first N tokens -> {"oracle": (L * H, N) attention of the scored
    queries (N-E .. N-1), "prior": (L * H, N) of the prompt's last n_obs queries, "reach": (L * H, 1) reach / G of
    those (Policy.horizon), "ratio": (L * H, N) `distance_ratio`}; each summed over the query group, mean over the
    queries."""
    key = wt[:N].tobytes()
    if key in _priors:
        return _priors[key]
    args = model.args
    qs, ks = record(model, wt[:N])
    L, H = args.num_hidden_layers, args.num_key_value_heads
    P = N - E
    orc, pri, reach = np.zeros((L * H, N)), np.zeros((L * H, N)), np.zeros((L * H, 1))
    ratio = np.zeros((L * H, N))
    sel = np.r_[P - n_obs : P, P:N]  # the prior's queries, then the scored ones
    causal = np.arange(N)[None, :] > sel[:, None]  # (n_obs + E, N) key after query
    far = np.clip(sel[:n_obs, None] - np.arange(N)[None, :], 0, horizon) / horizon  # (n_obs, N)
    for layer in range(L):
        q, k = qs[layer][:, sel], ks[layer]
        G = q.shape[0] // H
        for h in range(H):
            s = (q[h * G : (h + 1) * G] @ k[h].T) * args.head_dim ** -0.5  # (G, n_obs + E, N)
            p = np.exp(log_softmax(np.where(causal, -np.inf, s))).sum(axis=0)  # (n_obs + E, N)
            orc[layer * H + h], pri[layer * H + h] = p[n_obs:].mean(axis=0), p[:n_obs].mean(axis=0)
            reach[layer * H + h] = (p[:n_obs] * far).sum(axis=1).mean() / G
            ratio[layer * H + h] = distance_ratio(p[:n_obs], sel[:n_obs], N, P, E)
    _priors[key] = out = {"oracle": orc, "prior": pri, "reach": reach, "ratio": ratio}
    return out


def prompt_utilities(model, wt: np.ndarray, N: int, E: int) -> dict:
    """{mode: (L * H, N) utility of the prompt's tokens (0 after the prompt)} for the decomposition modes."""
    t = attention_tables(model, wt, N, E)
    P = N - E
    orc, pri = t["oracle"].copy(), t["prior"].copy()
    orc[:, P:] = pri[:, P:] = 0
    so, sp = orc.sum(1, keepdims=True), pri.sum(1, keepdims=True)
    print(f"per-head sums over the prompt, correlation with the oracle's: prior {np.corrcoef(sp[:, 0], so[:, 0])[0, 1]:.3f}, "
          f"reach {np.corrcoef(t['reach'][:, 0], so[:, 0])[0, 1]:.3f}", flush=True)
    return {"prior-dist": pri * t["ratio"], "prior": pri, "prior-oscale": pri * so / np.maximum(sp, 1e-30),
            "prior-reach": pri * t["reach"], "oracle-pscale": orc * sp / np.maximum(so, 1e-30)}


def main() -> None:
    run_window = evaluate.KLEvaluator.run_window

    def oracle_run_window(self, i, kv_policy="full", kv_dtype="float16", **opts):
        _current.update(model=self.model, wt=np.asarray(self.windows[i]), N=self.window, E=self.eval_tokens)
        return run_window(self, i, kv_policy, kv_dtype, **opts)

    def oracle_make_cache(args, n_ctx=None, kv_policy="full", kv_dtype="float16", **opts):
        cache = make_cache(args, n_ctx=n_ctx, kv_policy=kv_policy, kv_dtype=kv_dtype, **{**opts, "lookahead": 0})
        if MODE in ("prior", "prior-oscale", "prior-reach", "oracle-pscale", "prior-dist"):
            u = prompt_utilities(_current["model"], _current["wt"], _current["N"], _current["E"])[MODE]
            measured = cache.utilities
            prompt = _current["N"] - _current["E"]
            cache.utilities = lambda pos, mass, lh=None: np.where(pos < prompt, u[lh, np.minimum(pos, prompt - 1)],
                                                                  measured(pos, mass, lh))
            return cache
        prior = oracle_prior(_current["model"], _current["wt"], _current["N"], _current["E"])
        if MODE == "only":
            cache.utilities = lambda pos, mass, lh=None: prior[lh, pos]
        elif MODE == "prompt":  # the oracle for the prompt's tokens, the measured utility for the scored ones
            measured = cache.utilities
            prompt = _current["N"] - _current["E"]
            cache.utilities = lambda pos, mass, lh=None: np.where(pos < prompt, prior[lh, pos], measured(pos, mass, lh))
        else:
            measured = cache.utilities
            cache.utilities = lambda pos, mass, lh=None: measured(pos, mass, lh) + prior[lh, pos]
        return cache

    evaluate.KLEvaluator.run_window = oracle_run_window
    evaluate.make_cache = oracle_make_cache
    sys.argv = ["rdr_dev.py", *sys.argv[1:]]
    runpy.run_path(str(Path(__file__).with_name("rdr_dev.py")), run_name="__main__")


if __name__ == "__main__":
    main()
