"""Merge `skvrt eval sweep` runs (each folder's sweep.json) into one table and plot, rows ordered by budget then
policy -- for sweeps split over several processes.

    python bench/merge_sweeps.py OUT_DIR SWEEP_DIR [SWEEP_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from skvrt.sweep import SWEEP_POLICIES, write_sweep


def main() -> None:
    out, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
    runs = [json.loads((d / "sweep.json").read_text()) for d in dirs]
    order = {p: i for i, p in enumerate(SWEEP_POLICIES)}
    rows = sorted((r for run in runs for r in run["rows"]), key=lambda r: (-r["budget"], order.get(r["policy"], 99)))
    meta = dict(runs[0]["meta"])
    meta["command"] = " ; ".join(run["meta"]["command"] for run in runs)
    for p in write_sweep(rows, out, meta):
        print(p)


if __name__ == "__main__":
    main()
