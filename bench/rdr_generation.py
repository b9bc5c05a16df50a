"""A long generation under a KV budget: the budget held at every step, pool occupancy and tokens per tier over
time, no page leaked (DESIGN.md section 4; the RDR issue's 4,000-token run).

    OPENBLAS_NUM_THREADS=1 python bench/rdr_generation.py [--policy spherical] [--budget 25%]
        [--tokens 4000] [--every 250] [--out docs/rdr_generation.md]

Greedy decoding from a short chat prompt with --n-ctx = prompt + --tokens (the budget is a fraction of the fp16
cache at that context). After every step it checks: bytes used <= budget, pages in use + free pages = the arena,
every page's owner matches the page table. Every --every steps it prints one row: tokens, pages used / total,
bytes used, per-tier token counts, allocator runs and time, decode ms/step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import skvrt  # noqa: E402
from skvrt.generate import prefill  # noqa: E402


def check(cache) -> None:
    arena = cache.arena
    used = sum(p.n_used for p in cache.pools)
    assert used * (arena.frame_bytes + 4) <= cache.budget, "budget exceeded"
    assert used + arena.n_free == arena.n_frames, "page leaked"
    listed = np.zeros(arena.n_frames, np.int64) - 1
    t = cache.table
    for layer in range(cache.n_layers):
        for h in range(cache.n_kv_heads):
            ids, tiers = t.pages(layer, h)
            assert (listed[ids] == -1).all(), "a page listed twice"
            listed[ids] = tiers
    assert (listed == arena.owner).all(), "page table and arena disagree"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="spherical")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    a = ap.parse_args()
    prompt = "Write a very long story about a lighthouse keeper and the ships she guides, chapter by chapter."
    probe = skvrt.load(a.model, n_ctx=256, threads=1)
    ids = probe.encode_chat([{"role": "user", "content": prompt}])
    del probe
    n_ctx = len(ids) + a.tokens
    llm = skvrt.load(a.model, n_ctx=n_ctx, threads=1, kv_policy=a.policy, kv_budget=a.budget)
    cache = llm.cache
    lines = [f"# {a.tokens}-token generation, policy {a.policy}, budget {a.budget} of the fp16 cache at n_ctx "
             f"{n_ctx} = {cache.budget:,} bytes ({cache.arena.n_frames} pages of {cache.arena.frame_bytes + 4} B)",
             "", f"`{' '.join(sys.argv)}`, {time.strftime('%Y-%m-%d')}, 1 thread", "",
             "| tokens | pages used / total | bytes used | " +
             " | ".join(f"{p.label} tokens" for p in cache.pools) +
             " | allocator runs | allocator s | decode ms/step (last block) |",
             "|---:|---:|---:|" + "---:|" * len(cache.pools) + "---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    logits = prefill(llm.model, cache, ids)
    check(cache)
    token, t_block = int(np.argmax(logits)), time.perf_counter()
    for step in range(1, a.tokens + 1):
        logits = llm.model.forward(np.array([token], dtype=np.int64), cache)[-1]
        token = int(np.argmax(logits))
        check(cache)
        if step % a.every == 0 or step == a.tokens:
            ms = (time.perf_counter() - t_block) / (step % a.every or a.every) * 1e3
            s = cache.stats(per_head=True)
            row = (f"| {s['tokens']} | {s['pages_used']} / {s['pages_total']} | {s['bytes_used']:,} | " +
                   " | ".join(str(s["tokens_by_tier"][p.label]) for p in cache.pools) +
                   f" | {cache.allocator_runs} | {cache.allocator_seconds:.1f} | {ms:.1f} |")
            print(row, flush=True)
            lines.append(row)
            t_block = time.perf_counter()
    per_head = np.array(cache.stats(per_head=True)["bytes_per_head"])  # (L, H) bytes of pages held
    lines += ["", "Bytes held per layer at the end (sum over KV heads; per-head min / max) -- the allocator's "
              "per-layer and per-head budgets:", "", "| layer | bytes | per head min | per head max |",
              "|---:|---:|---:|---:|"]
    lines += [f"| {i} | {row.sum():,} | {row.min():,} | {row.max():,} |" for i, row in enumerate(per_head)]
    print("\n".join(lines[-len(per_head) - 5:]))
    cache.reset()
    assert sum(p.n_used for p in cache.pools) == 0 and cache.arena.n_free == cache.arena.n_frames
    lines += ["", "Budget held and no page leaked at every one of the steps (checked after each); after reset "
              "every page is back in the arena."]
    print(lines[-1])
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
