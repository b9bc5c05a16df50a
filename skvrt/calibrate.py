"""`skvrt calibrate`: measure how each RoPE pair of each (layer, kv head) matters to the logits, once per
model, and write the sidecar `skvrt-kv.safetensors` next to the weights.

Statistics (from a prefill of the calibration text with a dense float32 cache):
    q_sq       (L, H, D)  mean of q_d^2 over tokens and the query heads of the KV head's group (post-RoPE)
    k_range_sq (L, H, D)  mean over pages of P consecutive tokens of (max - min)^2 of key channel d
ADA tiers spread their key bits over pairs by weight_i = sum over the pair's two channels of q_sq * k_range_sq
(skvrt.kv.ada.allocate_bits), so any tier size can be built from the sidecar.

Default calibration text: text the model writes itself from fixed prompts (greedy-free, seeded), never the
evaluation text. `--text FILE` uses the user's file instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import ModelLoadError
from .safetensors_io import read_safetensors, read_safetensors_header, write_safetensors

from .loader import SIDECAR  # noqa: E402  (one name for the sidecar file)
FORMAT = 1
PROMPTS = [
    "Write a detailed essay about the history of the Roman Empire.",
    "Explain how a computer CPU works, step by step.",
    "Write a Python program that parses a CSV file and computes statistics, with comments.",
    "Tell me a long story about a sailor lost at sea.",
    "Describe the geography, climate and economy of Brazil.",
    "List twenty interesting facts about the human body, with numbers.",
]


@dataclasses.dataclass
class Calibration:
    q_sq: np.ndarray  # (L, H, D)
    k_range_sq: np.ndarray  # (L, H, D)
    meta: dict

    @property
    def pair_weight(self) -> np.ndarray:
        """(L, H, D/2) how much each RoPE pair's key error costs in logit error."""
        w = self.q_sq * self.k_range_sq
        h2 = w.shape[-1] // 2
        return w[..., :h2] + w[..., h2:]

    def save(self, folder: Path) -> Path:
        return write_safetensors(folder / SIDECAR, {"q_sq": self.q_sq, "k_range_sq": self.k_range_sq},
                                 metadata={"skvrt": json.dumps(self.meta)})


def load_calibration(folder: str | Path) -> Calibration | None:
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return None
    t = read_safetensors(path)
    header, _ = read_safetensors_header(path)
    try:
        meta = json.loads(header.get("__metadata__", {}).get("skvrt", "{}"))
    except (json.JSONDecodeError, TypeError):
        meta = {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "q_sq" not in t or "k_range_sq" not in t:
        raise ModelLoadError(f"{path} is not a skvrt calibration sidecar of format {FORMAT}; run `skvrt calibrate`")
    return Calibration(np.asarray(t["q_sq"]), np.asarray(t["k_range_sq"]), meta)


def self_generated_text(llm, tokens_per_prompt: int = 160, seed: int = 0) -> str:
    """Calibration text the model writes itself (seeded sampling), so no evaluation text is ever used."""
    parts = []
    for i, p in enumerate(PROMPTS):
        parts.append(llm.chat([{"role": "user", "content": p}], max_tokens=tokens_per_prompt, temp=0.8,
                              top_p=0.95, seed=seed + i))
    return "\n\n".join(parts)


def collect_stats(model, tokens: np.ndarray, page_size: int = 64, chunk: int = 256,
                  progress=None, held_back: float = 0.0):
    """Prefill `tokens` with a dense float32 cache, hooking the cache to see post-RoPE q and k per layer."""
    from .kv import make_cache

    a = model.args
    L, H, D, G = a.num_hidden_layers, a.num_key_value_heads, a.head_dim, a.num_attention_heads // a.num_key_value_heads
    cache = make_cache(a, len(tokens) + 1, "full", "float32")
    q_sum = np.zeros((L, H, D))
    q_n = 0
    keys = [[] for _ in range(L)]
    attend, append = cache.attend, cache.append

    def hook_attend(layer, q, pos):
        nonlocal q_n
        q_sum[layer] += np.square(q.astype(np.float64)).reshape(H, G, -1, D).sum(axis=(1, 2))
        if layer == 0:
            q_n += q.shape[1] * G
        return attend(layer, q, pos)

    def hook_append(layer, k, v):
        keys[layer].append(k.copy())
        return append(layer, k, v)

    q_all = [[] for _ in range(L)]
    n_fit = int(len(tokens) * (1 - held_back))

    def hook_attend_keep(layer, q, pos):
        if held_back:
            q_all[layer].append(q.copy())
        return hook_attend(layer, q, pos)

    cache.attend, cache.append = hook_attend_keep, hook_append
    for s in range(0, len(tokens), chunk):
        model.forward(tokens[s : s + chunk], cache)
        if progress:
            progress(min(s + chunk, len(tokens)), len(tokens))
    if held_back:  # statistics from the first part only; the rest is returned for measurements
        q_fit = [np.concatenate(q_all[layer], axis=1) for layer in range(L)]  # (nq, T, D) each
        q_sum = np.stack([np.square(q[:, :n_fit].astype(np.float64)).reshape(H, G, -1, D).sum(axis=(1, 2))
                          for q in q_fit])
        q_n = n_fit * G
    k_range = np.zeros((L, H, D))
    for layer in range(L):
        k = np.concatenate(keys[layer], axis=1)[:, :n_fit]  # (H, T, D)
        n_pages = k.shape[1] // page_size
        pages = k[:, : n_pages * page_size].reshape(H, n_pages, page_size, D)
        k_range[layer] = np.mean(np.square(pages.max(2) - pages.min(2)), axis=1)
    stats = (q_sum / q_n).astype(np.float32), k_range.astype(np.float32)
    if not held_back:
        return stats
    held = [(q_fit[layer][:, n_fit:], np.concatenate(keys[layer], axis=1)[:, n_fit:]) for layer in range(L)]
    return stats, held


def report(cal: "Calibration", held, tiers=(64, 96, 128, 160, 192, 256), v_bits=(8, 4), page_size: int = 64,
           max_pages: int = 4, max_queries: int = 64) -> list[dict]:
    """Per ADA tier: bytes per token per head (K, V, metadata) and distortion on held-back keys: logit MSE
    relative to the exact logits' variance, and cosine of attention outputs (softmax over the held-back keys
    of a page group, values = keys' own exact rows as a stand-in signal)."""
    from .kv.ada import AdaTier, allocate_bits

    L, H, D = cal.q_sq.shape
    G = held[0][0].shape[0] // H
    rows = []
    for bits in tiers:
        vg = min(32, D)
        tier = AdaTier(allocate_bits(cal.pair_weight, bits), v_bits=v_bits[-1], v_group=vg)
        mse, cos = [], []
        for layer in range(L):
            q_l, k_l = held[layer]
            n = min(max_pages, k_l.shape[1] // page_size)
            if n == 0:
                continue
            for h in range(H):
                data = tier.alloc(n, page_size, D)
                k = k_l[h, : n * page_size].reshape(n, page_size, D)
                for p in range(n):
                    tier.write_page(data, p, k[p], k[p], (layer, h))
                q = q_l[h * G : (h + 1) * G, -max_queries:]  # (G, Tq, D)
                s = tier.scores(data, np.arange(n), q, (layer, h), D**-0.5).reshape(G, q.shape[1], -1)
                s_ref = np.einsum("gtd,nd->gtn", q, k.reshape(-1, D)) * D**-0.5
                mse.append(np.mean((s - s_ref) ** 2) / np.var(s_ref))
                p_ref, p_got = _softmax(s_ref), _softmax(s)
                o_ref, o_got = p_ref @ k.reshape(-1, D), p_got @ k.reshape(-1, D)
                cos.append(np.mean(np.sum(o_ref * o_got, -1) / (np.linalg.norm(o_ref, axis=-1) *
                                                                   np.linalg.norm(o_got, axis=-1))))
        P = page_size
        for vb in v_bits:
            t = AdaTier(tier.pair_bits, v_bits=vb, v_group=vg)
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


def calibrate(llm, text: str | None = None, source: str = "self-generated", held_back: float = 0.0):
    """-> Calibration, or (Calibration, held-back q/k per layer) when held_back > 0 (for `report`)."""
    from rich.progress import Progress

    t0 = time.perf_counter()
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        if text is None:
            bar.add_task("calibrate: generating calibration text", total=None)
            text = self_generated_text(llm)
        tokens = np.asarray(llm.tokenizer.encode(text), dtype=np.int64)
        if len(tokens) < 256:
            raise ModelLoadError(f"calibration text is too short ({len(tokens)} tokens; at least 256 needed)")
        task = bar.add_task("calibrate: prefill", total=len(tokens))
        out = collect_stats(llm.model, tokens, progress=lambda d, t: bar.update(task, completed=d),
                            held_back=held_back)
        (q_sq, k_range_sq), held = (out, None) if not held_back else out
    meta = {"format": FORMAT, "source": source, "tokens": int(len(tokens)),
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "seconds": round(time.perf_counter() - t0, 1),
            "date": time.strftime("%Y-%m-%d")}
    cal = Calibration(q_sq, k_range_sq, meta)
    return cal if not held_back else (cal, held)
