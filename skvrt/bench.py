"""CPU speed benchmark: prefill and decode tok/s at several context lengths, peak RSS, KV bytes/token.

    from skvrt import load
    from skvrt.bench import run_bench, bench_meta, format_markdown
    llm = load(n_ctx=8192)
    rows = run_bench(llm, contexts=(512, 2048, 7000))
    print(format_markdown(rows, bench_meta(llm)))

For each context N the cache is reset, a synthetic prompt of exactly N token ids (deterministic filler text,
no downloaded data; `synthetic_prompt`) is prefilled with `skvrt.generate.prefill`, then `n_decode` greedy
decode steps are timed one `model.forward` call each. Every measurement is repeated `repeats` times (cache
reset in between); the report gives the median and min/max. Timings come from `time.perf_counter`.

Peak RSS is the process's `ru_maxrss` after the context's runs: it only grows, so in one process a later
(smaller) context reports at least the earlier contexts' peak. Run one process per context for a clean
figure (bench/llamacpp_compare.py does).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence

import numpy as np

from .errors import ContextOverflowError, InputError
from .generate import peak_rss_mb, prefill

# Deterministic filler (the classic passkey-test haystack plus a few varied sentences so the text is not a
# single repeated n-gram). Tokenized once, then repeated / cut to the wanted length.
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    "A quiet river runs past the old mill, where the miller counts sacks of flour every morning. "
    "In the library, students read about the history of mathematics, from counting boards to computers. "
    "The train leaves the station at seven, crosses two bridges and arrives before the market opens. "
)


def synthetic_prompt(tokenizer, n_tokens: int, filler: str = FILLER) -> list[int]:
    """Exactly `n_tokens` ids: the tokenized filler repeated and cut. Same tokenizer -> same ids."""
    if n_tokens < 1:
        raise InputError(f"a context length must be >= 1, got {n_tokens}")
    ids = tokenizer.encode(filler, add_bos=False)
    if not ids:
        raise InputError("the filler text tokenizes to nothing")
    reps = -(-n_tokens // len(ids))
    return (ids * reps)[:n_tokens]


def blas_info() -> list[dict]:
    """threadpoolctl's view of the BLAS libraries loaded in this process (internal_api, version, threads)."""
    from threadpoolctl import threadpool_info

    return [
        {
            "internal_api": i.get("internal_api"),
            "version": i.get("version"),
            "num_threads": i.get("num_threads"),
            "threading_layer": i.get("threading_layer"),
            "architecture": i.get("architecture"),
        }
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]


def blas_threads() -> int | None:
    info = blas_info()
    return max((i["num_threads"] for i in info if i["num_threads"] is not None), default=None)


def cpu_model() -> str:
    """lscpu's model name where available, else platform.processor() / platform.machine()."""
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def attention_path(llm) -> str:
    """Which decode-attention code the LLM's cache runs: the C kernel (skvrt.ckernels) or the NumPy twin."""
    cache = getattr(llm, "cache", None)
    if getattr(cache, "use_c", False):
        return "C kernel"
    try:
        from . import ckernels

        why = ckernels.build_error
    except ImportError:
        why = None
    return f"NumPy ({why})" if why else "NumPy"


def _summary(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_bench(llm, contexts: Sequence[int] = (512, 2048, 7000), n_decode: int = 32, repeats: int = 3,
              warmup: bool = True, progress: Callable[[str], None] | None = None,
              prompt_ids: dict[int, Sequence[int]] | None = None) -> list[dict]:
    """Time prefill of N tokens and `n_decode` greedy decode steps for each N in `contexts` -> one row each.

    `prompt_ids` optionally maps N to the exact ids to use (default: `synthetic_prompt(llm.tokenizer, N)`).
    Row keys: context, n_decode, repeats, prefill_tps / decode_tps / decode_ms_per_step (each a dict with
    median, min, max over the repeats; decode_ms_per_step pools every step of every repeat),
    prefill_s (median seconds), peak_rss_mb, kv_bytes_per_token, kv_fraction_of_fp16, kv_bytes_used,
    kv_dtype, blas_threads, threads.
    """
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    if n_decode < 0:
        raise InputError(f"n_decode must be >= 0, got {n_decode}")
    contexts = [int(c) for c in contexts]
    if not contexts:
        raise InputError("no context lengths given")
    for n in contexts:
        if n < 1:
            raise InputError(f"a context length must be >= 1, got {n}")
        if n + n_decode > llm.n_ctx:
            raise ContextOverflowError(
                f"context {n} + {n_decode} decode steps does not fit in the cache (n_ctx {llm.n_ctx}); "
                f"raise --ctx-size"
            )
    model, cache = llm.model, llm.cache
    say = progress or (lambda msg: None)

    def alloc_s() -> float:  # seconds the cache's budget allocator (RDR) has spent so far
        return getattr(cache, "allocator_seconds", 0.0)

    def one_run(ids: Sequence[int]) -> tuple[float, list[float], float, float]:
        llm.reset()
        a0, t0 = alloc_s(), time.perf_counter()
        logits = prefill(model, cache, ids)
        t_prefill, a1 = time.perf_counter() - t0, alloc_s()
        steps = []
        token = int(np.argmax(logits))
        for _ in range(n_decode):
            t0 = time.perf_counter()
            logits = model.forward(np.array([token], dtype=np.int64), cache)[-1]
            token = int(np.argmax(logits))
            steps.append(time.perf_counter() - t0)
        return t_prefill, steps, a1 - a0, alloc_s() - a1

    if warmup:
        say("warm-up")
        one_run(synthetic_prompt(llm.tokenizer, min(64, min(contexts))))

    rows = []
    for n in contexts:
        ids = list(prompt_ids[n]) if prompt_ids and n in prompt_ids else synthetic_prompt(llm.tokenizer, n)
        if len(ids) != n:
            raise InputError(f"the prompt for context {n} has {len(ids)} ids")
        prefill_tps, decode_tps, prefill_s, step_s, alloc_pre, alloc_dec = [], [], [], [], [], []
        kv = None
        for r in range(repeats):
            say(f"context {n}: run {r + 1}/{repeats}")
            t_prefill, steps, a_pre, a_dec = one_run(ids)
            alloc_pre.append(a_pre)
            alloc_dec.append(a_dec / max(len(steps), 1))
            prefill_s.append(t_prefill)
            prefill_tps.append(n / t_prefill)
            if steps:
                decode_tps.append(len(steps) / sum(steps))
                step_s.extend(steps)
            kv = cache.stats()
        llm.reset()
        rows.append({
            "context": n,
            "n_decode": n_decode,
            "repeats": repeats,
            "prefill_tps": _summary(prefill_tps),
            "prefill_s": statistics.median(prefill_s),
            "decode_tps": _summary(decode_tps) if decode_tps else None,
            "decode_ms_per_step": _summary([s * 1e3 for s in step_s]) if step_s else None,
            "peak_rss_mb": peak_rss_mb(),
            "kv_tokens": kv["tokens"],
            "kv_bytes_used": kv["bytes_used"],
            "kv_bytes_per_token": kv["bytes_per_token"],
            "kv_fraction_of_fp16": kv["fraction_of_fp16"],
            "kv_dtype": str(cache.pools[0].tier.dtype) if getattr(cache, "pools", None) else None,
            "n_ctx": llm.n_ctx,
            "threads": getattr(llm, "threads", None),
            "blas_threads": blas_threads(),
            "decode_attention": attention_path(llm),
            # the RDR allocator's own time (0 for policies without one), inside the prefill / decode times above
            "allocator_prefill_s": statistics.median(alloc_pre),
            "allocator_ms_per_step": statistics.median(alloc_dec) * 1e3,
        })
    return rows


def bench_meta(llm=None, kv_dtype: str | None = None, command: str | None = None) -> dict:
    """Machine / software facts for a report's header."""
    info = blas_info()
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": cpu_model(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": ", ".join(f"{i['internal_api']} {i['version']}" for i in info) or "none found",
        "blas_threads": blas_threads(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    }
    if llm is not None:
        meta["model"] = str(llm.loaded.path)
        meta["model_name"] = llm.loaded.path.name
        meta["n_ctx"] = llm.n_ctx
        meta["kv_dtype"] = kv_dtype or str(llm.cache.pools[0].tier.dtype)
        meta["kv_policy"] = llm.cache.policy.name
        meta["threads"] = getattr(llm, "threads", None)
        meta["decode_attention"] = attention_path(llm)
    elif kv_dtype:
        meta["kv_dtype"] = kv_dtype
    if command:
        meta["command"] = command
    return meta


def _mmm(s: dict | None, fmt: str = "{:.1f}") -> str:
    if not s:
        return "–"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def format_markdown(rows: list[dict], meta: dict) -> str:
    """A markdown report: header lines from `meta`, then one table row per context (median (min–max))."""
    lines = ["# skvrt benchmark", ""]
    for key, label in (("command", "Command"), ("date", "Date"), ("machine", "Machine"),
                       ("cpu_count", "CPUs"), ("platform", "Platform"), ("python", "Python"),
                       ("numpy", "NumPy"), ("blas", "BLAS"), ("blas_threads", "BLAS threads"),
                       ("model", "Model"), ("kv_policy", "KV policy"), ("kv_dtype", "KV dtype"), ("n_ctx", "n_ctx"),
                       ("decode_attention", "Decode attention")):
        if meta.get(key) is not None:
            value = f"`{meta[key]}`" if key in ("command", "model") else meta[key]
            lines.append(f"- {label}: {value}")
    reps = {r["repeats"] for r in rows}
    nd = {r["n_decode"] for r in rows}
    lines += [
        "",
        f"Median (min–max) of {'/'.join(map(str, sorted(reps)))} runs; {'/'.join(map(str, sorted(nd)))} "
        "greedy decode steps after an N-token synthetic prompt.",
        "",
        "| context | prefill tok/s | decode tok/s | decode ms/step | allocator ms/step (prefill s) | peak RSS MiB "
        "| KV bytes/token | KV vs fp16 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {_mmm(r['prefill_tps'])} | {_mmm(r['decode_tps'])} | "
            f"{_mmm(r['decode_ms_per_step'])} | {r.get('allocator_ms_per_step', 0):.2f} "
            f"({r.get('allocator_prefill_s', 0):.2f}) | {r['peak_rss_mb']:.0f} | {r['kv_bytes_per_token']:,.0f} | "
            f"{r['kv_fraction_of_fp16']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def to_json(rows: list[dict], meta: dict) -> str:
    return json.dumps({"meta": meta, "rows": rows}, indent=2)
