"""How much does the model's output care about each (layer, kv head)'s attention (skvrt.head_sensitivity, what
`skvrt calibrate` stores), measured on any text -- and what weighting each head's utility by it does to the
budgeted KL. The research behind the spherical policy's head weight (session 14).

    # 1. measure on a text (never the evaluation text): skvrt.head_sensitivity on its first --tokens tokens
    OPENBLAS_NUM_THREADS=1 python bench/head_sensitivity.py measure TEXT --tokens 1024 --out sens.npy
    # 2. the dev KL with every head's utility x (s_h / geometric mean of s)^alpha (bench/rdr_dev.py's arguments);
    #    with a sidecar that has its own head sensitivity add `head_weight=0` to the policy, or the two multiply
    OPENBLAS_NUM_THREADS=1 python bench/head_sensitivity.py dev --weights sens.npy --alpha 0.5 \
        --text GPL-3 --windows 2 --policy "spherical:budget=0.10;head_weight=0"

measure writes (L, H, 2): per head the mean KL(exact || perturbed) and the mean attention mass dropped (see
skvrt/head_sensitivity.py); 90 passes, ~5 min at 512 tokens on one core of this machine, ~4x that at 1,024.
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
from skvrt.head_sensitivity import MIN_MASS, head_sensitivity  # noqa: E402
from skvrt.kv import head_weight_from, make_cache  # noqa: E402


def measure(a) -> None:
    llm = skvrt.load(a.model, n_ctx=64, threads=1, device="cpu")
    tokens = np.asarray(tokenize_text(llm.tokenizer, Path(a.text).read_text()))[: a.tokens]
    t0 = time.perf_counter()
    out = head_sensitivity(llm.model, tokens, frac=a.frac, seed=a.seed,
                           progress=lambda d, t: print(f"{d}/{t} heads ({time.perf_counter() - t0:.0f} s)", flush=True))
    np.save(a.out, out)
    s = np.log(out[..., 0] / np.maximum(out[..., 1], MIN_MASS))
    print(f"{len(tokens)} tokens; log s: sd {s.std():.2f}; layer means explain {1 - s.var(1).mean() / s.var():.2f}")


def head_weights(path: str, alpha: float) -> np.ndarray:
    """(L * H,) (s_h / geometric mean of s)^alpha from a `measure` output (skvrt.kv.head_weight_from)."""
    r = np.load(path)
    return head_weight_from(r[..., 0] / np.maximum(r[..., 1], MIN_MASS), alpha).reshape(-1)


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
