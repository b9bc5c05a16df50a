"""skvrt vs llama.cpp (llama-cpp-python) on the same model, the same prompts, the same thread count, in one run.

    OPENBLAS_NUM_THREADS=1 python bench/llamacpp_compare.py --threads 1 --repeats 3 --out bench_result.md

What it does (DESIGN.md section 8):
- builds one synthetic prompt per context length with skvrt's tokenizer (`skvrt.bench.synthetic_prompt`) and
  hands the *token ids* to both engines, so both see identical prompts;
- skvrt: one fresh process per context (this script in `--worker skvrt` mode, run with this Python): load,
  warm up, then `repeats` runs of prefill + n_decode greedy steps (cache reset in between), via
  `skvrt.bench.run_bench`; peak RSS is that process's ru_maxrss;
- llama.cpp: one fresh process per (KV type, context, repeat) (this script in `--worker llama` mode, run with
  `--llama-python`, which needs only llama_cpp and numpy), n_ctx 8192, n_threads = n_threads_batch = the
  BLAS thread count skvrt runs with, greedy (argmax of the last logits), the same GGUF file; KV types f16
  (flash attention off, llama.cpp's fastest CPU setting here) and q4_0 K and V with flash attention;
  prefill timed around `Llama.eval(prompt)`, each decode step around argmax + `Llama.eval([token])`;
- writes a markdown report (header: command, machine, date, BLAS threads) with both engines and the ratios
  skvrt / llama.cpp; `--json FILE` also keeps the raw numbers.

KV bytes/token: skvrt's from `PagedKVCache.stats()` (pages really in use, page metadata included);
llama.cpp's from the model metadata: 2 (K,V) x layers x kv_heads x head_dim x bytes per element (f16: 2;
q4_0: 18 bytes per 32 elements), the same for every token (llama.cpp allocates the whole n_ctx cache at load).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_KV = {
    # name: (type_k = type_v, flash_attn, bytes per element)
    "f16": (1, False, 2.0),  # GGML_TYPE_F16
    "f16-fa": (1, True, 2.0),
    "q8_0": (8, True, 34 / 32),  # GGML_TYPE_Q8_0
    "q4_0": (2, True, 18 / 32),  # GGML_TYPE_Q4_0
}
DEFAULT_LLAMA_PYTHON = "/work/llamavenv/bin/python"


def _summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _peak_rss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# ---- workers (run in fresh processes) -------------------------------------------------------------------

def worker_llama(spec: dict) -> dict:
    """One llama.cpp run: load, warm up, prefill spec['ids'], n_decode greedy steps. Needs llama_cpp + numpy."""
    import ctypes

    import numpy as np
    import llama_cpp
    import llama_cpp.llama_cpp as llama_c

    if not spec.get("extra_bufts", False):
        # Weight repacking into "extra" buffer types off: on this CPU (AVX-512 + AMX) llama.cpp picks its AMX
        # buffer for the Q4_1 weights, and ggml_backend_amx_mul_mat segfaults in the first llama_decode.
        # llama-cpp-python has no argument for it, so patch the default model params it starts from.
        _default = llama_c.llama_model_default_params

        def _params():
            params = _default()
            params.use_extra_bufts = False
            return params

        llama_c.llama_model_default_params = _params
    from llama_cpp import Llama

    type_kv, flash, bytes_per_el = LLAMA_KV[spec["kv"]]
    llm = Llama(model_path=spec["gguf"], n_ctx=spec["n_ctx"], n_threads=spec["threads"],
                n_threads_batch=spec["threads"], type_k=type_kv, type_v=type_kv, flash_attn=flash,
                n_gpu_layers=0, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))

    ids = spec["ids"]
    if spec.get("warmup", True):  # same warm-up as skvrt's: a short prompt and one step, then clear
        llm.eval(ids[:64])
        llm.eval([int(np.argmax(last_logits()))])
        llm.reset()
    c0, w0 = time.process_time(), time.perf_counter()
    t0 = time.perf_counter()
    llm.eval(ids)
    t_prefill = time.perf_counter() - t0
    steps, tokens = [], []
    for _ in range(spec["n_decode"]):
        t0 = time.perf_counter()
        token = int(np.argmax(last_logits()))
        llm.eval([token])
        steps.append(time.perf_counter() - t0)
        tokens.append(token)
    cpu_share = (time.process_time() - c0) / (time.perf_counter() - w0)
    md = llm.metadata
    arch = md.get("general.architecture", "llama")
    n_layers = int(md[f"{arch}.block_count"])
    n_head = int(md[f"{arch}.attention.head_count"])
    n_kv = int(md.get(f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(md.get(f"{arch}.attention.key_length", int(md[f"{arch}.embedding_length"]) // n_head))
    kv_bpt = 2 * n_layers * n_kv * head_dim * bytes_per_el
    return {
        "prefill_s": t_prefill,
        "step_s": steps,
        "tokens": tokens,
        "peak_rss_mb": _peak_rss_mb(),
        "kv_bytes_per_token": kv_bpt,
        "llama_cpp_version": getattr(llama_cpp, "__version__", "?"),
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "n_batch": llm.n_batch,
        "extra_bufts": bool(spec.get("extra_bufts", False)),
        "cpu_share": cpu_share,
    }


def worker_skvrt(spec: dict) -> dict:
    """One context in one process: skvrt.bench.run_bench with the given ids; adds the greedy tokens."""
    import numpy as np

    import skvrt
    from skvrt.bench import bench_meta, run_bench

    from skvrt.evaluate import parse_policy_opts

    name, _, opts = spec.get("policy", "full").partition(":")
    llm = skvrt.load(spec["model"], n_ctx=spec["n_ctx"], kv_dtype=spec["kv_dtype"], threads=spec["threads"],
                     kv_policy=name, kv_opts=parse_policy_opts([o for o in opts.split(",") if o]))
    n = len(spec["ids"])
    c0, w0 = time.process_time(), time.perf_counter()
    rows = run_bench(llm, [n], n_decode=spec["n_decode"], repeats=spec["repeats"], warmup=True,
                     prompt_ids={n: spec["ids"]})
    cpu_share = (time.process_time() - c0) / (time.perf_counter() - w0)
    # The greedy continuation (untimed), to check both engines decode the same text.
    from skvrt.generate import prefill

    llm.reset()
    logits = prefill(llm.model, llm.cache, spec["ids"])
    tokens = []
    for _ in range(min(spec["n_decode"], 16)):
        tokens.append(int(np.argmax(logits)))
        logits = llm.model.forward(np.array([tokens[-1]], dtype=np.int64), llm.cache)[-1]
    row = rows[0]
    row["tokens"] = tokens
    row["cpu_share"] = cpu_share
    row["peak_rss_mb"] = max(row["peak_rss_mb"], _peak_rss_mb())
    return {"row": row, "meta": bench_meta(llm, kv_dtype=spec["kv_dtype"])}


def run_worker(python: str, kind: str, spec: dict, timeout: float | None, env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="skvrt-cmp-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [python, os.path.abspath(__file__), "--worker", kind, "--spec", str(spec_path),
               "--result", str(out_path)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{kind} worker timed out after {timeout} s") from None
        if r.returncode != 0 or not out_path.is_file():
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{kind} worker failed (rc {r.returncode}):\n{tail}")
        return json.loads(out_path.read_text())


# ---- the driver ------------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt_mmm(s, f="{:.1f}"):
    if not s:
        return "–"
    return f"{f.format(s['median'])} ({f.format(s['min'])}–{f.format(s['max'])})"


def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "–"


def _load(v) -> str:
    return " / ".join(f"{x:.2f}" for x in v) if v else "not recorded"


def _share(v) -> str:
    return f"{v:.2f}" if v is not None else "–"


def merge(results: list[dict]) -> dict:
    """Several --json files (e.g. skvrt and llama.cpp measured by separate invocations) -> one result."""
    out = json.loads(json.dumps(results[0]))
    commands = [r["meta"]["command"] for r in results]
    out["meta"]["command"] = " ; ".join(dict.fromkeys(commands))
    for r in results[1:]:
        for n in r["contexts"]:
            if n not in out["contexts"]:
                out["contexts"].append(n)
        for kv in r["llama_kv"]:
            if kv not in out["llama_kv"]:
                out["llama_kv"].append(kv)
        out["skvrt"].update(r["skvrt"])
        for kv, rows in r["llama"].items():
            out["llama"].setdefault(kv, {}).update(rows)
        for k, v in r["meta"].items():
            if k.startswith(("skvrt_", "llama_")) and v is not None:
                out["meta"][k] = v
        out["meta"]["loadavg_end"] = r["meta"].get("loadavg_end")
        out["errors"].update(r.get("errors", {}))
    out["contexts"].sort()
    for key in list(out["errors"]):  # an error superseded by a later successful run
        kind, n = key.split("/")
        done = out["skvrt"] if kind == "skvrt" else out["llama"].get(kind, {})
        if n in done:
            del out["errors"][key]
    return out


def report(res: dict) -> str:
    m = res["meta"]
    contexts = res["contexts"]
    kvs = res["llama_kv"]
    lines = [
        "# skvrt vs llama.cpp (CPU)",
        "",
        f"- Command: `{m['command']}`",
        f"- Date: {m['date']}",
        f"- Machine: {m['machine']}, {m['cpu_count']} CPUs ({m['platform']})",
        f"- Threads: skvrt BLAS threads {m['skvrt_blas_threads']} ({m['blas']}, OPENBLAS_NUM_THREADS="
        f"{m['OPENBLAS_NUM_THREADS']}); llama.cpp n_threads = n_threads_batch = {m['threads']}",
        f"- Software: Python {m['python']}, NumPy {m['numpy']}; llama-cpp-python {m.get('llama_cpp_version', '?')}",
        f"- llama.cpp system info: `{m.get('llama_system_info', '?')}`",
        f"- Model: skvrt `{m['skvrt_model']}` (float32 weights, KV {m['skvrt_kv_dtype']}, n_ctx {m['n_ctx']}, "
        f"decode attention: {m.get('skvrt_decode_attention', '?')}); "
        f"llama.cpp `{m['gguf']}` (n_ctx {m['n_ctx']}, n_batch {m.get('llama_n_batch', '?')}, "
        f"use_extra_bufts={m.get('llama_extra_bufts', '?')}: weight repacking / AMX "
        f"{'on' if m.get('llama_extra_bufts') else 'off, its AMX Q4_1 matmul segfaults on this CPU'})",
        f"- Prompts: synthetic filler text, tokenized by skvrt and cut to N ids; the same ids go to both engines. "
        f"{m['n_decode']} greedy decode steps after the prompt.",
        f"- Runs: median (min–max) of the runs in the `runs` column; skvrt: one fresh process per context (after a "
        "64-token warm-up), cache reset between runs; llama.cpp: one fresh process per run (same warm-up).",
        f"- Load average (1/5/15 min) at start: {_load(m.get('loadavg_start'))}; at end: "
        f"{_load(m.get('loadavg_end'))}. CPU share = process CPU seconds / wall seconds over the timed "
        f"runs (ideal: the thread count; less means the process waited for a core).",
        "- llama.cpp KV types: " + ", ".join(
            f"{k} ({'flash attention' if LLAMA_KV[k][1] else 'no flash attention'})" for k in kvs),
        "",
        "## Results",
        "",
        "| context | engine | prefill tok/s | decode tok/s | decode ms/step | peak RSS MiB | KV bytes/token "
        "| CPU share | runs |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    policies = res.get("skvrt_policies") or {"full": res["skvrt"]}
    for n in contexts:
        for pol, rows in policies.items():
            s = rows.get(str(n))
            label = f"skvrt ({m['skvrt_kv_dtype']} KV)" if pol == "full" else f"skvrt `{pol}`"
            if s:
                lines.append(
                    f"| {n} | {label} | {fmt_mmm(s['prefill_tps'])} | {fmt_mmm(s['decode_tps'])} | "
                    f"{fmt_mmm(s['decode_ms_per_step'])} | {s['peak_rss_mb']:.0f} | {s['kv_bytes_per_token']:,.0f} | "
                    f"{_share(s.get('cpu_share'))} | {s.get('repeats', '?')} |")
            else:
                lines.append(f"| {n} | {label} | failed | | | | |")
        for kv in kvs:
            L = res["llama"].get(kv, {}).get(str(n))
            if L:
                lines.append(
                    f"| {n} | llama.cpp {kv} KV | {fmt_mmm(L['prefill_tps'])} | {fmt_mmm(L['decode_tps'])} | "
                    f"{fmt_mmm(L['decode_ms_per_step'])} | {L['peak_rss_mb']['median']:.0f} | "
                    f"{L['kv_bytes_per_token']:,.0f} | {_share(L.get('cpu_share'))} | {L.get('runs', '?')} |")
            else:
                lines.append(f"| {n} | llama.cpp {kv} KV | {res['errors'].get(f'{kv}/{n}', 'not run')} | | | | |")
    alloc = [(n, pol, rows[str(n)]) for n in contexts for pol, rows in policies.items()
             if rows.get(str(n)) and rows[str(n)].get("allocator_prefill_s")]
    if alloc:
        lines += ["", "RDR allocator time (inside the prefill / decode times above): " + "; ".join(
            f"`{pol}` at {n}: {r['allocator_prefill_s']:.2f} s of the prefill, "
            f"{r['allocator_ms_per_step']:.2f} ms per decode step" for n, pol, r in alloc)]
    lines += [
        "",
        "## Ratios skvrt / llama.cpp (medians; > 1 means skvrt is faster, or uses more memory)",
        "",
        "| context | skvrt policy | vs | prefill tok/s | decode tok/s | peak RSS | KV bytes/token |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for n, (pol, rows) in ((n, pr) for n in contexts for pr in policies.items()):
        s = rows.get(str(n))
        for kv in kvs:
            L = res["llama"].get(kv, {}).get(str(n))
            if not (s and L):
                continue
            lines.append(
                f"| {n} | {pol} | {kv} | {ratio(s['prefill_tps']['median'], L['prefill_tps']['median'])} | "
                f"{ratio(s['decode_tps']['median'], L['decode_tps']['median'])} | "
                f"{ratio(s['peak_rss_mb'], L['peak_rss_mb']['median'])} | "
                f"{ratio(s['kv_bytes_per_token'], L['kv_bytes_per_token'])} |")
    agree = []
    for n in contexts:
        s = res["skvrt"].get(str(n))
        for kv in kvs:
            L = res["llama"].get(kv, {}).get(str(n))
            if s and L and s.get("tokens") and L.get("tokens"):
                a, b = s["tokens"], L["tokens"]
                k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                agree.append(f"N={n} {kv}: {k}/{min(len(a), len(b))}")
    if agree:
        lines += ["", "Greedy tokens identical from the start (skvrt vs llama.cpp, first decoded tokens): "
                  + "; ".join(agree) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="512,2048,7000", help="comma-separated prompt lengths in tokens")
    p.add_argument("--n-decode", type=int, default=32, help="greedy decode steps timed after the prompt")
    p.add_argument("--repeats", type=int, default=3, help="runs per context and engine")
    p.add_argument("--threads", type=int, default=None,
                   help="skvrt BLAS threads and llama.cpp n_threads [default: skvrt's default]")
    p.add_argument("--out", default=None, help="markdown report file [default: stdout]")
    p.add_argument("--json", dest="json_out", default=None, help="also write the raw results as JSON")
    p.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON, help="python with llama_cpp installed")
    p.add_argument("--llama-kv", default="f16,q4_0", help=f"llama.cpp KV types, of {','.join(LLAMA_KV)}")
    p.add_argument("--model", default=None, help="skvrt model (folder / name) [default: the default model]")
    p.add_argument("--gguf", default=None, help="GGUF for llama.cpp [default: the default model's, from the store]")
    p.add_argument("--n-ctx", type=int, default=8192, help="context size of both engines")
    p.add_argument("--kv-dtype", default="float16", help="skvrt dense KV dtype")
    p.add_argument("--skvrt-policy", action="append", default=None,
                   help="skvrt KV policy NAME[:key=value,...] (repeatable; default: full), e.g. ada:tier=192")
    p.add_argument("--llama-extra-bufts", action="store_true",
                   help="let llama.cpp repack weights into extra buffer types (AMX / repack); off by default "
                        "because its AMX Q4_1 kernel segfaults on this machine")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument("--skip-skvrt", action="store_true")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--from-json", default=None,
                   help="only render the report from --json files of earlier (maybe partial) runs; several files, "
                        "comma-separated, are merged (later files win)")
    p.add_argument("--worker", choices=["skvrt", "llama"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.skvrt_policy = a.skvrt_policy or ["full"]

    if a.worker:
        spec = json.loads(Path(a.spec).read_text())
        out = worker_llama(spec) if a.worker == "llama" else worker_skvrt(spec)
        Path(a.result).write_text(json.dumps(out))
        return 0

    if a.from_json:
        text = report(merge([json.loads(Path(f).read_text()) for f in a.from_json.split(",") if f]))
        if a.out:
            Path(a.out).write_text(text)
        else:
            sys.stdout.write(text)
        return 0

    from skvrt.bench import bench_meta, blas_threads, synthetic_prompt
    from skvrt.store import default_gguf_path, resolve
    from skvrt.threads import default_threads, set_threads
    from skvrt.tokenizer import Tokenizer

    contexts = [int(x) for x in a.contexts.split(",") if x.strip()]
    kvs = [k for k in a.llama_kv.split(",") if k]
    for k in kvs:
        if k not in LLAMA_KV:
            p.error(f"unknown --llama-kv {k!r}; known: {', '.join(LLAMA_KV)}")
    threads = a.threads or default_threads()
    set_threads(threads)
    folder = resolve(a.model)
    gguf = a.gguf or str(default_gguf_path())
    tok = Tokenizer(folder)
    prompts = {n: synthetic_prompt(tok, n) for n in contexts}
    if max(contexts) + a.n_decode > a.n_ctx:
        p.error(f"the largest context + n-decode exceeds --n-ctx {a.n_ctx}")

    meta = bench_meta()
    meta.update({
        "command": "python bench/llamacpp_compare.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
        "threads": threads, "skvrt_model": str(folder), "gguf": gguf, "n_ctx": a.n_ctx,
        "skvrt_kv_dtype": a.kv_dtype, "n_decode": a.n_decode, "repeats": a.repeats,
        "skvrt_blas_threads": blas_threads(),
    })
    meta["loadavg_start"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if os.environ.get("OPENBLAS_NUM_THREADS") is None:
        meta["OPENBLAS_NUM_THREADS"] = "unset"
    res = {"meta": meta, "contexts": contexts, "llama_kv": kvs, "skvrt": {}, "llama": {}, "errors": {},
           "prompt_ids_head": {str(n): prompts[n][:16] for n in contexts}}

    def save():
        if a.json_out:
            Path(a.json_out).write_text(json.dumps(res, indent=2))

    res["skvrt_policies"] = {pol: {} for pol in a.skvrt_policy}
    for pol in ([] if a.skip_skvrt else a.skvrt_policy):
        for n in contexts:
            log(f"skvrt {pol}: context {n}, {a.repeats} runs")
            spec = {"model": str(folder), "ids": prompts[n], "n_ctx": a.n_ctx, "kv_dtype": a.kv_dtype,
                    "threads": threads, "n_decode": a.n_decode, "repeats": a.repeats, "policy": pol}
            try:
                out = run_worker(sys.executable, "skvrt", spec, a.timeout)
            except RuntimeError as e:
                log(str(e))
                res["errors"][f"skvrt/{pol}/{n}"] = "failed"
                continue
            row = out["row"]
            res["skvrt_policies"][pol][str(n)] = row
            if pol == a.skvrt_policy[0]:
                res["skvrt"][str(n)] = row
            meta["skvrt_blas_threads"] = row["blas_threads"]
            meta["skvrt_decode_attention"] = row.get("decode_attention", "?")
            log(f"skvrt: context {n}: prefill {row['prefill_tps']['median']:.1f} tok/s, decode "
                f"{row['decode_tps']['median']:.1f} tok/s, peak RSS {row['peak_rss_mb']:.0f} MiB")
            save()

    if not a.skip_llama:
        for kv in kvs:
            res["llama"][kv] = {}
            for n in contexts:
                runs = []
                for r in range(a.repeats):
                    log(f"llama.cpp {kv}: context {n}, run {r + 1}/{a.repeats}")
                    spec = {"gguf": gguf, "ids": prompts[n], "n_ctx": a.n_ctx, "threads": threads,
                            "n_decode": a.n_decode, "kv": kv, "extra_bufts": a.llama_extra_bufts}
                    try:
                        runs.append(run_worker(a.llama_python, "llama", spec, a.timeout))
                    except (RuntimeError, OSError) as e:
                        log(str(e))
                        res["errors"][f"{kv}/{n}"] = "failed: " + str(e).splitlines()[0]
                        break
                if not runs:
                    continue
                first = runs[0]
                meta["llama_cpp_version"] = first["llama_cpp_version"]
                meta["llama_system_info"] = first["system_info"]
                meta["llama_n_batch"] = first["n_batch"]
                meta["llama_extra_bufts"] = first["extra_bufts"]
                steps = [s * 1e3 for run in runs for s in run["step_s"]]
                res["llama"][kv][str(n)] = {
                    "runs": len(runs),
                    "prefill_tps": _summary([n / run["prefill_s"] for run in runs]),
                    "decode_tps": _summary([len(run["step_s"]) / sum(run["step_s"]) for run in runs])
                    if a.n_decode else None,
                    "decode_ms_per_step": _summary(steps) if steps else None,
                    "peak_rss_mb": _summary([run["peak_rss_mb"] for run in runs]),
                    "kv_bytes_per_token": first["kv_bytes_per_token"],
                    "tokens": first["tokens"],
                    "cpu_share": statistics.median([run["cpu_share"] for run in runs])
                    if all("cpu_share" in run for run in runs) else None,
                }
                L = res["llama"][kv][str(n)]
                log(f"llama.cpp {kv}: context {n}: prefill {L['prefill_tps']['median']:.1f} tok/s, decode "
                    f"{(L['decode_tps'] or {}).get('median', 0):.1f} tok/s")
                save()

    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    text = report(res)
    save()
    if a.out:
        Path(a.out).write_text(text)
        log(f"wrote {a.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
