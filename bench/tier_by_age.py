"""Where a budgeted policy keeps old tokens, by age: after one teacher-forced window (as `skvrt eval kl`: prefill
N - E tokens, then E decode steps), tokens per (layer, kv head) of each tier in age bands (age = positions before
the last one). Dev text only.

    OPENBLAS_NUM_THREADS=1 python bench/tier_by_age.py --text /usr/share/common-licenses/GPL-3 "spherical:budget=0.334"
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import skvrt  # noqa: E402
from skvrt.evaluate import parse_policy_opts, teacher_forced_steps, tokenize_text  # noqa: E402
from skvrt.kv import make_cache  # noqa: E402

EDGES = [0, 32, 64, 96, 128, 256, 512, 1024, 2048]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=256)
    ap.add_argument("policy", nargs="+", help="name:key=value;key=value (the --kv-opt keys)")
    a = ap.parse_args()
    if "wiki" in Path(a.text).name.lower():
        raise SystemExit("dev text only: WikiText is the evaluation set")
    llm = skvrt.load(None, n_ctx=64, threads=1, device="cpu")
    wt = np.asarray(tokenize_text(llm.tokenizer, Path(a.text).read_text())[: a.window + 1])
    for spec in a.policy:
        name, _, rest = spec.partition(":")
        cache = make_cache(llm.args, n_ctx=a.window, kv_policy=name,
                           **parse_policy_opts([x for x in rest.split(";") if x]))
        for _ in teacher_forced_steps(llm.model, cache, wt, a.eval_tokens):
            pass
        heads = cache.n_layers * cache.n_kv_heads
        print(f"\n`{spec}`: {cache.stats()['fraction_of_fp16']:.3f} of fp16; tokens per head by age")
        print("| tier | " + " | ".join(f"{lo}-{hi - 1}" for lo, hi in zip(EDGES, EDGES[1:])) + " |")
        print("|---|" + "---:|" * (len(EDGES) - 1))
        for t, pool in enumerate(cache.pools):
            ages = [cache.offset - 1 - pool.positions[pid, : cache.arena.fill[pid]]
                    for layer in range(cache.n_layers) for h in range(cache.n_kv_heads)
                    for pid, tt in zip(*cache.table.pages(layer, h)) if tt == t]
            hist = np.histogram(np.concatenate(ages) if ages else np.zeros(0), EDGES)[0] / heads
            print(f"| {pool.label} | " + " | ".join(f"{x:.1f}" for x in hist) + " |")


if __name__ == "__main__":
    main()
