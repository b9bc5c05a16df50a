"""Why 2-bit values keep min..max: per-token error vs the error that survives attention's sum over tokens.

    OPENBLAS_NUM_THREADS=1 python bench/value_codec_bias.py --text CALIBRATION_TEXT [--clip 0.64]

Prefills the text with a dense float32 cache (skvrt.calibrate.collect_stats), takes the values of its last 25 %
of tokens, and quantises each 64-dim group of each token with 4 levels three ways: uniform over the group's
min..max (the codec skvrt uses), uniform over the middle `--clip` of that range (values outside clamp to the end
codes; the per-token MSE-optimal clip on the calibration text is ~0.64), and min..max with the two inner levels
moved by Lloyd iterations (ends fixed). Prints, relative to the values' variance: the per-token squared error,
the squared bias per (layer, head, channel) (mean error over tokens), and the squared error of a 64-token mean
(what a spread-out attention row sees). docs/QUALITY.md (session 6) has the numbers and the KL they led to.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import skvrt  # noqa: E402
from skvrt.calibrate import HELD_BACK, collect_stats  # noqa: E402


def quantise(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """x (..., G) groups -> each value at its nearest level, levels in [0, 1] units of the group's min..max."""
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    r = np.where(hi > lo, hi - lo, 1.0)
    code = np.searchsorted((levels[1:] + levels[:-1]) / 2, (x - lo) / r)
    return lo + r * levels[code]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", required=True, help="calibration text (never the evaluation text)")
    ap.add_argument("--clip", type=float, default=0.64)
    ap.add_argument("--group", type=int, default=64)
    a = ap.parse_args()
    llm = skvrt.load(a.model, n_ctx=64, threads=1, device="cpu")
    tokens = np.asarray(llm.tokenizer.encode(Path(a.text).read_text()), dtype=np.int64)
    _, held = collect_stats(llm.model, tokens, held_back=HELD_BACK)
    v = np.stack([layer_v for _, _, layer_v in held]).astype(np.float64)  # (L, H, T, D)
    L, H, T, D = v.shape
    groups = v.reshape(L, H, T, D // a.group, a.group)
    var = np.mean(np.square(groups - groups.mean(-1, keepdims=True)))
    u = ((groups - groups.min(-1, keepdims=True)) /
         np.maximum(groups.max(-1, keepdims=True) - groups.min(-1, keepdims=True), 1e-30)).ravel()
    inner = np.array([0.0, 1 / 3, 2 / 3, 1.0])
    for _ in range(60):  # Lloyd on the two inner levels, ends fixed at min and max
        cell = np.searchsorted((inner[1:] + inner[:-1]) / 2, u)
        inner[1:3] = [u[cell == k].mean() for k in (1, 2)]
    t = (1 - a.clip) / 2
    codecs = {"min..max, uniform (skvrt)": np.linspace(0, 1, 4),
              f"middle {a.clip:.2f} of the range, uniform": t + a.clip * np.linspace(0, 1, 4),
              "min..max, inner levels by Lloyd " + "/".join(f"{x:.2f}" for x in inner): inner}
    n = T // 64 * 64
    print(f"{L} layers x {H} KV heads x {T} held-back tokens, 2-bit values in groups of {a.group}\n")
    print("| codec | per-token squared error | squared bias per channel | squared error of a 64-token mean |")
    print("|---|---:|---:|---:|")
    for name, levels in codecs.items():
        err = (quantise(groups, levels) - groups).reshape(L, H, T, D)
        mean64 = err[:, :, :n].reshape(L, H, -1, 64, D).mean(3)
        print(f"| {name} | {np.mean(err ** 2) / var:.4f} | {np.mean(err.mean(2) ** 2) / var:.5f} | "
              f"{np.mean(mean64 ** 2) / var:.5f} |")


if __name__ == "__main__":
    main()
