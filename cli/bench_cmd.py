"""`skvrt bench`: prefill / decode speed at several context lengths, peak RSS and KV bytes per token.

Registered by the app (cli/main.py) as `app.command("bench")(bench)`. The report (markdown table, or one
JSON object with --json) goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from skvrt.errors import InputError

PAGE_ROUND = 256


def parse_contexts(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--contexts must be a comma-separated list of token counts, not {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"--contexts must list positive token counts, not {text!r}")
    return values


def default_ctx_size(contexts: list[int], n_decode: int) -> int:
    """The largest context plus the decode steps, rounded up to a multiple of 256."""
    need = max(contexts) + n_decode
    return -(-need // PAGE_ROUND) * PAGE_ROUND


def bench(
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="HF folder, .gguf file, or known model name (default: smollm2-135m-instruct)."),
    contexts: str = typer.Option(
        "512,2048,7000", "--contexts", help="Comma-separated prompt lengths in tokens (synthetic filler text)."),
    n_decode: int = typer.Option(32, "--n-decode", "-n", help="Greedy decode steps timed after each prefill."),
    repeats: int = typer.Option(3, "--repeats", help="Runs per context (cache reset in between); medians reported."),
    threads: Optional[int] = typer.Option(
        None, "--threads", "-t", help="BLAS threads (default: $SKVRT_THREADS or half the cores)."),
    kv_dtype: str = typer.Option("float16", "--kv-dtype", help="Dense KV tier storage: float16 or float32."),
    kv_policy: str = typer.Option("full", "--kv-policy",
                                  help="KV cache policy: full, window, ada, quant, snapkv, h2o, spherical."),
    kv_opt: list[str] = typer.Option([], "--kv-opt", help="Policy option key=value (repeatable), e.g. window=64."),
    kv_tier: Optional[int] = typer.Option(None, "--kv-tier", help="ADA tier: key bits per token per KV head."),
    kv_budget: Optional[str] = typer.Option(
        None, "--kv-budget", help="KV byte budget: 25% (of the fp16 cache at --ctx-size), 0.25, 64MiB or bytes."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the markdown table."),
    ctx_size: Optional[int] = typer.Option(
        None, "--ctx-size", "-c",
        help="KV cache size in tokens (default: largest context + n-decode, rounded up to 256)."),
    no_warmup: bool = typer.Option(False, "--no-warmup", help="Skip the short untimed warm-up run."),
    device: Optional[str] = typer.Option(
        None, "--device", help="auto, cpu or cuda (default: $SKVRT_DEVICE, else auto); cuda never falls back."),
) -> None:
    """Benchmark prefill and decode speed, peak RSS and KV bytes/token at several context lengths."""
    import skvrt
    from skvrt.bench import bench_meta, format_markdown, run_bench, to_json

    ctx_list = parse_contexts(contexts)
    if kv_dtype not in ("float16", "float32"):
        raise InputError(f"--kv-dtype must be float16 or float32, not {kv_dtype!r}")
    if n_decode < 0:
        raise InputError("--n-decode must be >= 0")
    if repeats < 1:
        raise InputError("--repeats must be >= 1")
    if threads is not None and threads < 1:
        raise InputError("--threads must be >= 1")
    if ctx_size is not None and ctx_size < 1:
        raise InputError("--ctx-size must be >= 1")
    n_ctx = ctx_size or default_ctx_size(ctx_list, n_decode)
    from skvrt.backend import select

    select(device, for_model=True)  # DeviceError (exit 1, the reason) before the model is loaded

    from rich.console import Console

    console = Console(stderr=True)
    with console.status("loading model") as status:
        from skvrt.evaluate import parse_policy_opts

        from .eval_cmd import with_tier

        llm = skvrt.load(model, n_ctx=n_ctx, kv_dtype=kv_dtype, threads=threads, kv_policy=kv_policy,
                         kv_opts=parse_policy_opts(with_tier(kv_opt, kv_tier, kv_budget)), device=device)

        def progress(msg: str) -> None:
            status.update(f"bench: {msg}")

        rows = run_bench(llm, ctx_list, n_decode=n_decode, repeats=repeats, warmup=not no_warmup,
                         progress=progress)
    command = "skvrt bench " + " ".join(sys.argv[1:]) if sys.argv else None
    meta = bench_meta(llm, kv_dtype=kv_dtype, command=command)
    if json_out:
        typer.echo(to_json(rows, meta))
    else:
        typer.echo(format_markdown(rows, meta), nl=False)


if __name__ == "__main__":  # python -m skvrt.cli.bench_cmd ...
    typer.run(bench)
