"""`skvrt eval`: quality of a KV policy (DESIGN.md section 6).

    skvrt eval kl      --text FILE [--kv-policy P --kv-opt key=value ...]   KL vs a dense fp32 cache
    skvrt eval ppl     --text FILE ...                                       the same run, perplexities first
    skvrt eval passkey [--lengths 1k,2k --depths 10,50,90 --compare-full]    retrieval accuracy

Registered by the app (cli/main.py) as `app.add_typer(eval_app, name="eval")`. Reports (markdown, or one JSON
object with --json) go to stdout; progress goes to stderr.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from skvrt.errors import InputError

eval_app = typer.Typer(
    help="Measure a KV policy's quality: KL / perplexity against a dense fp32 cache, passkey retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = typer.Option(None, "--model", "-m",
                        help="HF folder, .gguf file, or known model name (default: smollm2-135m-instruct).")
ThreadsOpt = typer.Option(None, "--threads", "-t", help="BLAS threads (default: $SKVRT_THREADS, else half the cores).")
PolicyOpt = typer.Option("full", "--kv-policy", help="KV policy under test (see skvrt.kv.KV_POLICIES).")
KvDtypeOpt = typer.Option("float16", "--kv-dtype",
                          help="Dense KV tier storage of the tested cache: float16 or float32.")
KvOptOpt = typer.Option([], "--kv-opt",
                        help="Policy option key=value, forwarded to make_cache (repeatable; numbers parsed).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object instead of markdown.")
KvTierOpt = typer.Option(None, "--kv-tier", help="ADA tier: key bits per token per KV head (e.g. 128, 192, 256); "
                         "same as --kv-opt tier=N.")
KvBudgetOpt = typer.Option(None, "--kv-budget",
                           help="KV cache byte budget per sequence: 25% (of the fp16 cache at the context size), "
                                "0.25, 64MiB or bytes; required by snapkv, h2o, spherical.")


def _load(model: Optional[str], threads: Optional[int]):
    from skvrt.loader import load_folder
    from skvrt.store import resolve
    from skvrt.threads import set_threads

    n = set_threads(threads)
    folder = resolve(model)
    return folder, load_folder(folder), n


def _check_policy(kv_policy: str, kv_dtype: str) -> None:
    from skvrt.kv import KV_POLICIES

    if kv_policy not in KV_POLICIES:
        raise InputError(f"unknown --kv-policy {kv_policy!r}; valid: {', '.join(KV_POLICIES)}")
    if kv_dtype not in ("float16", "float32"):
        raise InputError(f"--kv-dtype must be float16 or float32, not {kv_dtype!r}")


def _meta(folder, threads: int, command: str) -> dict:
    return {"model": str(folder), "threads": threads, "machine": f"{platform.node()} {platform.machine()}",
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": command}


def _progress(total: int, what: str):
    """A rich progress bar on stderr when it is a terminal, else one plain line per item."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if console.is_terminal:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=console, transient=True)
        task = bar.add_task(what, total=total)
        return bar, lambda desc: bar.update(task, advance=1, description=desc)
    import contextlib

    return contextlib.nullcontext(), lambda desc: print(desc, file=sys.stderr, flush=True)


def _kl_run(model, text, kv_policy, kv_dtype, window, eval_tokens, max_windows, as_json, threads, cache_ref,
            kv_opt, ref_mode, ppl_first, command):
    from skvrt.evaluate import (KLEvaluator, ReferenceStore, model_fingerprint, parse_policy_opts, read_text,
                                tokenize_text)

    _check_policy(kv_policy, kv_dtype)
    opts = parse_policy_opts(kv_opt)
    body = read_text(text)
    folder, loaded, n_threads = _load(model, threads)
    tokens = tokenize_text(loaded.tokenizer, body)
    store = ReferenceStore(cache_ref, model_fingerprint(folder)) if cache_ref else None
    ev = KLEvaluator(loaded.model, tokens, window, eval_tokens, max_windows, ref_store=store, ref_mode=ref_mode,
                     keep_refs=False)
    n = len(ev.windows)
    print(f"skvrt eval: {len(tokens):,} tokens in {text}; {n} window(s) of {window}, {eval_tokens} scored each; "
          f"policy {kv_policy} ({kv_dtype}{', ' + str(opts) if opts else ''}) vs full/float32", file=sys.stderr)
    ctx, tick = _progress(n, "windows")
    with ctx:
        report = ev.run(kv_policy, kv_dtype,
                        progress=lambda done, total, w, kl: tick(
                            f"window {done}/{total}: KL {w.kl.mean():.3g} (running mean {kl:.3g}), "
                            f"{w.seconds:.0f}s test + {w.ref_seconds:.0f}s ref"
                            f"{' (stored)' if w.ref_cached else ''}"),
                        **opts)
    if as_json:
        out = report.to_dict()
        out["text"] = str(text)
        out["text_tokens"] = int(len(tokens))
        out["meta"] = _meta(folder, n_threads, command)
        print(json.dumps(out, indent=2))
    else:
        print(report.markdown(ppl_first=ppl_first))


def with_tier(kv_opt: list[str], kv_tier: int | None, kv_budget: str | None = None) -> list[str]:
    """--kv-opt items plus --kv-tier / --kv-budget as the same key=value items."""
    return (list(kv_opt) + ([f"tier={kv_tier}"] if kv_tier is not None else [])
            + ([f"budget={kv_budget}"] if kv_budget is not None else []))


def _kl_options(ppl_first: bool):
    def cmd(
        text: str = typer.Option(..., "--text", help="UTF-8 text file to evaluate on (never calibration text)."),
        model: Optional[str] = ModelOpt,
        kv_policy: str = PolicyOpt,
        kv_dtype: str = KvDtypeOpt,
        kv_opt: list[str] = KvOptOpt,
        kv_tier: Optional[int] = KvTierOpt,
        kv_budget: Optional[str] = KvBudgetOpt,
        window: int = typer.Option(2048, "--window", help="Tokens per window (cache context N)."),
        eval_tokens: int = typer.Option(256, "--eval-tokens",
                                        help="Scored decode steps at the end of each window (E)."),
        max_windows: int = typer.Option(8, "--max-windows",
                                        help="At most this many windows from the text's start."),
        as_json: bool = JsonOpt,
        threads: Optional[int] = ThreadsOpt,
        cache_ref: Optional[str] = typer.Option(
            None, "--cache-ref",
            help="Folder to store / reuse the reference log-probs (float32, ~50 MB per window at E=256)."),
        ref_mode: str = typer.Option(
            "steps", "--ref-mode",
            help="Reference path: steps (decode steps) or chunk (one all-logits pass; same numbers within 1e-5)."),
    ):
        _kl_run(model, text, kv_policy, kv_dtype, window, eval_tokens, max_windows, as_json, threads, cache_ref,
                with_tier(kv_opt, kv_tier, kv_budget), ref_mode, ppl_first, "skvrt " + " ".join(sys.argv[1:]))

    return cmd


eval_app.command(
    name="kl",
    help="Mean / p99 KL(ref || test) per token, PPL ratio, top-1 agreement and KV bytes of a policy, teacher-forced "
         "through the decode path, against the same model with a dense float32 cache.",
)(_kl_options(False))
eval_app.command(
    name="ppl",
    help="Perplexity of a policy and of the dense float32 reference (the same run as `kl`, perplexities first).",
)(_kl_options(True))


@eval_app.command()
def passkey(
    model: Optional[str] = ModelOpt,
    kv_policy: str = PolicyOpt,
    kv_dtype: str = KvDtypeOpt,
    kv_opt: list[str] = KvOptOpt,
    kv_tier: Optional[int] = KvTierOpt,
    kv_budget: Optional[str] = KvBudgetOpt,
    lengths: str = typer.Option("1k,2k,4k,7.5k", "--lengths", help="Total prompt lengths in tokens (k = 1024)."),
    depths: str = typer.Option("10,50,90", "--depths", help="Needle depths in percent of the prompt."),
    trials: int = typer.Option(3, "--trials", help="Prompts per (length, depth) cell, each with its own key."),
    seed: int = typer.Option(0, "--seed", help="Seed of the keys."),
    max_tokens: int = typer.Option(8, "--max-tokens", "-n", help="Greedy tokens decoded after the prompt."),
    compare_full: bool = typer.Option(False, "--compare-full",
                                      help="Also run policy full (float16) on the same prompts."),
    as_json: bool = JsonOpt,
    threads: Optional[int] = ThreadsOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print every answer to stderr."),
):
    """Passkey retrieval: a 5-digit key hidden in filler at several depths and lengths, greedy decode, exact match."""
    from skvrt.evaluate import (parse_depths, parse_lengths, parse_policy_opts, passkey_prompts, passkey_table,
                                run_passkey)

    _check_policy(kv_policy, kv_dtype)
    opts = parse_policy_opts(with_tier(kv_opt, kv_tier, kv_budget))
    L, D = parse_lengths(lengths), parse_depths(depths)
    if trials < 1:
        raise InputError("--trials must be >= 1")
    folder, loaded, n_threads = _load(model, threads)
    if max(L) + 16 > loaded.model.args.max_position_embeddings:
        raise InputError(f"--lengths: {max(L)} + 16 tokens exceed the model's context "
                         f"({loaded.model.args.max_position_embeddings})")
    prompts = passkey_prompts(loaded.tokenizer, L, D, trials, seed)
    runs = [(kv_policy, kv_dtype, opts)]
    if compare_full and (kv_policy, kv_dtype, opts) != ("full", "float16", {}):
        runs.append(("full", "float16", {}))
    all_results = {}
    for pol, dt, po in runs:
        extra = ", ".join([dt] + [f"{k}={v}" for k, v in po.items()])
        label = pol if not po and dt == "float16" else f"{pol} ({extra})"
        ctx, tick = _progress(len(prompts), label)
        with ctx:
            def report(done, total, r, label=label):
                line = (f"{label} {done}/{total}: len {r['length']} depth {r['depth']:.0%} -> "
                        f"{'ok' if r['correct'] else 'miss'}")
                if verbose:
                    line += f" (key {r['key']}, answer {r['answer']!r}, {r['seconds']:.1f}s)"
                tick(line)

            all_results[label] = run_passkey(loaded.model, loaded.tokenizer, prompts, pol, dt, max_tokens, report,
                                             **po)
    if as_json:
        out = {"lengths": L, "depths": D, "trials": trials, "seed": seed, "policies": {},
               "meta": _meta(folder, n_threads, "skvrt " + " ".join(sys.argv[1:]))}
        for label, res in all_results.items():
            table = passkey_table(res)
            out["policies"][label] = {
                "accuracy": sum(r["correct"] for r in res) / len(res),
                "cells": [{"length": l, "depth": d, "correct": c, "trials": n} for (l, d), (c, n) in table.items()],
                "results": res,
            }
        print(json.dumps(out, indent=2))
        return
    labels = list(all_results)
    tables = {lab: passkey_table(res) for lab, res in all_results.items()}
    lines = ["| length | depth | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for l in L:
        for d in D:
            cells = [f"{tables[lab][(l, d)][0]}/{tables[lab][(l, d)][1]}" for lab in labels]
            lines.append(f"| {l} | {d:.0%} | " + " | ".join(cells) + " |")
        tot = [f"**{sum(tables[lab][(l, d)][0] for d in D)}/{sum(tables[lab][(l, d)][1] for d in D)}**"
               for lab in labels]
        lines.append(f"| {l} | all | " + " | ".join(tot) + " |")
    print("\n".join(lines))


@eval_app.command()
def sweep(
    text: str = typer.Option(..., "--text", help="UTF-8 text file to evaluate on (never calibration text)."),
    out: str = typer.Option(..., "--out", help="Folder for sweep.md, sweep.json and sweep.png."),
    model: Optional[str] = ModelOpt,
    budgets: str = typer.Option("50,25,12.5,6.25", "--budgets",
                                help="Byte budgets in percent of the fp16 cache at the window's context."),
    policies: str = typer.Option("window,snapkv,h2o,quant,ada,spherical", "--policies",
                                 help="Comma-separated KV policies."),
    window: int = typer.Option(2048, "--window", help="Tokens per window (cache context N)."),
    eval_tokens: int = typer.Option(256, "--eval-tokens", help="Scored decode steps at the end of each window (E)."),
    max_windows: int = typer.Option(4, "--max-windows", help="At most this many windows from the text's start."),
    threads: Optional[int] = ThreadsOpt,
    cache_ref: Optional[str] = typer.Option(None, "--cache-ref", help="Folder to store / reuse reference log-probs."),
):
    """Every policy at every budget (settings fitted to the budget; skvrt/sweep.py): markdown table + PNG plot
    of mean KL vs KV bytes, written to --out."""
    from skvrt.evaluate import KLEvaluator, ReferenceStore, model_fingerprint, read_text, tokenize_text
    from skvrt.sweep import parse_budgets, parse_policies, run_sweep, write_sweep

    B, pols = parse_budgets(budgets), parse_policies(policies)
    body = read_text(text)
    folder, loaded, n_threads = _load(model, threads)
    tokens = tokenize_text(loaded.tokenizer, body)
    store = ReferenceStore(cache_ref, model_fingerprint(folder)) if cache_ref else None
    ev = KLEvaluator(loaded.model, tokens, window, eval_tokens, max_windows, ref_store=store, keep_refs=True)
    meta = _meta(folder, n_threads, "skvrt " + " ".join(sys.argv[1:]))
    meta.update({"text": str(text), "windows": len(ev.windows), "window": window, "eval_tokens": eval_tokens})
    done: list[dict] = []

    def row_done(r: dict) -> None:
        done.append(r)
        (Path(out) / "sweep.partial.json").write_text(json.dumps({"meta": meta, "rows": done}, default=str))
        tick(f"{r['policy']} @ {r['budget']:.2%}: " + (f"KL {r['mean_kl']:.4g} at {r['kv_bytes_fraction']:.3f} of "
                                                      f"fp16" if r["options"] is not None else "does not fit"))

    Path(out).mkdir(parents=True, exist_ok=True)
    ctx, tick = _progress(len(B) * len(pols), "sweep")
    with ctx:
        rows = run_sweep(ev, pols, B, progress=row_done)
    for p in write_sweep(rows, Path(out), meta):
        print(p)
    (Path(out) / "sweep.partial.json").unlink()
