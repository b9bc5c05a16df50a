"""How much KL the ADA append path's re-quantisation costs: run bench/rdr_dev.py with every write into a partly
filled ADA page re-encoding the whole page from the source copies of its tokens (kept outside the budget: an
upper bound, not a policy), instead of appending (`AdaTier.append`: a pair whose frame the new tokens do not fit
is refitted over the old tokens' *decoded* values and re-quantised).

    OPENBLAS_NUM_THREADS=1 python bench/ada_append_oracle.py --text /usr/share/common-licenses/GPL-3 \
        --windows 2 --policy "spherical:budget=0.334"            # same arguments as bench/rdr_dev.py

A token's source copy is what was written into that tier (the dense copy when it left the window, the decoded
copy of its richer tier when demoted, the decoded copy when a merge re-wrote its page). Set ORACLE=off to run the
same process without it. Prints how many writes were re-encoded whole (stderr).
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from skvrt.kv.ada import AdaTier  # noqa: E402
from skvrt.kv.cache import PagedKVCache  # noqa: E402

counts = {"whole": 0, "appended": 0}


def install() -> None:
    write_tokens, write, truncate = PagedKVCache._write_tokens, PagedKVCache._write, PagedKVCache.truncate

    def sources(cache) -> dict:  # ((layer, head), tier, position) -> (k, v) (D,) each
        return cache.__dict__.setdefault("_oracle_src", {})

    def oracle_write_tokens(self, layer, h, t, items):
        if isinstance(self.pools[t].tier, AdaTier):
            src = sources(self)
            for k, v, pos, _ in items:
                for i, p in enumerate(pos):
                    src[((layer, h), t, int(p))] = (k[i].copy(), v[i].copy())
        write_tokens(self, layer, h, t, items)

    def oracle_write(self, t, pid, f, k, v, lh):
        pool = self.pools[t]
        if isinstance(pool.tier, AdaTier) and f > 0:
            src = sources(self)
            old = [src.get((tuple(lh), t, int(p))) for p in pool.positions[pid, :f]]
            if all(x is not None for x in old):
                counts["whole"] += 1
                k = np.concatenate([np.stack([x[0] for x in old]), k])
                v = np.concatenate([np.stack([x[1] for x in old]), v])
                return write(self, t, pid, 0, k, v, lh)
            counts["appended"] += 1
        return write(self, t, pid, f, k, v, lh)

    def oracle_truncate(self, n_tokens):
        src = sources(self)
        for key in [key for key in src if key[2] >= n_tokens]:
            del src[key]
        return truncate(self, n_tokens)

    PagedKVCache._write_tokens = oracle_write_tokens
    PagedKVCache._write = oracle_write
    PagedKVCache.truncate = oracle_truncate


def main() -> None:
    if os.environ.get("ORACLE", "on") != "off":
        install()
    sys.argv = ["rdr_dev.py", *sys.argv[1:]]
    try:
        runpy.run_path(str(Path(__file__).with_name("rdr_dev.py")), run_name="__main__")
    finally:
        print(f"append oracle: {counts['whole']} writes re-encoded whole, {counts['appended']} appended",
              file=sys.stderr)


if __name__ == "__main__":
    main()
