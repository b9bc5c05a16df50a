"""The GPU suite: `python -m skvrt.selftest --gpu` on a machine with an NVIDIA GPU (one command, < 8 min on
one H200), `--dry-run` anywhere (the same code paths on the CPU CUDA emulator at small sizes; CI runs it).

    python -m skvrt.selftest --gpu [--no-bench] [--contexts 8192,32768,131072] [--steps 20]
    python -m skvrt.selftest --dry-run

1. Parity. Every check of skvrt.cuda.checks.SUITE (each kernel vs its NumPy twin on random inputs: RMSNorm,
   RoPE, SwiGLU, dense KV append, ADA encode, dense / ADA decode attention) on the device; with --gpu also
   larger, model-shaped cases (GPU_EXTRA), and emulator vs GPU on the SUITE's inputs (when g++ is there:
   the kernel run by the emulator on the CPU must agree with the kernel run by the GPU). Then the model end to
   end (skvrt/cuda/e2e.py): logits of the GPU path vs the CPU model on the default model (full float16, eager
   and through CUDA graphs; ada with float32 weights) and on two tiny random llamas; a default-model case
   whose model is not in the store is SKIPped (said, not counted). Prints one line per check, then
   `N passed, N failed`.
2. Benchmark of decode attention, the kernels alone: Llama-3-8B-shaped KV (32 layers, 8 KV heads, 32 query
   heads, head_dim 128), random-initialised pages laid out as the frame arena lays them out, pages scattered
   over the arena; for `full` (dense float16 pages), `ada` (the ADA tier of `--kv-policy ada`'s defaults:
   192 key bits, 4-bit values in groups of 32, after 4 sinks + a 64-token dense window) and `spherical-mix`
   (the ADA tiers of the default RDR ladder, 256:4 / 192:2 with value groups of 64, old tokens split
   evenly over the two -- a fixed mix, not RDR's choice; no old token kept dense), at each context. One
   decode step = the 32 layers' split-K partial + combine kernels, captured in a CUDA graph and replayed
   (eager launches if capture fails, said in the table). Achieved HBM bandwidth = bytes the kernels must read (page payloads: keys / codes, values,
   scales, frames; not the tables) / time.
3. Benchmark of the whole model's decode (bench_model): Llama-3-8B-shaped random float16 weights (made on the
   device), batch 1, a synthetic KV cache of each context laid out as `full` / `ada` hold it, each timed step
   the real decode step (skvrt/cuda/graph.py DecodeStep: host page plan, CUDA graph replay, logits to the
   host, window moves): ms / step, tok/s, achieved HBM GB/s = (weights + KV bytes read) / time. `spherical`
   is not measured end to end (no device RDR allocator; said under the table).
Time on one H200 (an estimate, the suite has not run on a GPU yet): parity ~1-2 min (NVRTC compiles, the
emulator comparisons, the default model's CPU reference), attention table ~1 min, model table ~2-3 min (three
contexts x two policies, each: synthetic cache of up to 17 GB, one graph capture, 22 steps) -- under 8 min.
Peak device memory ~35 GB (16 GB of weights with the embedding + the `full` 128K cache, 17 GB).
Exit status: 0 when every check passed, 1 when one failed, 2 when the device is unusable ("no GPU: <why>").
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import traceback

import numpy as np

# GPU only: model-shaped parity cases (8B-like heads), twins on the host CPU (a few seconds each)
GPU_EXTRA = [
    ("rms_norm 8B T=64 n=4096", "check_rms_norm", dict(T=64, n=4096, residual=True)),
    ("rope 8B T=128 32q/8kv D=128", "check_rope", dict(T=128, nq=32, nkv=8, D=128)),
    ("swiglu 8B T=16 F=14336", "check_swiglu", dict(T=16, F=14336)),
    ("dense_append 8B H=8 D=128 P=64 T=300", "check_dense_append", dict(H=8, D=128, P=64, n_prev=100, T=300, nq=32)),
    ("ada_encode 8B H=8 D=128 P=64 192b", "check_ada_encode", dict(H=8, D=128, P=64, key_bits=192, vb=4, vg=32, n_jobs=64)),
    ("dense_decode 8B H=8 G=4 T=3000", "check_decode", dict(H=8, G=4, D=128, P=64, T=3000, key_bits=None, pages_per_split=4)),
    ("ada_decode 8B H=8 G=4 T=3000 192b", "check_decode", dict(H=8, G=4, D=128, P=64, T=3000, key_bits=192, vb=4, vg=32, pages_per_split=4)),
    ("prefill 8B H=8 G=4 D=128 ctx=3000 chunk=256", "check_prefill", dict(H=8, G=4, D=128, P=64, n_ctx=3000, T=256)),
    ("prefill 8B H=8 G=4 ctx=3000 chunk=256 192b", "check_prefill", dict(H=8, G=4, D=128, P=64, n_ctx=3000, T=256, key_bits=192, vb=4, vg=32)),
]


# ---- parity -------------------------------------------------------------------------------------------------

def run_checks(module, xp, emu_module=None, extra: bool = False, out=None) -> tuple[int, int]:
    from .cuda import checks

    out = out or sys.stdout

    passed = failed = 0
    cases = [(n, fn, kw) for n, fn, kw in checks.SUITE]
    if extra:
        cases += [(n, getattr(checks, fn), kw) for n, fn, kw in GPU_EXTRA]
    for i, (name, fn, kw) in enumerate(cases):
        t0 = time.perf_counter()
        try:
            stats, got = fn(module, xp, np.random.default_rng(1000 + i), **kw)
            line = f"PASS  {name}  " + " ".join(f"{k}={_fmt(v)}" for k, v in stats.items())
            passed += 1
        except Exception as e:  # an assertion, a launch error, a compile error: report and go on
            got = None
            line = f"FAIL  {name}  {type(e).__name__}: {_first_lines(str(e))}"
            failed += 1
            if not isinstance(e, AssertionError):
                traceback.print_exc(file=sys.stderr)
        print(f"{line}  ({time.perf_counter() - t0:.1f} s)", file=out, flush=True)
        if emu_module is not None and got is not None and i < len(checks.SUITE):
            ok, msg = _emu_vs_device(emu_module, fn, kw, i, got)
            passed, failed = passed + ok, failed + (not ok)
            print(f"{'PASS' if ok else 'FAIL'}  emulator vs GPU: {name}  {msg}", file=out, flush=True)
    return passed, failed


def _emu_vs_device(emu_module, fn, kw, i, got_device) -> tuple[bool, str]:
    """The same check with the same inputs on the emulator (numpy); its raw output vs the GPU's."""
    try:
        _, got_emu = fn(emu_module, np, np.random.default_rng(1000 + i), **kw)
    except Exception as e:
        return False, f"emulator run failed: {type(e).__name__}: {_first_lines(str(e))}"
    a, b = np.asarray(got_device), np.asarray(got_emu)
    if a.dtype == np.uint8:  # arena bytes: dense append must match exactly; ADA codes almost always
        frac = float(np.mean(a == b))
        exact = fn.__name__ == "check_dense_append"
        ok = frac == 1.0 if exact else frac >= 0.99
        return ok, f"{frac:.4%} of arena bytes equal"
    err = float(np.max(np.abs(a - b) / (np.abs(b) + 1e-3)))
    return err < 1e-4, f"max rel diff {err:.1e}"


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _first_lines(s: str, n: int = 3) -> str:
    return " | ".join(x.strip() for x in s.strip().splitlines()[:n] if x.strip())


# ---- benchmark --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Shape:
    layers: int = 32
    kv_heads: int = 8
    q_heads: int = 32
    head_dim: int = 128
    page: int = 64      # tokens per page of the richest old tier (PAGE_SIZE)
    sinks: int = 4
    window: int = 64    # the ada policy's default dense window (budgeted policies: 32)


LLAMA3_8B = Shape()
TINY = Shape(layers=2, kv_heads=2, q_heads=8, head_dim=64, page=16, sinks=2, window=16)


def _tiers(config: str, shape: Shape, rng) -> tuple[list, list[int], int, list[float]]:
    """-> tiers (DenseTier first), tokens per page of each, frame bytes, share of the old tokens per old tier."""
    from .kv import DEFAULT_LADDER, LADDER_V_GROUP, layout
    from .kv.ada import AdaTier, allocate_bits
    from .kv.tiers import DenseTier

    D, P = shape.head_dim, shape.page
    dense = DenseTier("float16")
    if config == "full":
        return [dense], [P], layout.page_bytes(dense, P, D, False), []
    w = rng.uniform(0.1, 2, (1, shape.kv_heads, D // 2))  # like a calibration's pair weights
    if config == "ada":
        old = [AdaTier(allocate_bits(w, 192), 4, 32)]
        mass = False
    else:
        old = [AdaTier(allocate_bits(w, kb), vb, LADDER_V_GROUP) for kb, vb in DEFAULT_LADDER]
        mass = True  # RDR pages carry the slot mass field
    pd = "int16" if mass else "int32"  # layout.position_dtype of a budgeted cache at a context below 32K
    frame = max(layout.page_bytes(t, P, D, mass, pd) for t in old)
    sizes = [layout.tokens_per_frame(t, frame, D, mass, pd) for t in [dense, *old]]
    if config == "ada":
        sizes[1] = P  # fifo: old-tier pages hold exactly P
    return [dense, *old], sizes, frame, [1.0 / len(old)] * len(old)


def _read_bytes(tier, n: int, p: int, D: int) -> int:
    """Bytes the decode kernels read for n tokens in p pages of `tier` (one KV head): page payloads only."""
    from .kv.tiers import DenseTier

    if isinstance(tier, DenseTier):
        return n * D * 2 * 2  # k, v float16
    ng = D // tier.v_group
    per_token = tier.key_bits // 8 + D * tier.v_bits // 8 + ng * 2 * 2  # codes, value codes, v_min / v_scale
    return n * per_token + p * (D // 2) * 4 * 2  # + one frame (D/2 x 4 float16) per page


def _strided(xp, buf, off: int, shape, dtype, strides):
    if xp is np:
        return np.ndarray(shape, dtype, buf, off, strides)
    return xp.ndarray(shape, dtype, buf.data + off, strides)


def _fill_random(xp, a, kind: str, chunk: int = 2048) -> None:
    """Random contents for a field (N, ...) in chunks of pages (bounded temporaries)."""
    for s in range(0, a.shape[0], chunk):
        sub = a[s : s + chunk]
        if a.dtype == np.uint8:
            sub[...] = xp.random.randint(0, 256, sub.shape).astype(np.uint8)
            continue
        u = xp.random.randint(0, 4096, sub.shape).astype(np.float32) / 4096  # [0, 1)
        if kind == "frame":  # theta0, gamma, rho0, drho
            u = u * xp.asarray(np.array([2 * np.pi, 0.05, 2.0, 0.05], np.float32)) + \
                xp.asarray(np.array([-np.pi, 0.0, 0.3, 0.0], np.float32))
        elif kind == "v_scale":
            u = u * 0.05
        elif kind in ("k", "v", "v_min"):
            u = u * 2 - 1
        sub[...] = u.astype(a.dtype)


class _Timer:
    def __init__(self, xp):
        self.xp = xp

    def measure(self, step, reps: int) -> tuple[float, str]:
        """-> (seconds per step, how it was run)."""
        xp = self.xp
        if xp is np:
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            return (time.perf_counter() - t0) / reps, "emulated"
        import cupy

        step()  # warm: modules compiled and loaded, smem attributes set
        cupy.cuda.Device().synchronize()
        stream = cupy.cuda.Stream(non_blocking=True)
        mode, graph = "graph", None
        try:
            with stream:
                stream.begin_capture()
                try:
                    step()
                finally:
                    graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
        except Exception as e:  # capture unsupported here: eager launches (Python launch cost included)
            print(f"  (CUDA graph capture failed, timing eager launches: {type(e).__name__}: {e})", file=sys.stderr)
            mode, graph = "eager", None
        run = (lambda: graph.launch(stream)) if graph is not None else step
        with stream:
            for _ in range(2):
                run()
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            for _ in range(reps):
                run()
            end.record(stream)
            end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3 / reps, mode


def bench_attention(module, xp, shape: Shape, contexts: list[int], configs=("full", "ada", "spherical-mix"),
                    steps: int = 20, seed: int = 0, out=None) -> list[dict]:
    """Decode-attention step time (all layers) per (config, context); prints a markdown table."""
    out = out or sys.stdout
    from .cuda import attention as ca
    from .kv import layout
    from .kv.ada import AdaTier

    rng = np.random.default_rng(seed)
    xp.random.seed(seed)
    L, H, D = shape.layers, shape.kv_heads, shape.head_dim
    G = shape.q_heads // H
    timer = _Timer(xp)
    rows = []
    print(f"\nDecode attention, kernels alone: {L} layers x {H} KV heads, {shape.q_heads} query heads, head_dim {D},"
          f" batch 1 (one step = {L} x (partial + combine) launches)", file=out)
    print("| config | context | pages / head (per tier) | KV bytes read / step | ms / step | GB/s | run |", file=out)
    print("|---|---|---|---|---|---|---|", file=out)
    for ctx in contexts:
        for config in configs:
            tiers, sizes, frame, shares = _tiers("full" if config == "full" else
                                                 "ada" if config == "ada" else "spherical", shape, rng)
            n_dense_tok = ctx if config == "full" else min(ctx, shape.sinks + shape.window)
            old = ctx - n_dense_tok
            tok = [n_dense_tok] + [0] * len(shares)
            for i, s in enumerate(shares):  # old tokens split over the old tiers (last one takes the rest)
                tok[1 + i] = old - sum(tok[1:1 + i]) if i == len(shares) - 1 else int(old * s)
            pages = [math.ceil(n / sz) if n else 0 for n, sz in zip(tok, sizes)]
            per_head = sum(pages)
            N = L * H * per_head
            track = config == "spherical-mix"
            buf = xp.zeros(N * frame, np.uint8)
            fill_h = np.zeros(N, np.int32)
            ids = np.empty((L, H, per_head), np.int32)
            tiers_t = np.empty((L, H, per_head), np.int8)
            lo = 0
            pools = []
            for ti, (tier, P, n, p) in enumerate(zip(tiers, sizes, tok, pages)):
                # tier ti owns frames [lo, lo + L H p), handed to the (layer, head) tables in random order
                hi = lo + L * H * p
                own = (lo + rng.permutation(L * H * p)).reshape(L, H, p) if p else np.zeros((L, H, 0), np.int64)
                c0 = sum(pages[:ti])
                ids[..., c0 : c0 + p] = own
                tiers_t[..., c0 : c0 + p] = ti
                if p:
                    fill_h[own.ravel()] = P
                    fill_h[own[..., -1].ravel()] = n - (p - 1) * P  # the last page of each head is partial
                pf = layout.page_fields(tier, P, D, track, "int16" if track else "int32")
                offs, _ = layout.layout(pf, P)
                fields = {}
                for name, dt, shp in pf:
                    dt = np.dtype(dt)
                    inner = tuple(int(np.prod(shp[i + 1:], dtype=np.int64)) * dt.itemsize for i in range(len(shp)))
                    fields[name] = _strided(xp, buf, offs[name], (N, *shp), dt, (frame, *inner))
                    if name not in ("positions", "mass") and p:
                        _fill_random(xp, fields[name][lo:hi], name)
                pools.append(fields)
                lo = hi
            fill = xp.asarray(fill_h)
            q = xp.asarray(rng.normal(0, 1, (H * G, D)).astype(np.float32))
            outs, launches = [], []
            for layer in range(L):
                o = xp.empty((H * G, D), np.float32)
                idd = xp.asarray(np.ascontiguousarray(ids[layer]))
                n_p = xp.asarray(np.full(H, per_head, np.int32))
                if config == "full":
                    launches.append(ca.prepare_dense_decode(module, xp, q, pools[0]["k"], pools[0]["v"], fill, idd,
                                                            n_p, D ** -0.5, o))
                else:
                    tl = []
                    for tier, f in zip(tiers, pools):
                        if isinstance(tier, AdaTier):
                            ba, br = tier.widths_at(0)
                            tl.append(ca.ada_tier(xp, f, ba, br, tier.v_bits, tier.v_group))
                        else:
                            tl.append(ca.dense_tier(xp, f["k"], f["v"]))
                    launches.append(ca.prepare_ada_decode(module, xp, q, tl, fill, idd,
                                                          xp.asarray(np.ascontiguousarray(tiers_t[layer])), n_p,
                                                          D ** -0.5, o))
                outs.append(o)

            def step():
                for launch in launches:
                    launch()

            sec, mode = timer.measure(step, steps)
            for o in outs[:1]:
                assert bool(xp.isfinite(o).all()), f"{config} {ctx}: non-finite attention output"
            nbytes = L * H * sum(_read_bytes(t, n, p, D) for t, n, p in zip(tiers, tok, pages))
            row = {"config": config, "context": ctx, "pages": pages, "bytes": nbytes, "ms": sec * 1e3,
                   "gbs": nbytes / sec / 1e9, "mode": mode}
            rows.append(row)
            print(f"| {config} | {ctx} | {per_head} ({'/'.join(map(str, pages))}) | {nbytes / 2**20:,.1f} MiB | "
                  f"{sec * 1e3:.3f} | {row['gbs']:,.0f} | {mode} |", file=out, flush=True)
            del buf, pools, launches, outs, fill, q
            if xp is not np:
                xp.get_default_memory_pool().free_all_blocks()
    return rows


# ---- end-to-end model parity -----------------------------------------------------------------------------

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a wooden screw press. Within fifty years, presses had spread to "
          "more than two hundred cities, and the price of books fell sharply. Scholars could now compare identical "
          "copies of a text, which changed how knowledge was checked and shared. ")


def _model_cases(gpu: bool) -> list[tuple[str, dict]]:
    """(name, e2e.run_pair options): the default model (full float16 with and without CUDA graphs, ada with
    float32 weights -- e2e's module docstring says why), then tiny random llamas of the other shapes."""
    n, dec, chunk = (200, 16, 64) if gpu else (21, 4, 11)
    ada = dict(kv_policy="ada", sinks=4, window=64, page_size=64) if gpu else \
        dict(kv_policy="ada", sinks=2, window=4, page_size=16)
    return [
        (f"model e2e default full fp16 CUDA graphs ({n - dec} prompt + {dec} decode)",
         dict(model="default", n=n, n_decode=dec, chunk=chunk, weight_dtype="float16", graphs=True)),
        ("model e2e default full fp16 eager", dict(model="default", n=n, n_decode=dec, chunk=chunk,
                                                    weight_dtype="float16")),
        ("model e2e default ada fp32 CUDA graphs", dict(model="default", n=n, n_decode=dec, chunk=chunk,
                                                        weight_dtype="float32", graphs=True, **ada)),
        ("model e2e tiny GQA 8:1 D=128 full fp16", dict(model="gqa8_d128", n=60, n_decode=10, chunk=19,
                                                         weight_dtype="float16", page_size=16)),
        ("model e2e tiny GQA 3:1 D=64 ada fp32 CUDA graphs", dict(model="gqa3", n=60, n_decode=10, chunk=19,
                                                                    weight_dtype="float32", graphs=True,
                                                                    kv_policy="ada", sinks=4, window=16, tier=128,
                                                                    page_size=16)),
    ]


def run_model_checks(module, xp, gpu: bool, out=None) -> tuple[int, int, int]:
    """End-to-end logits, GPU path vs the CPU model (skvrt.cuda.e2e) -> (passed, failed, skipped)."""
    from .cuda import e2e

    out = out or sys.stdout
    passed = failed = skipped = 0
    default = None
    for name, kw in _model_cases(gpu):
        kw = dict(kw)
        t0 = time.perf_counter()
        which, n = kw.pop("model"), kw.pop("n")
        try:
            if which == "default":
                if default is None:
                    default = _load_default()
                model = default.model
                ids = np.array(default.tokenizer.encode(PROMPT * 4)[:n], np.int64)
                if kw.get("kv_policy") == "ada" and model.args.kv_calibration is None:
                    raise _Skip("the default model has no calibration sidecar (skvrt calibrate)")
            else:
                model = e2e.tiny_model(which)
                ids = np.random.default_rng(1).integers(0, model.args.vocab_size, n)
            if len(ids) < n:
                raise _Skip(f"the prompt has {len(ids)} tokens, not {n}")
            info = {}
            a, b = e2e.run_pair(model, module, xp, ids, info=info, **kw)
            stats = e2e.compare(a, b, kw["weight_dtype"], kw.get("kv_policy", "full"))
            if kw.get("graphs") and xp is not np:
                if info.get("capture_error") is not None:
                    err = info["capture_error"]
                    raise AssertionError(f"CUDA graph capture failed: {type(err).__name__}: {err}")
                stats["graphs"] = info.get("graph_captures", 0)
            line = f"PASS  {name}  " + " ".join(f"{k}={_fmt(v)}" for k, v in stats.items())
            passed += 1
        except _Skip as e:
            line = f"SKIP  {name}  {e}"
            skipped += 1
        except Exception as e:
            line = f"FAIL  {name}  {type(e).__name__}: {_first_lines(str(e))}"
            failed += 1
            if not isinstance(e, AssertionError):
                traceback.print_exc(file=sys.stderr)
        print(f"{line}  ({time.perf_counter() - t0:.1f} s)", file=out, flush=True)
    return passed, failed, skipped


class _Skip(Exception):
    pass


def _load_default():
    """The default model (skvrt.store.resolve(None): the store's folder, pulled when missing)."""
    from .errors import SkvrtError
    from .loader import load_folder
    from .store import resolve

    try:
        return load_folder(resolve(None))
    except (SkvrtError, OSError) as e:
        raise _Skip(f"default model unavailable: {_first_lines(str(e), 1)}") from None


# ---- model decode benchmark ---------------------------------------------------------------------------

LLAMA3_8B_MODEL = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  intermediate_size=256, vocab_size=512, rope_theta=10000.0, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)


def random_model(module, xp, config: dict, seed: int = 0):
    """A llama of `config` with random float16 weights made on the device (N(0, 1 / fan_in)), norms 1."""
    from .cuda.model_ops import CudaOps
    from .models import llama

    args = llama.ModelArgs.from_config(config)
    ops = CudaOps(module, xp, "float16")
    xp.random.seed(seed)
    host_rng = np.random.default_rng(seed)
    randn = (lambda shape: host_rng.standard_normal(shape, dtype=np.float32)) if xp is np else \
        (lambda shape: xp.random.standard_normal(shape, dtype=np.float32))
    Hd, F, D = args.hidden_size, args.intermediate_size, args.head_dim
    nq, nkv = args.num_attention_heads, args.num_key_value_heads

    def mat(n_out, n_in):
        w = xp.empty((n_out, n_in), np.float16)
        for s in range(0, n_out, 4096):  # bounded float32 temporaries
            w[s : s + 4096] = (randn((min(4096, n_out - s), n_in)) * np.float32(n_in ** -0.5)).astype(np.float16)
        return ops.device_matrix(w)

    ones = ops.vector(np.ones(Hd, np.float32))
    layers = [llama.Layer.from_arrays(wqkv=mat((nq + 2 * nkv) * D, Hd), wo=mat(Hd, nq * D), wgu=mat(2 * F, Hd),
                                      wdown=mat(Hd, F), input_norm=ones, post_norm=ones)
              for _ in range(args.num_hidden_layers)]
    return llama.Model.from_arrays(args, ops, mat(args.vocab_size, Hd), layers, ones, mat(args.vocab_size, Hd))


def synthetic_cache(module, xp, args, policy: str, ctx: int, n_ctx: int, rng):
    """A DeviceKVCache holding `ctx` tokens of random K / V laid out as the policy's cache would hold them
    (full: every token in dense pages; ada: sinks + the window dense, the older tokens in ADA pages of 192 key
    bits / 4-bit values), pages allocated through the host bookkeeping as appends would, without a prefill."""
    from .calibrate import Calibration
    from .cuda.cache import DeviceKVCache
    from .kv import make_policy
    from .kv.cache import DENSE, OLD, PagedKVCache

    L, H, D = args.num_hidden_layers, args.num_key_value_heads, args.head_dim
    if policy == "full":
        pol = make_policy("full")
    else:
        cal = Calibration(*(rng.uniform(0.1, 2, (L, H, D)).astype(np.float32) for _ in range(2)), {})
        pol = make_policy("ada", calibration=cal, tier=192, v_bits=4, v_group=32)
    host = PagedKVCache(L, H, D, n_ctx, policy=pol)
    n_old = 0 if pol.keep_all else max(0, (ctx - pol.window - pol.sinks) // host.batch * host.batch)
    dense_pos = np.concatenate([np.arange(min(ctx, pol.sinks if n_old else ctx)), np.arange(pol.sinks + n_old, ctx)]) \
        if n_old else np.arange(ctx)
    old_pos = np.arange(pol.sinks, pol.sinks + n_old)
    ranges = []
    for ti, pos in ((DENSE, dense_pos), (OLD, old_pos)):  # every page of a tier in one run of frames
        if not len(pos):
            continue
        pool = host.pools[ti]
        P = pool.page_size
        lo = None
        for layer in range(L):
            for h in range(H):
                for s0 in range(0, len(pos), P):
                    pid = pool.alloc()
                    lo = pid if lo is None else lo
                    host.table.push(layer, h, pid, ti)
                    n = min(P, len(pos) - s0)
                    pool.positions[pid, :n] = pos[s0 : s0 + n]
                    pool.fill[pid] = n
        ranges.append((ti, lo, pid + 1))
    host.offset, host.n_old = ctx, n_old
    dev = DeviceKVCache(host, module, xp)
    for ti, lo, hi in ranges:
        for name, a in dev.fields[ti].items():
            if name == "positions":
                a[lo:hi] = xp.asarray(host.pools[ti].positions[lo:hi])
            elif name != "mass":
                _fill_random(xp, a[lo:hi], name)
    dev._sync_fill()
    dev._dirty.update(range(L))
    return dev, [(host.pools[ti].tier, len(p), -(-len(p) // host.pools[ti].page_size))
                 for ti, p in ((DENSE, dense_pos), (OLD, old_pos)) if len(p)]


def bench_model(module, xp, config: dict, contexts: list[int], policies=("full", "ada"), steps: int = 20,
                seed: int = 0, out=None) -> list[dict]:
    """Decode tok/s of a whole model (random weights, batch 1) at each context with a synthetic KV cache; every
    step is the real decode step (skvrt/cuda/graph.py DecodeStep: CUDA graph replay on a GPU, host bookkeeping,
    logits to the host). Prints a markdown table."""
    from .cuda.graph import DecodeStep

    out = out or sys.stdout
    rng = np.random.default_rng(seed)
    model = random_model(module, xp, config, seed)
    a = model.args
    L, H, D = a.num_hidden_layers, a.num_key_value_heads, a.head_dim
    w_bytes = sum(int(getattr(layer, n).w.nbytes) for layer in model.layers for n in ("wqkv", "wo", "wgu", "wdown"))
    w_bytes += int(model.lm_head.w.nbytes) + a.hidden_size * 2  # + the one embedding row read
    print(f"\nModel decode, whole model: {L} layers, hidden {a.hidden_size}, {a.num_attention_heads} query / {H} KV "
          f"heads, head_dim {D}, vocab {a.vocab_size}, random float16 weights ({w_bytes / 1e9:.2f} GB read per "
          f"step), batch 1, {steps} timed steps after 2 warm-up steps (the first captures the CUDA graph)", file=out)
    print("| policy | context | ms / step | tok/s | weights + KV read / step | GB/s | run |", file=out)
    print("|---|---|---|---|---|---|---|", file=out)
    rows = []
    for ctx in contexts:
        for policy in policies:
            cache, held = synthetic_cache(module, xp, a, policy, ctx, ctx + steps + 8, rng)
            kv_bytes = L * H * sum(_read_bytes(t, n, p, D) for t, n, p in held)
            mode = "graph" if xp is not np else "emulated"
            step = DecodeStep(model, cache, use_graph=xp is not np)
            toks = rng.integers(0, a.vocab_size, steps + 2)
            logits = step(int(toks[0]))  # warm-up, then capture (on failure: eager steps, said on stderr)
            if step.capture_error is not None:
                mode = "eager (capture failed)"
            assert logits.shape == (a.vocab_size,)
            step(int(toks[1]))
            t0 = time.perf_counter()
            for t in toks[2:]:
                logits = step(int(t))
            sec = (time.perf_counter() - t0) / steps
            nbytes = w_bytes + kv_bytes
            row = {"policy": policy, "context": ctx, "ms": sec * 1e3, "tok_s": 1 / sec, "bytes": nbytes,
                   "gbs": nbytes / sec / 1e9, "mode": mode, "finite": bool(np.isfinite(logits).all())}
            rows.append(row)
            print(f"| {policy} | {ctx} | {sec * 1e3:.2f} | {1 / sec:,.1f} | {w_bytes / 1e9:.2f} + {kv_bytes / 1e9:.2f} "
                  f"GB | {row['gbs']:,.0f} | {mode} |", file=out, flush=True)
            del step, cache
            if xp is not np:
                xp.get_default_memory_pool().free_all_blocks()
    print("spherical: not measured end to end -- its RDR allocator has no device implementation (DeviceKVCache "
          "runs full / window / ada); the attention table above has a fixed spherical tier mix", file=out)
    return rows


# ---- entry point ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skvrt.selftest", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true", help="run the suite on the GPU (CuPy RawModule)")
    mode.add_argument("--dry-run", "--emulate", dest="dry_run", action="store_true",
                      help="run the same checks and benchmark code on the CPU CUDA emulator, small sizes")
    ap.add_argument("--no-bench", action="store_true", help="parity checks only")
    ap.add_argument("--contexts", default=None, help="benchmark contexts (default 8192,32768,131072; dry run 40,300)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per row (default 20; dry run 1)")
    a = ap.parse_args(argv)

    if a.gpu:
        from .backend import cuda_info, cuda_unavailable_reason

        why = cuda_unavailable_reason()
        if why is not None:
            print(f"skvrt selftest: no GPU: {why}", file=sys.stderr)
            return 2
        import cupy

        from .cuda import emu
        from .cuda.loader import cupy_module

        xp, module, shape = cupy, cupy_module, LLAMA3_8B
        emu_module = emu.factory("random", seed=1) if emu.compiler() else None
        print(f"skvrt selftest --gpu: {cuda_info()}")
        if emu_module is None:
            print("  (no g++: emulator-vs-GPU comparisons skipped)")
        contexts, steps = a.contexts or "8192,32768,131072", a.steps or 20
    else:
        from .cuda import emu

        if emu.compiler() is None:
            print("skvrt selftest: no g++ for the CUDA emulator", file=sys.stderr)
            return 2
        xp, module, shape, emu_module = np, emu.factory("random", seed=1), TINY, None
        print("skvrt selftest --dry-run: the CUDA emulator on the CPU (small sizes; timings are not GPU figures)")
        contexts, steps = a.contexts or "40,300", a.steps or 1
    t0 = time.perf_counter()
    passed, failed = run_checks(module, xp, emu_module, extra=a.gpu)
    p2, f2, skipped = run_model_checks(module, xp, gpu=a.gpu)
    passed, failed = passed + p2, failed + f2
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else "") +
          f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not a.no_bench:
        ctx_list = [int(c) for c in contexts.split(",") if c]
        for bench in (lambda: bench_attention(module, xp, shape, ctx_list, steps=steps),
                      lambda: bench_model(module, xp, LLAMA3_8B_MODEL if a.gpu else TINY_MODEL, ctx_list,
                                          steps=steps)):
            try:
                bench()
            except Exception as e:
                traceback.print_exc()
                print(f"benchmark failed: {type(e).__name__}: {e}")
                failed += 1
    print(f"selftest done in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
