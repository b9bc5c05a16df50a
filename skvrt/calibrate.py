"""`skvrt calibrate`: measure how each RoPE pair of each (layer, kv head) matters to the logits, and what each
tier of a ladder of ADA tiers costs in attention distortion, once per model; write the sidecar
`skvrt-kv.safetensors` next to the weights.

The calibration text's tokens are prefilled with a dense float32 cache; the first 1 - HELD_BACK of them give
the statistics, the last HELD_BACK (held back) the ladder's distortion.

Statistics (post-RoPE):
    q_sq       (L, H, D)  mean of q_d^2 over tokens and the query heads of the KV head's group
    k_range_sq (L, H, D)  mean over pages of P consecutive tokens of (max - min)^2 of key channel d
    angle_err, radius_err (L, H, D/2, MAX_WIDTH + 1)  the attention-weighted squared logit error of pair i when
               only its angle (radius) is coded with b bits in page-local frames of P tokens, the other exact
               (skvrt.kv.ada.polar_error_tables with attention_moments: each key weighted by the attention the
               calibration's queries give it; the first TABLE_TOKENS tokens of the statistics part)
ADA tiers choose every pair's angle and radius widths from the two tables (skvrt.kv.ada.allocate_polar_bits), so any
tier size can be built from the sidecar. Sidecars without the tables spread key bits over pairs by weight_i = sum
over the pair's two channels of q_sq * k_range_sq (skvrt.kv.ada.allocate_bits) and split them evenly (on the dev
text, all old tokens at ada128-v4: KL 0.0185 that way, 0.0137 from the tables; docs/ADA_NOTES.md).

Tier distortion ladder_distortion (L, H, n_tiers), measured for every tier of MEASURED_TIERS (a menu: any
ladder built from these tiers gets measured distortions, `Calibration.distortion`): tier (key_bits, v_bits) is
Calibration.ada_tier(key_bits, v_bits, v_group). Per (layer, kv head), the held-back tokens'
keys and values are encoded page-locally (pages of LADDER_PAGE tokens, as the cache does) and the pages cut
into spans of up to SPAN_PAGES pages; within a span every token's query heads (the G of the kv head's group)
attend causally to the span's tokens (key j <= query t). With s = q.k / sqrt(D) the exact logits, s_hat the
codec's (from the codes), v / v_hat exact / dequantised values, p_t = softmax(s_t) the attention of query t
and o = p @ v the exact output:
    d = E_t[sum_j p_t(j) (s_hat_tj - s_tj)^2] + E||v_hat - v||^2 / E||v - o||^2
the first term over queries (the keys' squared logit error, weighted by the attention they get), the value
error over keys, E||v - o||^2 over causal pairs. For a key with attention weight p, a logit error ds moves
the output by ~ p ds (v - o), a value error dv by p dv, and dropping the key by ~ p (v - o): d is the tier's
error relative to dropping the key (dense 0, dropped 1). (Until session 10 the logit term was a plain mean over
causal pairs; the attention-weighted one counts the keys attention uses, which the measured key widths favour;
docs/ADA_NOTES.md.)

Default calibration text: text the model writes itself from fixed prompts (seeded sampling), never the
evaluation text. `--text FILE` uses the user's file instead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .errors import ModelLoadError
from .head_sensitivity import MIN_MASS, TOKENS as SENSITIVITY_TOKENS, head_sensitivity
from .loader import SIDECAR  # one name for the sidecar file
from .safetensors_io import read_safetensors, read_safetensors_header, write_safetensors

FORMAT = 1
TABLE_TOKENS = 2048  # the error tables use the first this many calibration tokens (their attention is O(T^2))
HELD_BACK = 0.25  # fraction of the calibration tokens held back from the statistics, for the ladder
DEFAULT_LADDER = ((256, 4), (192, 2))  # the spherical policy's ADA tiers (key bits per token per head, value bits),
# richest first; skvrt.kv.DEFAULT_LADDER is this one. (256:4 / 192:2 / 128:2 until session 10: with the measured key
# widths the 128:2 step cost more than it saved, dev KL at 25 % 0.0097 with it, 0.0076 without; docs/QUALITY.md)
MEASURED_TIERS = ((256, 4), (256, 2), (192, 4), (192, 2), (128, 4), (128, 2), (96, 2), (64, 2))  # the menu
LADDER_V_GROUP = 64  # value group of the ladder's tiers (the gcd with head_dim when it does not divide it)
LADDER_PAGE = 64  # tokens per page in the distortion measurement
SPAN_PAGES = 4  # pages per span of causal attention in the distortion measurement
PROMPTS = [
    "Write a detailed essay about the history of the Roman Empire.",
    "Explain how a computer CPU works, step by step.",
    "Write a Python program that parses a CSV file and computes statistics, with comments.",
    "Tell me a long story about a sailor lost at sea.",
    "Describe the geography, climate and economy of Brazil.",
    "List twenty interesting facts about the human body, with numbers.",
]


def _ladder_spec(ladder) -> list[list[int]]:
    return [[int(key_bits), int(v_bits)] for key_bits, v_bits in ladder]


@dataclasses.dataclass
class Calibration:
    q_sq: np.ndarray  # (L, H, D)
    k_range_sq: np.ndarray  # (L, H, D)
    meta: dict
    ladder_distortion: np.ndarray | None = None  # (L, H, n_tiers) d of the tiers of meta["ladder"] (the menu)
    angle_err: np.ndarray | None = None  # (L, H, D/2, MAX_WIDTH + 1) logit error of angle codes of 0.. bits
    radius_err: np.ndarray | None = None  # (L, H, D/2, MAX_WIDTH + 1) the same for radius codes
    head_sensitivity: np.ndarray | None = None  # (L, H) output KL per unit of attention mass dropped
    # (skvrt.head_sensitivity); sidecars before session 14 have none

    def ada_tier(self, key_bits: int, v_bits: int = 4, v_group: int = LADDER_V_GROUP):
        """The ADA tier of key_bits per token per head: widths from the error tables, else from pair_weight."""
        from .kv.ada import AdaTier, allocate_bits, allocate_polar_bits

        key_bits = int(key_bits)
        if key_bits not in self._widths:
            if self.angle_err is not None:
                angle, radius = allocate_polar_bits(self.angle_err, self.radius_err, key_bits)
                self._widths[key_bits] = (angle + radius, angle)
            else:
                self._widths[key_bits] = (allocate_bits(self.pair_weight, key_bits), None)
        pair_bits, angle_bits = self._widths[key_bits]
        return AdaTier(pair_bits, v_bits, v_group, angle_bits)

    @functools.cached_property
    def _widths(self) -> dict:  # key bits -> (pair bits, angle bits or None: the even split), (L, H, D/2) each
        return {}

    @property
    def pair_weight(self) -> np.ndarray:
        """(L, H, D/2) how much each RoPE pair's key error costs in logit error."""
        w = self.q_sq * self.k_range_sq
        h2 = w.shape[-1] // 2
        return w[..., :h2] + w[..., h2:]

    def distortion(self, ladder, v_group: int = LADDER_V_GROUP, page_size: int = LADDER_PAGE) -> np.ndarray | None:
        """(L, H, len(ladder)) distortion d of each tier of `ladder` ((key_bits, v_bits), ...), or None when
        the sidecar did not measure every one of them (with this value group and page size)."""
        stored = (self.meta.get("ladder_v_group"), self.meta.get("ladder_page"))
        if self.ladder_distortion is None or stored != (v_group, page_size):
            return None
        column = {tuple(t): i for i, t in enumerate(self.meta.get("ladder", []))}
        want = [tuple(t) for t in _ladder_spec(ladder)]
        if not want or any(t not in column for t in want):
            return None
        return self.ladder_distortion[..., [column[t] for t in want]]

    def save(self, folder: Path) -> Path:
        tensors = {"q_sq": self.q_sq, "k_range_sq": self.k_range_sq}
        if self.angle_err is not None:
            tensors.update(angle_err=self.angle_err.astype(np.float32), radius_err=self.radius_err.astype(np.float32))
        if self.ladder_distortion is not None:
            tensors["ladder_distortion"] = self.ladder_distortion.astype(np.float32)
        if self.head_sensitivity is not None:
            tensors["head_sensitivity"] = self.head_sensitivity.astype(np.float32)
        return write_safetensors(folder / SIDECAR, tensors, metadata={"skvrt": json.dumps(self.meta)})


def _sidecar_meta(header: dict) -> dict:
    """The skvrt metadata of a sidecar's safetensors header ({} when absent or not JSON)."""
    try:
        meta = json.loads(header.get("__metadata__", {}).get("skvrt", "{}"))
    except (json.JSONDecodeError, TypeError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load_calibration(folder: str | Path) -> Calibration | None:
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return None
    t = read_safetensors(path)
    header, _ = read_safetensors_header(path)
    meta = _sidecar_meta(header)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "q_sq" not in t or "k_range_sq" not in t:
        raise ModelLoadError(f"{path} is not a skvrt calibration sidecar of format {FORMAT}; run `skvrt calibrate`")
    cal = Calibration(np.asarray(t["q_sq"]), np.asarray(t["k_range_sq"]), meta)
    if "ladder_distortion" in t:  # sidecars before the ladder have none
        d = np.asarray(t["ladder_distortion"])
        if d.shape != (*cal.q_sq.shape[:2], len(meta.get("ladder", ()))):
            raise ModelLoadError(f"{path}: ladder_distortion {d.shape} does not match the ladder in its metadata; "
                                 "run `skvrt calibrate`")
        cal.ladder_distortion = d
    if "angle_err" not in t and "radius_err" not in t:
        print(f"skvrt: {path} predates measured key widths (no angle_err / radius_err): ADA tiers split each pair's "
              "bits evenly; run `skvrt calibrate` to measure them", file=sys.stderr)
    if ("angle_err" in t) != ("radius_err" in t):
        raise ModelLoadError(f"{path} has one of angle_err / radius_err without the other; run `skvrt calibrate`")
    if "angle_err" in t:
        from .kv.ada import MAX_WIDTH

        want = (*cal.q_sq.shape[:2], cal.q_sq.shape[2] // 2, MAX_WIDTH + 1)
        ea, er = np.asarray(t["angle_err"]), np.asarray(t["radius_err"])
        if ea.shape != want or er.shape != want or not (np.isfinite(ea).all() and np.isfinite(er).all()):
            raise ModelLoadError(f"{path}: angle_err / radius_err are not finite {want} tables; run `skvrt calibrate`")
        cal.angle_err, cal.radius_err = ea, er
    if "head_sensitivity" not in t:
        print(f"skvrt: {path} predates head sensitivity: spherical weighs every head's distortion alike; run "
              "`skvrt calibrate` to measure it", file=sys.stderr)
    else:
        hs = np.asarray(t["head_sensitivity"])
        if hs.shape != cal.q_sq.shape[:2] or not (np.isfinite(hs).all() and (hs >= 0).all()):
            raise ModelLoadError(f"{path}: head_sensitivity is not a finite, non-negative {cal.q_sq.shape[:2]} "
                                 "table; run `skvrt calibrate`")
        cal.head_sensitivity = hs
    return cal


CURRENT_TABLES = ("q_sq", "k_range_sq", "angle_err", "radius_err", "ladder_distortion", "head_sensitivity")


def missing_tables(folder: str | Path) -> list[str] | None:
    """What a sidecar that skvrt calibrated itself (self-generated text) lacks of what `calibrate` measures now
    (tables added by later versions), from its header alone; None when there is no sidecar, it is not one, or a
    user calibrated it on their own text (theirs to redo, `load_calibration` says so)."""
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return None
    try:
        header, _ = read_safetensors_header(path)
    except ModelLoadError:
        return None
    meta = _sidecar_meta(header)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("source") != "self-generated":
        return None
    missing = [n for n in CURRENT_TABLES if n not in header]
    measured = {tuple(t) for t in meta.get("ladder", []) if isinstance(t, list)}
    if "ladder_distortion" not in missing and not set(MEASURED_TIERS) <= measured:
        missing.append("ladder_distortion of every tier in the menu")
    return missing


def self_generated_text(llm, tokens_per_prompt: int = 160, seed: int = 0) -> str:
    """Calibration text the model writes itself (seeded sampling), so no evaluation text is ever used."""
    parts = []
    for i, p in enumerate(PROMPTS):
        parts.append(llm.chat([{"role": "user", "content": p}], max_tokens=tokens_per_prompt, temp=0.8,
                              top_p=0.95, seed=seed + i))
    return "\n\n".join(parts)


def collect_stats(model, tokens: np.ndarray, page_size: int = 64, chunk: int = 256,
                  progress=None, held_back: float = 0.0, tables: bool = False):
    """Prefill `tokens` with a dense float32 cache, hooking the cache to see post-RoPE q, k and v per layer.

    -> (q_sq, k_range_sq) from the first n_fit = int(T (1 - held_back)) tokens (with tables: (q_sq, k_range_sq,
    angle_err, radius_err), `polar_error_tables` over the whole pages of the first min(n_fit, TABLE_TOKENS)
    tokens, weighted by their `attention_moments`); with held_back > 0
    -> (stats, held), held[layer] = (q (nq, Th, D), k (H, Th, D), v (H, Th, D)) of the last Th = T - n_fit."""
    from .kv import make_cache

    a = model.args
    L, H, D, G = a.num_hidden_layers, a.num_key_value_heads, a.head_dim, a.num_attention_heads // a.num_key_value_heads
    n_fit = int(len(tokens) * (1 - held_back))
    cache = make_cache(a, len(tokens) + 1, "full", "float32")
    q_sum = np.zeros((L, H, D))
    q_fit = [[] for _ in range(L)]  # (nq, t, D) chunks of the first TABLE_TOKENS fit tokens' queries (tables)
    q_held = [[] for _ in range(L)]  # (nq, t, D) chunks of the held-back tokens' queries
    keys, values = [[] for _ in range(L)], [[] for _ in range(L)]  # (H, t, D) chunks
    attend, append = cache.attend, cache.append

    def hook_attend(layer, q, pos):
        fit = pos < n_fit
        q_sum[layer] += np.square(q[:, fit].astype(np.float64)).reshape(H, G, -1, D).sum(axis=(1, 2))
        if tables:
            q_fit[layer].append(q[:, fit & (pos < TABLE_TOKENS)].copy())
        q_held[layer].append(q[:, ~fit].copy())
        return attend(layer, q, pos)

    def hook_append(layer, k, v):
        keys[layer].append(k.copy())
        values[layer].append(v.copy())
        return append(layer, k, v)

    cache.attend, cache.append = hook_attend, hook_append
    for s in range(0, len(tokens), chunk):
        model.forward(tokens[s : s + chunk], cache)
        if progress:
            progress(min(s + chunk, len(tokens)), len(tokens))
    k_range = np.zeros((L, H, D))
    for layer in range(L):
        keys[layer], values[layer] = np.concatenate(keys[layer], axis=1), np.concatenate(values[layer], axis=1)
        n_pages = n_fit // page_size
        pages = keys[layer][:, : n_pages * page_size].reshape(H, n_pages, page_size, D)
        k_range[layer] = np.mean(np.square(pages.max(2) - pages.min(2)), axis=1)
    stats = (q_sum / (n_fit * G)).astype(np.float32), k_range.astype(np.float32)
    if tables:
        from .kv.ada import polar_error_tables

        n_tab = min(n_fit, TABLE_TOKENS)
        errs = np.array([[polar_error_tables(keys[layer][h, :n_tab], attention_moments(
            np.concatenate(q_fit[layer], axis=1)[h * G : (h + 1) * G, :n_tab], keys[layer][h, :n_tab]), page_size)
            for h in range(H)] for layer in range(L)])  # (L, H, 2, D/2, W + 1)
        stats = (*stats, errs[:, :, 0].astype(np.float32), errs[:, :, 1].astype(np.float32))
    if not held_back:
        return stats
    held = [(np.concatenate(q_held[layer], axis=1), keys[layer][:, n_fit:], values[layer][:, n_fit:])
            for layer in range(L)]
    return stats, held


def attention_moments(q: np.ndarray, k: np.ndarray, block: int = 128) -> np.ndarray:
    """What each key's code error costs: q (G, T, D) queries and k (T, D) keys of one kv head (causal, position
    t attends to keys j <= t) -> (T, D/2, 3), per key j and RoPE pair i the attention-weighted second moments
    sum over queries (g, t) of p_gt(j) (q_x^2, q_y^2, q_x q_y), / (G T). With them, polar_error_tables gives
    the attention-weighted squared logit error E_q[sum_j p(j) ds_j^2], twice the first-order KL of the attention
    distribution (uniform weights over (query, key) pairs chose allocations with lower logit MSE but worse model
    KL: docs/ADA_NOTES.md)."""
    G, T, D = q.shape
    h2 = D // 2
    out = np.zeros((T, h2, 3))
    kk = k.astype(np.float64)
    for t0 in range(0, T, block):
        qb = q[:, t0 : t0 + block].astype(np.float64)  # (G, b, D)
        s = np.einsum("gbd,jd->gbj", qb, kk) / np.sqrt(D)
        causal = np.arange(T)[None, None, :] <= np.arange(t0, t0 + qb.shape[1])[None, :, None]
        p = _softmax(np.where(causal, s, -np.inf))  # (G, b, T)
        x, y = qb[..., :h2], qb[..., h2:]
        out[..., 0] += np.einsum("gbj,gbi->ji", p, x * x)
        out[..., 1] += np.einsum("gbj,gbi->ji", p, y * y)
        out[..., 2] += np.einsum("gbj,gbi->ji", p, x * y)
    return out / (G * T)


def ladder_tiers(cal: Calibration, ladder=DEFAULT_LADDER, v_group: int = LADDER_V_GROUP) -> list:
    """The ladder's ADA tiers, key widths from the calibration (`Calibration.ada_tier`)."""
    return [cal.ada_tier(key_bits, v_bits, v_group) for key_bits, v_bits in ladder]


def ladder_distortion(held, tiers, page_size: int = LADDER_PAGE, span_pages: int = SPAN_PAGES,
                      progress=None) -> np.ndarray:
    """-> (L, H, n_tiers, 2) the logit and value terms of each tier's distortion d (their sum; module
    docstring) on the held-back tokens `held` (collect_stats), in whole pages of page_size tokens."""
    L, (H, _, D) = len(held), held[0][1].shape
    out = np.zeros((L, H, len(tiers), 2))
    for layer, (q_l, k_l, v_l) in enumerate(held):
        G = q_l.shape[0] // H
        n = k_l.shape[1] // page_size
        if n == 0:
            raise ValueError(f"{k_l.shape[1]} held-back tokens: not one page of {page_size}")
        for h in range(H):
            k = k_l[h, : n * page_size].reshape(n, page_size, D)
            v = v_l[h, : n * page_size].reshape(n, page_size, D)
            q = q_l[h * G : (h + 1) * G, : n * page_size]  # (G, n P, D)
            logit_of = {}  # key bit allocation -> logit term: tiers differing only in value bits share it
            for i, tier in enumerate(tiers):
                data = tier.alloc(n, page_size, D)
                for p in range(n):
                    tier.write_page(data, p, k[p], v[p], (layer, h))
                key = b"".join(w[layer, h].tobytes() for w in tier.widths)
                out[layer, h, i] = _distortion_terms(tier, data, q, k, v, (layer, h), span_pages, logit_of.get(key))
                logit_of[key] = out[layer, h, i, 0]
        if progress:
            progress(layer + 1, L)
    return out


def _distortion_terms(tier, data, q, k, v, lh, span_pages: int, logit: float | None = None) -> tuple[float, float]:
    """Pages 0 .. n-1 of `data` hold k, v (n, P, D) encoded; q (G, n P, D) the same tokens' queries.
    -> (E_t[sum_j p_t(j) (s_hat - s)^2] over queries, E||v_hat - v||^2 / E||v - o||^2) over spans of span_pages
    pages; `logit`: the first term when it is already known (same key codes), then only the exact logits are
    computed."""
    G, _, D = q.shape
    n, P, _ = k.shape
    scale = D**-0.5
    v_err = np.mean(np.sum(np.square(tier.read_values(data, np.arange(n)) - v, dtype=np.float64), -1))
    logit_sq = drop_sq = 0.0
    pairs = queries = 0
    for p0 in range(0, n, span_pages):
        pids = np.arange(p0, min(p0 + span_pages, n))
        ks, vs = k[pids].reshape(-1, D), v[pids].reshape(-1, D).astype(np.float64)  # (S, D)
        qs = q[:, p0 * P : (p0 + len(pids)) * P]  # (G, S, D)
        causal = np.tril(np.ones((len(ks), len(ks)), bool))  # [query t, key j]: j <= t
        s = np.einsum("gtd,jd->gtj", qs, ks).astype(np.float64) * scale  # (G, S, S)
        attn = _softmax(np.where(causal, s, -np.inf))  # (G, S, S)
        o = attn @ vs  # (G, S, D)
        v_o = np.sum(vs**2, -1) + np.sum(o**2, -1)[..., None] - 2 * o @ vs.T  # (G, S, S) ||v_j - o_t||^2
        if logit is None:
            s_hat = tier.scores(data, pids, qs, lh, scale).reshape(s.shape)
            logit_sq += np.sum(attn * np.square(s_hat - s), where=causal)
        drop_sq += np.sum(v_o, where=causal)
        pairs += G * int(causal.sum())
        queries += G * len(ks)
    return (logit_sq / queries if logit is None else logit), v_err / (drop_sq / pairs)


def report(cal: "Calibration", held, tiers=(64, 96, 128, 160, 192, 256), v_bits=(8, 4), page_size: int = 64,
           max_pages: int = 4, max_queries: int = 64) -> list[dict]:
    """Per ADA tier: bytes per token per head (K, V, metadata) and distortion on held-back keys: logit MSE
    relative to the exact logits' variance, and cosine of attention outputs with exact and coded keys (softmax
    over the held-back keys of a page group, exact values)."""

    L, H, D = cal.q_sq.shape
    G = held[0][0].shape[0] // H
    rows = []
    for bits in tiers:
        vg = min(32, D)
        tier = cal.ada_tier(bits, v_bits[-1], vg)
        mse, cos = [], []
        for layer in range(L):
            q_l, k_l, v_l = held[layer]
            n = min(max_pages, k_l.shape[1] // page_size)
            if n == 0:
                continue
            for h in range(H):
                data = tier.alloc(n, page_size, D)
                k = k_l[h, : n * page_size].reshape(n, page_size, D)
                v = v_l[h, : n * page_size].reshape(n, page_size, D)
                for p in range(n):
                    tier.write_page(data, p, k[p], v[p], (layer, h))
                q = q_l[h * G : (h + 1) * G, -max_queries:]  # (G, Tq, D)
                s = tier.scores(data, np.arange(n), q, (layer, h), D**-0.5).reshape(G, q.shape[1], -1)
                s_ref = np.einsum("gtd,nd->gtn", q, k.reshape(-1, D)) * D**-0.5
                mse.append(np.mean((s - s_ref) ** 2) / np.var(s_ref))
                p_ref, p_got = _softmax(s_ref), _softmax(s)
                o_ref, o_got = p_ref @ v.reshape(-1, D), p_got @ v.reshape(-1, D)
                cos.append(np.mean(np.sum(o_ref * o_got, -1) / (np.linalg.norm(o_ref, axis=-1) *
                                                                   np.linalg.norm(o_got, axis=-1))))
        P = page_size
        for vb in v_bits:
            t = cal.ada_tier(bits, vb, vg)
            rows.append({"tier": t.name, "key_bits": bits, "v_bits": vb,
                         "k_bytes": bits / 8, "v_bytes": D * vb / 8,
                         "metadata_bytes": (t.page_bytes(P, D) - P * bits // 8 - P * D * vb // 8) / P,
                         "bytes_per_token_head": t.page_bytes(P, D) / P,
                         "fraction_of_fp16": t.page_bytes(P, D) / P / (2 * D * 2),
                         "logit_rel_mse": float(np.mean(mse)), "attn_out_cosine": float(np.mean(cos))})
    return rows


def _softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def calibrate(llm, text: str | None = None, source: str = "self-generated", ladder=MEASURED_TIERS,
              return_held: bool = False):
    """Statistics from the first 1 - HELD_BACK of the text's tokens, the distortion of the tiers of `ladder` (the
    menu) on the rest (tiers whose key bits do not fit the head_dim are left out). -> Calibration, or (Calibration, held-back q/k/v per
    layer) with return_held (for `report`)."""
    from rich.progress import Progress

    from .kv.ada import MAX_PAIR_BITS

    t0 = time.perf_counter()
    D = llm.model.args.head_dim
    v_group = math.gcd(LADDER_V_GROUP, D)
    ladder = [(kb, vb) for kb, vb in (ladder or ()) if kb <= MAX_PAIR_BITS * D // 2]
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        if text is None:
            bar.add_task("calibrate: generating calibration text", total=None)
            text = self_generated_text(llm)
        tokens = np.asarray(llm.tokenizer.encode(text), dtype=np.int64)
        if len(tokens) < 256:
            raise ModelLoadError(f"calibration text is too short ({len(tokens)} tokens; at least 256 needed)")
        task = bar.add_task("calibrate: prefill", total=len(tokens))
        (q_sq, k_range_sq, angle_err, radius_err), held = collect_stats(
            llm.model, tokens, progress=lambda d, t: bar.update(task, completed=d), held_back=HELD_BACK, tables=True)
        n_held = held[0][1].shape[1]
        meta = {"format": FORMAT, "source": source, "tokens": int(len(tokens)), "held_back_tokens": n_held,
                "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
        cal = Calibration(q_sq, k_range_sq, meta, angle_err=angle_err, radius_err=radius_err)
        if ladder:
            task = bar.add_task("calibrate: ladder distortion on held-back tokens", total=len(held))
            tiers = ladder_tiers(cal, ladder, v_group)
            terms = ladder_distortion(held, tiers, progress=lambda d, t: bar.update(task, completed=d))
            cal.ladder_distortion = terms.sum(-1).astype(np.float32)  # (L, H, n_tiers)
            meta.update(ladder=_ladder_spec(ladder), ladder_v_group=v_group, ladder_page=LADDER_PAGE,
                        ladder_span_pages=SPAN_PAGES,
                        ladder_mean=[{"tier": t.name, "key_bits": t.key_bits, "v_bits": t.v_bits, "d": float(lg + vl),
                                      "logit": float(lg), "value": float(vl)}
                                     for t, (lg, vl) in zip(tiers, terms.mean(axis=(0, 1)))])
        args = llm.model.args
        task = bar.add_task("calibrate: head sensitivity", total=args.num_hidden_layers * args.num_key_value_heads)
        t1 = time.perf_counter()
        head = tokens[:SENSITIVITY_TOKENS]
        kl_mass = head_sensitivity(llm.model, head, progress=lambda d, t: bar.update(task, completed=d))
        cal.head_sensitivity = (kl_mass[..., 0] / np.maximum(kl_mass[..., 1], MIN_MASS)).astype(np.float32)
        meta.update(head_sensitivity={"tokens": int(len(head)), "seconds": round(time.perf_counter() - t1, 1)})
    meta.update(seconds=round(time.perf_counter() - t0, 1), date=time.strftime("%Y-%m-%d"))
    return (cal, held) if return_held else cal
