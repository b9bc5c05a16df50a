"""KV-policy quality sweep: one model, one text, one reference, many policies (DESIGN.md section 6).

    python bench/quality_sweep.py --text ../shared/data/wikitext-2-raw/wiki.test.raw --max-windows 4 \
        --cache-ref ~/.cache/skvrt/evalref --policy full --policy quant:k_bits=4,v_bits=4 --policy window

Each --policy is NAME[:key=value,...] (options as `skvrt eval kl --kv-opt`). Prints a markdown table
(mean / p99 KL vs the dense fp32 cache, PPL ratio, top-1 agreement, KV bytes per token and fraction of fp16)
and, with --json FILE, writes every report.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import skvrt
from skvrt.evaluate import KLEvaluator, ReferenceStore, model_fingerprint, parse_policy_opts, read_text, tokenize_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--text", required=True)
    ap.add_argument("--policy", action="append", required=True)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--eval-tokens", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=4)
    ap.add_argument("--cache-ref", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    llm = skvrt.load(a.model, threads=a.threads)
    tokens = tokenize_text(llm.tokenizer, read_text(a.text))
    store = ReferenceStore(a.cache_ref, model_fingerprint(llm.loaded.path)) if a.cache_ref else None
    ev = KLEvaluator(llm.model, tokens, a.window, a.eval_tokens, a.max_windows, ref_store=store)
    rows, reports = [], []
    for spec in a.policy:
        name, _, opts = spec.partition(":")
        kw = parse_policy_opts([o for o in opts.split(",") if o])
        t0 = time.perf_counter()
        rep = ev.run(name, "float16", **kw)
        s = rep.summary()
        reports.append({"policy": spec, **rep.to_dict()})
        rows.append(f"| `{spec}` | {s['mean_kl']:.4g} | {s['p99_kl']:.3g} | {s['ppl_ratio']:.4f} | "
                    f"{s['top1_agreement']:.4f} | {s['kv_bytes_per_token']:,.0f} | {s['kv_bytes_fraction']:.3f} |")
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"<!-- python bench/quality_sweep.py {' '.join(sys.argv[1:])} | {platform.node()} "
          f"{time.strftime('%Y-%m-%d')} -->")
    print(f"windows: {len(ev.windows)} x {a.window} tokens, last {a.eval_tokens} scored, text {a.text}\n")
    print("| policy | mean KL | p99 KL | PPL ratio | top-1 agree | KV bytes/token | of fp16 |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(reports, f, indent=1, default=float)


if __name__ == "__main__":
    main()
