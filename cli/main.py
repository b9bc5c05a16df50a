"""`skvrt` command line (typer). Each command is a few lines over the library; one option vocabulary.

Generated text goes to stdout and nothing else does; progress, stats and errors go to stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from skvrt.errors import InputError, SkvrtError

from .eval_cmd import KvBudgetOpt, eval_app, with_tier

app = typer.Typer(
    name="skvrt",
    help="Spherical KV runtime: run, chat with, convert and benchmark LLMs without PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# ---- the shared option vocabulary ---------------------------------------------------------------------
ModelOpt = typer.Option(None, "--model", "-m", help="HF folder, .gguf file, or known model name (default: smollm2-135m-instruct).")
MaxTokensOpt = typer.Option(256, "--max-tokens", "-n", help="Maximum tokens to generate.")
TempOpt = typer.Option(0.8, "--temp", help="Sampling temperature; 0 = greedy.")
TopPOpt = typer.Option(0.95, "--top-p", help="Nucleus sampling threshold; 1 = off.")
TopKOpt = typer.Option(40, "--top-k", help="Keep the k most likely tokens; 0 = off.")
MinPOpt = typer.Option(0.05, "--min-p", help="Drop tokens below min-p x the top probability; 0 = off.")
RepeatPenaltyOpt = typer.Option(1.0, "--repeat-penalty", help="Repetition penalty over the last 64 tokens; 1 = off.")
SeedOpt = typer.Option(None, "--seed", help="Random seed; the same seed gives the same tokens.")
SystemOpt = typer.Option(None, "--system-prompt", "-s", help="System message (chat template).")
CtxOpt = typer.Option(None, "--ctx-size", "-c", help="Context length in tokens (default: the model's).")
ThreadsOpt = typer.Option(None, "--threads", "-t", help="BLAS threads (default: $SKVRT_THREADS, else half the cores).")
KvDtypeOpt = typer.Option("float16", "--kv-dtype", help="Dense KV tier storage: float16 or float32.")
KvPolicyOpt = typer.Option("full", "--kv-policy", help="KV cache policy: full, window (sinks + recent), ada (angle-domain key codes; --kv-tier), quant (int K/V for old tokens), snapkv / h2o (eviction under --kv-budget), spherical (ADA + RDR under --kv-budget).")
KvTierOpt = typer.Option(None, "--kv-tier", help="ADA tier: key bits per token per KV head (e.g. 128, 192, 256).")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu or cuda (default: $SKVRT_DEVICE, else auto). cuda fails with the reason when CuPy, a GPU or NVRTC is missing; it never falls back to the CPU.")
KvOptOpt = typer.Option([], "--kv-opt", help="Policy option key=value (repeatable): sinks, window, k_bits, v_bits, v_group, ladder (spherical, e.g. dense,256:4,192:2,128:2), drop_cost, util_floor, keep_if_fits, surprisal (spherical: share 0..1 of the utility floor spread by each token's surprisal), lookahead (budgeted policies: auto / 1 / 0, prefill the prompt twice so tiers are chosen knowing its last queries; spherical default auto = when the budget cannot keep every token), horizon (with lookahead: tokens the continuation is expected to span, default 256; each head's prior is scaled by the share of its attention that reaches that far back; 0 = no scaling), head_weight (spherical: power 0..4 of each head's calibrated output sensitivity that weighs its distortions, default 0.5; 0 = every head alike).")


def sampling(temp, top_p, top_k, min_p, repeat_penalty, seed) -> dict:
    if temp < 0 or not 0 < top_p <= 1 or top_k < 0 or not 0 <= min_p < 1 or repeat_penalty <= 0:
        raise InputError("sampling options out of range: --temp >= 0, 0 < --top-p <= 1, --top-k >= 0, "
                         "0 <= --min-p < 1, --repeat-penalty > 0")
    return dict(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repeat_penalty, seed=seed)


def check_kv_dtype(kv_dtype: str) -> str:
    if kv_dtype not in ("float16", "float32"):
        raise InputError(f"--kv-dtype must be float16 or float32, not {kv_dtype!r}")
    return kv_dtype


def read_prompt(prompt: str) -> str:
    """`-` reads stdin as UTF-8; anything else is the prompt itself."""
    if prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"stdin is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def load_llm(model, ctx_size, threads, kv_dtype, kv_policy="full", kv_opt=(), device=None):
    import skvrt
    from skvrt.evaluate import parse_policy_opts

    opts = parse_policy_opts(list(kv_opt))
    return skvrt.load(model, n_ctx=ctx_size, kv_dtype=check_kv_dtype(kv_dtype), threads=threads,
                      kv_policy=kv_policy, kv_opts=opts, device=device)


def print_stats(r, llm, file=sys.stderr) -> None:
    s = llm.cache.stats()
    print(
        f"prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tok/s | generation: {r.generation_tokens} tokens, "
        f"{r.generation_tps:.1f} tok/s | peak RSS {r.peak_memory_mb:.0f} MB | KV {s['policy']} {s['tokens']}/"
        f"{s['n_ctx']} tokens, {s['bytes_used'] / 2**20:.1f} MiB in {s['pages_used']} pages "
        f"(of {s['bytes_pool'] / 2**20:.1f} MiB preallocated{', the budget' if s['budget'] else ''}) "
        f"({', '.join(f'{k} {v}' for k, v in s['pages_by_tier'].items())}; {s['fraction_of_fp16']:.0%} of fp16 "
        f"for the tokens held)"
        f" | finish: {r.finish_reason}",
        file=file,
    )


# ---- commands -----------------------------------------------------------------------------------------


@app.command()
def run(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text; '-' reads stdin."),
    model: Optional[str] = ModelOpt,
    max_tokens: int = MaxTokensOpt,
    temp: float = TempOpt,
    top_p: float = TopPOpt,
    top_k: int = TopKOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatPenaltyOpt,
    seed: Optional[int] = SeedOpt,
    system_prompt: Optional[str] = SystemOpt,
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as it is, without the chat template."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    ctx_size: Optional[int] = CtxOpt,
    threads: Optional[int] = ThreadsOpt,
    kv_dtype: str = KvDtypeOpt,
    kv_policy: str = KvPolicyOpt,
    kv_opt: list[str] = KvOptOpt,
    kv_tier: Optional[int] = KvTierOpt,
    kv_budget: Optional[str] = KvBudgetOpt,
    device: Optional[str] = DeviceOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print speed and memory stats to stderr."),
):
    """Generate a completion for one prompt and stream it to stdout."""
    text = read_prompt(prompt)
    if not text.strip():
        raise InputError("the prompt is empty")
    opts = sampling(temp, top_p, top_k, min_p, repeat_penalty, seed)
    llm = load_llm(model, ctx_size, threads, kv_dtype, kv_policy, with_tier(kv_opt, kv_tier, kv_budget), device)
    if raw:
        stream = llm.stream(text, max_tokens, stop=stop, **opts)
    else:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}
        ]
        stream = llm.chat_stream(messages, max_tokens, stop=stop, **opts)
    last = None
    for r in stream:
        sys.stdout.write(r.text)
        sys.stdout.flush()
        last = r
    sys.stdout.write("\n")
    if verbose and last is not None:
        print_stats(last, llm)


@app.command()
def chat(
    model: Optional[str] = ModelOpt,
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", help="Maximum tokens per reply."),
    temp: float = TempOpt,
    top_p: float = TopPOpt,
    top_k: int = TopKOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatPenaltyOpt,
    seed: Optional[int] = SeedOpt,
    system_prompt: Optional[str] = SystemOpt,
    ctx_size: Optional[int] = CtxOpt,
    threads: Optional[int] = ThreadsOpt,
    kv_dtype: str = KvDtypeOpt,
    kv_policy: str = KvPolicyOpt,
    kv_opt: list[str] = KvOptOpt,
    kv_tier: Optional[int] = KvTierOpt,
    kv_budget: Optional[str] = KvBudgetOpt,
    device: Optional[str] = DeviceOpt,
):
    """Interactive chat (REPL). /help lists commands; Ctrl-C stops a reply, Ctrl-C at the prompt exits."""
    from .repl import ChatREPL

    opts = sampling(temp, top_p, top_k, min_p, repeat_penalty, seed)
    llm = load_llm(model, ctx_size, threads, kv_dtype, kv_policy, with_tier(kv_opt, kv_tier, kv_budget), device)
    ChatREPL(llm, system_prompt, max_tokens, opts).loop()


@app.command()
def pull(
    name: str = typer.Argument("smollm2-135m-instruct", help="Known model name."),
    force: bool = typer.Option(False, "--force", help="Convert again even if the store has it."),
    no_calibrate: bool = typer.Option(False, "--no-calibrate", help="Skip the ADA calibration step."),
):
    """Download, verify (sha256), convert and calibrate a known model into the model store; prints its folder."""
    from skvrt.store import pull as store_pull

    print(store_pull(name, force=force, calibrate=not no_calibrate))


@app.command()
def convert(
    gguf_file: Path = typer.Argument(..., help="GGUF file to import."),
    out_dir: Path = typer.Argument(..., help="Output HF folder (config.json, model.safetensors, tokenizer.json)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32, float16 or bfloat16."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT_DIR if it exists."),
):
    """Import a GGUF file (llama architecture) as an ordinary HF model folder."""
    from skvrt.gguf_import import convert_gguf

    if dtype not in ("float32", "float16", "bfloat16"):
        raise InputError(f"--dtype must be float32, float16 or bfloat16, not {dtype!r}")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise InputError(f"{out_dir} exists and is not empty; pass --force to overwrite it")
    print(convert_gguf(gguf_file, out_dir, dtype=dtype, overwrite=force))


@app.command()
def calibrate(
    model: Optional[str] = typer.Argument(None, help="HF folder, .gguf file or known model name (default: smollm2-135m-instruct)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Calibration text file (default: text the model writes itself). Never the evaluation text."),
    show_report: bool = typer.Option(False, "--report", help="Also measure every ADA tier on the held-back keys, and print the ladder's distortion."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    threads: Optional[int] = ThreadsOpt,
):
    """Measure per-pair key statistics for ADA (first 75% of the text) and the distortion of the ADA tier ladder
    (held-back last 25%); write the sidecar skvrt-kv.safetensors next to the weights."""
    import skvrt
    from skvrt.calibrate import calibrate as run_calibrate, report

    llm = skvrt.load(model, threads=threads)
    body = None
    if text is not None:
        try:
            body = text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read {text} as UTF-8 text: {e}") from None
    source = str(text) if text else "self-generated"
    cal, held = run_calibrate(llm, body, source, return_held=True)
    path = cal.save(llm.loaded.path)
    m = cal.meta
    n_held = m["held_back_tokens"]
    ladder = m.get("ladder_mean", [])
    msg = (f"skvrt: wrote {path} ({m['tokens']} tokens, {m['seconds']} s): pair statistics from the first "
           f"{m['tokens'] - n_held} tokens")
    if ladder:
        msg += (f"; distortion d of the ADA tiers any ladder is built from, per (layer, kv head), on the last {n_held} (held back; 0 = dense, "
                f"1 = as if dropped), mean " + ", ".join(f"{r['tier']} {r['d']:.3g}" for r in ladder))
    if cal.head_sensitivity is not None:
        import numpy as np

        lo, hi = np.percentile(cal.head_sensitivity, [10, 90])
        msg += (f"; head sensitivity (output KL per attention mass dropped) from the first "
                f"{m['head_sensitivity']['tokens']} tokens, {m['head_sensitivity']['seconds']} s: the 90th percentile "
                f"head {hi / max(lo, 1e-30):.1f}x the 10th")
    print(msg, file=sys.stderr)
    if not show_report:
        return
    rows = report(cal, held)
    if as_json:
        print(json.dumps({"tiers": rows, "ladder": ladder}, indent=1))
        return
    print("| tier | K bytes | V bytes | metadata bytes | bytes/token/head | of fp16 | logit rel. MSE | attn-out cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tier']} | {r['k_bytes']:g} | {r['v_bytes']:g} | {r['metadata_bytes']:.2f} | "
              f"{r['bytes_per_token_head']:.2f} | {r['fraction_of_fp16']:.3f} | {r['logit_rel_mse']:.2e} | "
              f"{r['attn_out_cosine']:.5f} |")
    if ladder:
        print("\nLadder distortion d = logit term E_t[sum_j p_t(j) (s_hat - s)^2] (attention-weighted) + value term E ||v_hat - v||^2 / E ||v - o||^2 "
              "(0 = dense, 1 = as if the token were dropped), over (layer, kv head):")
        print("| ladder tier | key bits/token/head | mean d | logit term | value term | d min | d max |")
        print("|---|---|---|---|---|---|---|")
        for i, r in enumerate(ladder):
            d = cal.ladder_distortion[..., i]  # (L, H)
            print(f"| {r['tier']} | {r['key_bits']} | {r['d']:.4f} | {r['logit']:.4f} | {r['value']:.4f} | "
                  f"{d.min():.4f} | {d.max():.4f} |")


@app.command()
def info(
    model: Optional[str] = typer.Argument(None, help="HF folder, .gguf file or known model name (default: smollm2-135m-instruct)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Architecture, sizes and KV bytes per token of a model (reads headers only)."""
    from skvrt.loader import describe
    from skvrt.store import resolve

    d = describe(resolve(model))
    if as_json:
        print(json.dumps(d, indent=2))
    else:
        width = max(map(len, d))
        for k, v in d.items():
            print(f"{k:<{width}}  {v:,}" if type(v) is int else f"{k:<{width}}  {v}")


app.add_typer(eval_app, name="eval", help="Quality of a KV policy: KL / perplexity vs the fp32 cache, passkey retrieval.")

try:
    from .bench_cmd import bench as _bench

    app.command(name="bench", help="Prefill and decode speed, memory and KV bytes at several contexts.")(_bench)
except ImportError:  # pragma: no cover - only while bench_cmd is absent
    pass


def main() -> None:
    try:
        app()
    except SkvrtError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
