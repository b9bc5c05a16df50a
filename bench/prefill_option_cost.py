"""Prefill cost of a spherical option: the same prompt prefilled with the option off and on, alternating in one
process; medians and their ratio. `--option surprisal` (the LM head over every prompt token) or `lookahead` (a
second prefill pass; give a budget where the policy drops tokens, e.g. 10 %).

    OPENBLAS_NUM_THREADS=1 python bench/prefill_option_cost.py --text DEV_TEXT [--option surprisal] [--tokens 2048
        --budget 25% --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import skvrt  # noqa: E402
from skvrt.generate import prefill  # noqa: E402
from skvrt.kv import make_cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--option", choices=("surprisal", "lookahead"), default="surprisal")
    a = ap.parse_args()
    llm = skvrt.load(a.model, n_ctx=64, threads=1, device="cpu")
    ids = np.asarray(llm.tokenizer.encode(open(a.text).read()))[: a.tokens]
    seconds = {0: [], 1: []}
    for _ in range(a.repeats):
        for value in seconds:
            cache = make_cache(llm.model.args, n_ctx=len(ids) + 256, kv_policy="spherical", budget=a.budget,
                               **{a.option: value})
            t0 = time.perf_counter()
            prefill(llm.model, cache, ids)
            seconds[value].append(time.perf_counter() - t0)
    for value, s in seconds.items():
        print(f"{a.option}={value}: prefill of {len(ids)} tokens at {a.budget}, median {np.median(s):.2f} s "
              f"({', '.join(f'{x:.2f}' for x in s)})")
    print(f"on / off: {np.median(seconds[1]) / np.median(seconds[0]):.3f}")


if __name__ == "__main__":
    main()
