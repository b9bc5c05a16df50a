"""Budget sweeps: every KV policy at every byte budget, same text, same reference, same accounting.

    skvrt eval sweep --text FILE --budgets 50,25,12.5,6.25 --policies window,snapkv,h2o,quant,ada,spherical
                     --out DIR [--max-windows N]

Budgeted policies (snapkv, h2o, spherical) take the budget as their arena size (snapkv / h2o with half of it
as their recent window, as in the H2O paper; spherical with its default 32-token window). The others have no budget
knob of their own, so each is configured to the richest setting whose preallocated arena (every page it can
ever need at the window's context, chunked prefill of RDR_CHUNK tokens) fits the budget: window -> the
longest recent window, quant -> the widest (k_bits, v_bits), ada -> the largest key tier (values int4, then
int2). A policy with no setting that fits is reported as such. Bytes reported are what the cache held at the
end of each window (`cache.stats()`), as a fraction of the dense fp16 bytes of those tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .kv import BUDGETED, KV_POLICIES, make_cache
from .kv.cache import RDR_CHUNK

SWEEP_POLICIES = ("window", "snapkv", "h2o", "quant", "ada", "spherical")
DEFAULT_BUDGETS = (0.5, 0.25, 0.125, 0.0625)
QUANT_STEPS = ((8, 8), (8, 4), (4, 4), (4, 2), (2, 4), (2, 2))
ADA_STEPS = tuple((t, vb) for vb in (4, 2) for t in range(256, 31, -32))


def parse_budgets(text: str) -> list[float]:
    """'50,25,12.5,6.25' (percent) -> [0.5, 0.25, 0.125, 0.0625]."""
    try:
        out = [float(x.strip().rstrip("%")) / 100 for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--budgets: comma-separated percentages, e.g. 50,25,12.5,6.25 (got {text!r})") from None
    if not out or any(not 0 < b <= 1 for b in out):
        raise InputError(f"--budgets: percentages in (0, 100] (got {text!r})")
    return out


def parse_policies(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [p for p in out if p not in KV_POLICIES]
    if bad or not out:
        raise InputError(f"--policies: unknown {', '.join(bad) or '(none)'}; valid: {', '.join(KV_POLICIES)}")
    return out


def _arena_bytes(args, n_ctx: int, policy: str, opts: dict) -> int | None:
    try:
        return make_cache(args, n_ctx, policy, **opts).arena.nbytes
    except InputError:
        return None


def fit_policy(args, policy: str, budget: float, n_ctx: int) -> dict | None:
    """Options that make `policy` fit `budget` (a fraction of the fp16 cache at n_ctx), or None."""
    if policy == "spherical":
        opts = {"budget": budget}
        return opts if _arena_bytes(args, n_ctx, policy, opts) is not None else None
    if policy in BUDGETED:
        # eviction baselines as their papers run them: half of the budget is the recent window (H2O's
        # heavy-hitter / recent split), dense tokens in 16-token pages (frames of ~4 KB, like ADA's)
        w = int(budget * n_ctx / 2) // 16 * 16
        while w >= 16:
            opts = {"budget": budget, "page_size": 16, "window": w}
            if _arena_bytes(args, n_ctx, policy, opts) is not None:
                return opts
            w //= 2
        return None
    limit = budget * n_ctx * args.num_hidden_layers * args.num_key_value_heads * 2 * args.head_dim * 2
    if policy == "full":
        candidates = [{}]
    elif policy == "window":
        candidates = [{"window": w, "chunk": RDR_CHUNK, "page_size": 16} for w in range(n_ctx - 64, 0, -16)]
    elif policy == "quant":
        candidates = [{"k_bits": k, "v_bits": v, "chunk": RDR_CHUNK, "page_size": P} for k, v in QUANT_STEPS
                      for P in (64, 16)]
    else:  # ada
        candidates = [{"tier": t, "v_bits": vb, "v_group": 64, "window": 32, "chunk": RDR_CHUNK, "page_size": P}
                      for t, vb in ADA_STEPS for P in (64, 16)]
    for opts in candidates:
        nbytes = _arena_bytes(args, n_ctx, policy, opts)
        if nbytes is not None and nbytes <= limit:
            return opts
    return None


def run_sweep(ev, policies, budgets, progress=None) -> list[dict]:
    """ev: a KLEvaluator. -> one row per (policy, budget): the options used and the KL report's summary."""
    rows = []
    for b in budgets:
        for policy in policies:
            opts = fit_policy(ev.args, policy, b, ev.window)
            row = {"policy": policy, "budget": b, "options": opts}
            if opts is not None:
                rep = ev.run(policy, **opts)
                row.update(rep.summary())
            rows.append(row)
            if progress:
                progress(row)
    return rows


def sweep_markdown(rows: list[dict]) -> str:
    head = ("| budget | policy | setting | mean KL | p99 KL | PPL ratio | top-1 | bytes/token | of fp16 |\n"
            "|---:|---|---|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        setting = ", ".join(f"{k}={v}" for k, v in (r["options"] or {}).items() if k not in ("budget", "chunk"))
        setting = setting.replace("page_size=", "P=")
        if r["options"] is None:
            lines.append(f"| {r['budget']:.2%} | {r['policy']} | does not fit | | | | | | |")
            continue
        lines.append(f"| {r['budget']:.2%} | {r['policy']} | {setting or '-'} | {r['mean_kl']:.4f} | "
                     f"{r['p99_kl']:.3f} | {r['ppl_ratio']:.4f} | {r['top1_agreement']:.3f} | "
                     f"{r['kv_bytes_per_token']:,.0f} | {r['kv_bytes_fraction']:.3f} |")
    return head + "\n".join(lines) + "\n"


def sweep_plot(rows: list[dict], path: Path) -> None:
    """Mean KL (log) vs KV bytes as a fraction of fp16, one line per policy."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("the sweep plot needs matplotlib: pip install matplotlib (or pip install 'skvrt[plot]')") \
            from None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["kv_bytes_fraction"], max(r["mean_kl"], 1e-5)) for r in rows
                     if r["policy"] == policy and r["options"] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=policy)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("KV bytes held / dense fp16 bytes")
    ax.set_ylabel("mean KL vs full fp32 cache (nat/token)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_sweep(rows: list[dict], out: Path, meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "sweep.md"
    md.write_text("\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + sweep_markdown(rows))
    js = out / "sweep.json"
    js.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    png = out / "sweep.png"
    sweep_plot(rows, png)
    return [md, js, png]
