"""How much the model's output cares about each (layer, kv head)'s attention: RDR's exchange rate between its
objective and the output KL, measured once per model by `skvrt calibrate`.

RDR minimises sum utility x distortion, where dropping a token costs its attention mass (distortion 1). The same
mass dropped in two heads does not hurt the output alike: some heads' outputs barely reach the logits, others
steer them. On the calibration text's first TOKENS tokens, per (layer, kv head):

    a dense float32 pass, then one per (layer, kv head) in which a fixed random share FRAC of the tokens outside
    sinks + window is masked out of that head's attention (every query of its group, every position), the rest
    of the model exact (the layers before it are not rerun: `Model.forward(start=...)`).
    sensitivity = mean over every STRIDE-th position from FIRST_SCORED on of KL(exact || perturbed) / the mean
    attention mass dropped there (summed over the group, the scale of RDR's utility; at least MIN_MASS).

The spherical allocator multiplies each head's distortions (drop included) by (sensitivity / its geometric mean
over the heads) ^ HEAD_WEIGHT_POWER (skvrt.kv). Dev texts at 10 % of fp16: KL 0.0523 -> 0.0304 (docs/QUALITY.md,
session 14). Cost: one pass per head from its layer on, ~3-5 min on one CPU core for the default model.
"""

from __future__ import annotations

import numpy as np

from .ops import log_softmax

TOKENS = 512  # calibration tokens the measurement runs on (its cost: one pass per head over them)
FRAC = 0.5  # share of the old tokens (outside sinks + window) dropped from one head's attention
SINKS, WINDOW = 4, 32  # pinned as the spherical policy pins them (skvrt.kv.RDR_WINDOW)
FIRST_SCORED = 64  # positions before this are not scored (little is old there)
STRIDE = 2  # every this many positions from FIRST_SCORED on are scored (the KL over the vocabulary is what costs)
SEED = 0
MIN_MASS = 1e-3  # a head that gives the dropped keys less mass than this is scored against this much (its KL is
# float noise over a near-zero mass)


def head_sensitivity(model, tokens: np.ndarray, frac: float = FRAC, seed: int = SEED, progress=None) -> np.ndarray:
    """tokens (N,) calibration text, N > FIRST_SCORED -> (L, H, 2): per (layer, kv head) the mean KL(exact ||
    perturbed) over the scored positions and the mean attention mass dropped there (see the module)."""
    from .kv import make_cache

    a = model.args
    L, H, D = a.num_hidden_layers, a.num_key_value_heads, a.head_dim
    G = a.num_attention_heads // H
    tokens = np.asarray(tokens, np.int64)
    N = len(tokens)
    if N <= FIRST_SCORED:
        raise ValueError(f"head sensitivity needs more than {FIRST_SCORED} tokens, got {N}")
    kpos = np.arange(N)
    scored = kpos[FIRST_SCORED::STRIDE]
    dropped = np.random.default_rng(seed).random(N) < frac  # (N,) the same keys for every head
    gone = dropped[None, :] & (kpos[None, :] >= SINKS) & (kpos[:, None] - kpos[None, :] > WINDOW)  # (N q, N k)
    causal = kpos[None, :] > kpos[:, None]  # (N q, N k)

    def logits(target=None, start=None, taps=None) -> tuple[np.ndarray, np.ndarray, float]:
        """-> (scored, V) float32 logits with (layer, kv head) `target` perturbed (None: exact), (scored,) their
        log-sum-exp, and the mean mass dropped."""
        cache = make_cache(a, n_ctx=N, kv_policy="full", kv_dtype="float32")
        attend, append = cache.attend, cache.append
        held, mass = {}, [0.0]

        def keeping_append(layer, k, v):  # k, v (H, N, D)
            if target and layer == target[0]:
                held["k"], held["v"] = k[target[1]].astype(np.float64), v[target[1]].astype(np.float64)
            return append(layer, k, v)

        def dropping_attend(layer, q, qpos):  # q (nq, N, D), qpos (N,) -> (nq, N, D)
            o = attend(layer, q, qpos)
            if not target or layer != target[0]:
                return o
            g = slice(target[1] * G, (target[1] + 1) * G)
            s = (q[g].astype(np.float64) @ held["k"].T) * D ** -0.5  # (G, N, N)
            p = np.exp(log_softmax(np.where(causal, -np.inf, s)))
            mass[0] = float((p * gone).sum(axis=(0, 2))[scored].mean())
            o = np.array(o, copy=True)
            o[g] = (np.exp(log_softmax(np.where(causal | gone, -np.inf, s))) @ held["v"]).astype(o.dtype)
            return o

        cache.append, cache.attend = keeping_append, dropping_attend
        z = model.forward(tokens, cache, start=start, taps=taps, rows=scored)  # (scored, V)
        top = z.max(axis=1)
        return z, top + np.log(np.exp(z - top[:, None]).sum(axis=1, dtype=np.float64)), mass[0]

    taps = []  # the residual stream entering each layer, exact
    z_exact, lse_exact, _ = logits(taps=taps)
    p_exact = np.exp(z_exact - lse_exact[:, None]).astype(np.float32)  # (scored, V)
    out = np.zeros((L, H, 2))
    for layer in range(L):
        for h in range(H):
            z, lse, m = logits((layer, h), start=(layer, taps[layer]))
            # KL(p || q) = sum_v p (z_p - z_q) - lse_p + lse_q: no (scored, V) float64 array
            kl = (p_exact * (z_exact - z)).sum(axis=1, dtype=np.float64) - lse_exact + lse
            out[layer, h] = kl.mean(), m
            if progress:
                progress(layer * H + h + 1, L * H)
    return out
