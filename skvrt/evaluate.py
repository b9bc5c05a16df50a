"""Quality evaluation of KV policies (DESIGN.md section 6): teacher-forced KL / perplexity against a dense fp32
cache, and passkey retrieval.

KL protocol, per window of N tokens (N = `window`, E = `eval_tokens`):

    cache = make_cache(args, n_ctx=N, kv_policy, kv_dtype, **policy_opts)
    prefill(tokens[0 : N-E])                       # chunked, exactly as generation prefills a prompt
    for j in 0 .. E-1:                              # E decode steps, teacher forced (the real decode path:
        logits = model.forward([tokens[N-E+j]], cache)   #  one token on the compressed cache)
        scored: log_softmax(logits) predicting tokens[N-E+j+1]

So every scored distribution comes from a decode step, and the target of the last step is the token after the
window: a window needs N + 1 tokens of text, windows are consecutive and do not overlap (window i feeds tokens
[i*N, (i+1)*N) and reads token (i+1)*N as its last target). The reference is the same runtime with policy
`full` and a dense float32 cache, run the same way (`ref_mode="steps"`); `ref_mode="chunk"` computes the same
E distributions with one forward pass (all_logits=True) and is tested equal within 1e-5.

Library API for sweeps (load the model once, compute the reference once, test many policies):

    ev = KLEvaluator(model, tokens, window=2048, eval_tokens=256, max_windows=8,
                     ref_store=ReferenceStore(dir, model_fingerprint(folder)))   # ref_store optional
    report = ev.run("full", "float16")                # or ev.run("ada", "float16", budget=0.25, ...)
    report.summary()  -> {"mean_kl", "p99_kl", "ppl", "ppl_ref", "ppl_ratio", "top1_agreement",
                          "kv_bytes_fraction", "kv_bytes_per_token", ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import InputError
from .generate import PREFILL_CHUNK, generate_step, prefill
from .kv import make_cache
from .ops import log_softmax

# ======================================================================================================
# Text and windows
# ======================================================================================================


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (the eval text); errors name the file and the offending byte."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"text file {p} not found") from None
    except OSError as e:
        raise InputError(f"cannot read {p}: {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def tokenize_text(tokenizer, text: str) -> np.ndarray:
    """The whole text as one token stream (no BOS: the windows are cut from running text)."""
    ids = tokenizer.encode(text, add_bos=False)
    return np.asarray(ids, dtype=np.int64)


def split_windows(tokens: Sequence[int], window: int, eval_tokens: int,
                  max_windows: int | None = None) -> list[np.ndarray]:
    """Consecutive, non-overlapping windows of `window` fed tokens, each returned with the one target token
    after it: arrays of length window + 1 (window i = tokens[i*window : (i+1)*window + 1])."""
    if window < 2:
        raise InputError(f"--window must be >= 2, got {window}")
    if not 1 <= eval_tokens < window:
        raise InputError(f"--eval-tokens must be in 1 .. window-1 ({window - 1}), got {eval_tokens}")
    tokens = np.asarray(tokens, dtype=np.int64)
    n = (len(tokens) - 1) // window
    if max_windows is not None:
        if max_windows < 1:
            raise InputError(f"--max-windows must be >= 1, got {max_windows}")
        n = min(n, max_windows)
    if n < 1:
        raise InputError(f"the text has {len(tokens)} tokens; one window needs {window + 1}")
    return [tokens[i * window : (i + 1) * window + 1] for i in range(n)]


# ======================================================================================================
# The teacher-forced decode path
# ======================================================================================================


def dense_fp16_bytes_per_token(args) -> int:
    """Bytes per token of a plain fp16 K+V cache for this model (all layers, all KV heads), no metadata."""
    return args.num_hidden_layers * args.num_key_value_heads * 2 * args.head_dim * 2


def teacher_forced_steps(model, cache, window_tokens: np.ndarray, eval_tokens: int,
                         prefill_chunk: int = PREFILL_CHUNK) -> Iterator[np.ndarray]:
    """Prefill window_tokens[: N-E] into `cache`, then feed window_tokens[N-E : N] one decode step at a time
    and yield each step's log-probs (V,) float64, predicting window_tokens[N-E+1 : N+1]."""
    N = len(window_tokens) - 1
    E = eval_tokens
    prefill(model, cache, window_tokens[: N - E], prefill_chunk)
    for j in range(E):
        logits = model.forward(window_tokens[N - E + j : N - E + j + 1], cache)[-1]
        yield log_softmax(logits)


def reference_logprobs(model, window_tokens: np.ndarray, eval_tokens: int, mode: str = "steps",
                       prefill_chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """(E, V) float32 log-probs of the reference: policy full, dense float32 cache.

    mode "steps": the decode path (as the tested policy runs); "chunk": one all_logits forward over the last E
    tokens after the same prefill (same numbers up to float32 summation order; tested within 1e-5)."""
    N = len(window_tokens) - 1
    E = eval_tokens
    cache = make_cache(model.args, n_ctx=N, kv_policy="full", kv_dtype="float32")
    if mode == "steps":
        out = np.empty((E, model.args.vocab_size), dtype=np.float32)
        for j, lp in enumerate(teacher_forced_steps(model, cache, window_tokens, E, prefill_chunk)):
            out[j] = lp
        return out
    if mode == "chunk":
        prefill(model, cache, window_tokens[: N - E], prefill_chunk)
        logits = model.forward(window_tokens[N - E : N], cache, all_logits=True)
        return log_softmax(logits).astype(np.float32)
    raise InputError(f"reference mode must be 'steps' or 'chunk', not {mode!r}")


def token_metrics(ref_lp: np.ndarray, test_lp: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per scored position: KL(ref || test) in nats, NLL of the target under test and ref, top-1 agreement.

    ref_lp, test_lp: (T, V) log-probs (any float dtype; computed in float64); targets: (T,) token ids."""
    ref = np.atleast_2d(np.asarray(ref_lp, dtype=np.float64))
    test = np.atleast_2d(np.asarray(test_lp, dtype=np.float64))
    targets = np.atleast_1d(np.asarray(targets, dtype=np.int64))
    kl = np.sum(np.exp(ref) * (ref - test), axis=-1)
    rows = np.arange(len(targets))
    return {
        "kl": np.maximum(kl, 0.0),  # clamp float rounding below zero
        "nll": -test[rows, targets],
        "nll_ref": -ref[rows, targets],
        "top1": ref.argmax(-1) == test.argmax(-1),
    }


# ======================================================================================================
# Reference store on disk
# ======================================================================================================

REF_FORMAT = 1


def model_fingerprint(folder: str | os.PathLike) -> str:
    """Identity of a model folder for the reference store: resolved path, config.json bytes, and the name,
    size and mtime of every weight file (cheap; no hashing of the weights). The calibration sidecar is not a weight
    file: recalibrating leaves the dense references as they are."""
    from .loader import SIDECAR

    folder = Path(folder).resolve()
    h = hashlib.sha256(str(folder).encode())
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for f in sorted(f for f in folder.glob("*.safetensors") if f.name != SIDECAR):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


class ReferenceStore:
    """Reference log-probs of one model per window, one .npz file each, keyed by
    sha256(format, model fingerprint, window, eval_tokens, reference mode, the window's token ids) — the
    token ids stand for the text file's content (and the tokenizer), so windows are shared across
    --max-windows values and re-used only when the text really is the same.

    Stored as float32 log-probs (E x V x 4 bytes: 50 MB per window at E=256, V=49152), so a stored reference
    gives exactly the KL a fresh one gives; `dtype="float16"` halves that at a measured KL error (see
    docs/QUALITY.md)."""

    def __init__(self, directory: str | os.PathLike, model_id: str, dtype: str = "float32"):
        if dtype not in ("float32", "float16"):
            raise InputError(f"reference store dtype must be float32 or float16, not {dtype!r}")
        self.dir = Path(directory)
        self.model_id = model_id
        self.dtype = dtype

    def key(self, window_tokens: np.ndarray, eval_tokens: int, mode: str) -> str:
        h = hashlib.sha256()
        meta = {"format": REF_FORMAT, "model": self.model_id, "window": len(window_tokens) - 1,
                "eval_tokens": eval_tokens, "mode": mode, "dtype": self.dtype}
        h.update(json.dumps(meta, sort_keys=True).encode())
        h.update(np.ascontiguousarray(window_tokens, dtype=np.int64).tobytes())
        return h.hexdigest()[:32]

    def path(self, window_tokens: np.ndarray, eval_tokens: int, mode: str) -> Path:
        return self.dir / f"ref-{self.key(window_tokens, eval_tokens, mode)}.npz"

    def get(self, window_tokens: np.ndarray, eval_tokens: int, mode: str) -> np.ndarray | None:
        p = self.path(window_tokens, eval_tokens, mode)
        if not p.is_file():
            return None
        try:
            with np.load(p) as z:
                lp = z["logprobs"]
        except (OSError, ValueError, KeyError, EOFError):
            return None  # a torn or foreign file: recompute (and overwrite)
        if lp.shape[0] != eval_tokens:
            return None
        lp = lp.astype(np.float32)
        if self.dtype == "float16":  # renormalize: rounding moved the total mass off 1
            lp -= np.log(np.sum(np.exp(lp.astype(np.float64)), axis=-1, keepdims=True)).astype(np.float32)
        return lp

    def put(self, window_tokens: np.ndarray, eval_tokens: int, mode: str, logprobs: np.ndarray) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self.path(window_tokens, eval_tokens, mode)
        tmp = p.with_name(p.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, logprobs=logprobs.astype(self.dtype))
        os.replace(tmp, p)
        return p


# ======================================================================================================
# KL / PPL evaluation
# ======================================================================================================


@dataclasses.dataclass
class WindowResult:
    index: int
    start: int  # first token of the window in the token stream
    kl: np.ndarray  # (E,) KL(ref || test) per scored position, nats
    nll: np.ndarray  # (E,) -log p_test(target)
    nll_ref: np.ndarray  # (E,) -log p_ref(target)
    top1: np.ndarray  # (E,) bool, argmax equal
    kv_tokens: int  # tokens in the cache at the end of the window (N)
    kv_bytes_used: int  # cache.stats()["bytes_used"] at the end of the window
    kv_bytes_used_max: int  # max of bytes_used over the prefill end and every decode step
    seconds: float  # tested policy: prefill + E decode steps
    ref_seconds: float  # reference (0 when read from the store)
    ref_cached: bool

    def row(self, dense_bpt: int) -> dict:
        bpt = self.kv_bytes_used / self.kv_tokens if self.kv_tokens else 0.0
        return {
            "window": self.index,
            "start_token": self.start,
            "mean_kl": float(self.kl.mean()),
            "p99_kl": float(np.percentile(self.kl, 99)),
            "max_kl": float(self.kl.max()),
            "ppl": float(math.exp(self.nll.mean())),
            "ppl_ref": float(math.exp(self.nll_ref.mean())),
            "top1_agreement": float(self.top1.mean()),
            "kv_tokens": self.kv_tokens,
            "kv_bytes_used": self.kv_bytes_used,
            "kv_bytes_used_max": self.kv_bytes_used_max,
            "kv_bytes_per_token": bpt,
            "kv_bytes_fraction": bpt / dense_bpt,
            "seconds": round(self.seconds, 3),
            "ref_seconds": round(self.ref_seconds, 3),
            "ref_cached": self.ref_cached,
        }


@dataclasses.dataclass
class KLReport:
    policy: str
    kv_dtype: str
    policy_opts: dict
    window: int
    eval_tokens: int
    dense_bytes_per_token: int  # fp16 dense K+V bytes per token (the budget's denominator)
    windows: list[WindowResult]
    ref_mode: str = "steps"

    def summary(self) -> dict:
        """Overall numbers: KL / NLL / top-1 pooled over all scored positions; KV bytes: end of each window
        (bytes_used / tokens), averaged over windows (equal windows, so pooled = averaged)."""
        kl = np.concatenate([w.kl for w in self.windows])
        nll = np.concatenate([w.nll for w in self.windows])
        nll_ref = np.concatenate([w.nll_ref for w in self.windows])
        top1 = np.concatenate([w.top1 for w in self.windows])
        used = sum(w.kv_bytes_used for w in self.windows)
        toks = sum(w.kv_tokens for w in self.windows)
        bpt = used / toks if toks else 0.0
        ppl, ppl_ref = math.exp(nll.mean()), math.exp(nll_ref.mean())
        return {
            "policy": self.policy,
            "kv_dtype": self.kv_dtype,
            "policy_opts": dict(self.policy_opts),
            "window": self.window,
            "eval_tokens": self.eval_tokens,
            "windows": len(self.windows),
            "scored_tokens": int(len(kl)),
            "mean_kl": float(kl.mean()),
            "median_kl": float(np.median(kl)),
            "p99_kl": float(np.percentile(kl, 99)),
            "max_kl": float(kl.max()),
            "ppl": ppl,
            "ppl_ref": ppl_ref,
            "ppl_ratio": ppl / ppl_ref,
            "top1_agreement": float(top1.mean()),
            "kv_bytes_per_token": bpt,
            "kv_bytes_fraction": bpt / self.dense_bytes_per_token,
            "kv_bytes_used_max": max(w.kv_bytes_used_max for w in self.windows),
            "dense_fp16_bytes_per_token": self.dense_bytes_per_token,
            "kv_bytes_measured_at": "end of each window (bytes_used / tokens, cache.stats())",
            "reference": f"policy full, dense float32 cache, {self.ref_mode} path",
            "seconds": round(sum(w.seconds for w in self.windows), 3),
            "ref_seconds": round(sum(w.ref_seconds for w in self.windows), 3),
        }

    def rows(self) -> list[dict]:
        return [w.row(self.dense_bytes_per_token) for w in self.windows]

    def to_dict(self) -> dict:
        return {**self.summary(), "rows": self.rows()}

    def markdown(self, ppl_first: bool = False) -> str:
        s = self.summary()
        opts = ", ".join(f"{k}={v}" for k, v in self.policy_opts.items())
        head = (f"**{self.policy}** (kv {self.kv_dtype}{', ' + opts if opts else ''}) vs dense fp32 reference — "
                f"{s['windows']} windows x {self.eval_tokens} scored tokens, window {self.window}\n\n")
        cols = ["window", "mean KL", "p99 KL", "PPL", "PPL ref", "PPL ratio", "top-1", "KV B/token", "KV frac",
                "s"]
        if ppl_first:
            cols = ["window", "PPL", "PPL ref", "PPL ratio", "mean KL", "p99 KL", "top-1", "KV B/token", "KV frac",
                    "s"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

        def cells(label, d):
            v = {"window": label, "mean KL": f"{d['mean_kl']:.3g}", "p99 KL": f"{d['p99_kl']:.3g}",
                 "PPL": f"{d['ppl']:.3f}", "PPL ref": f"{d['ppl_ref']:.3f}",
                 "PPL ratio": f"{d['ppl'] / d['ppl_ref']:.5f}", "top-1": f"{d['top1_agreement']:.4f}",
                 "KV B/token": f"{d['kv_bytes_per_token']:,.0f}", "KV frac": f"{d['kv_bytes_fraction']:.4f}",
                 "s": f"{d['seconds']:.0f}"}
            return "| " + " | ".join(v[c] for c in cols) + " |"

        for r in self.rows():
            lines.append(cells(str(r["window"]), r))
        lines.append(cells("**all**", s))
        return head + "\n".join(lines)


ProgressFn = Callable[[int, int, WindowResult, float], None]  # (windows done, total, last window, running KL)


class KLEvaluator:
    """One text, one model, one reference; `run` evaluates a policy. References are computed on first use and
    kept in memory (keep_refs) and / or in a ReferenceStore, so sweeping policies computes them once."""

    def __init__(self, model, tokens: Sequence[int], window: int = 2048, eval_tokens: int = 256,
                 max_windows: int | None = 8, ref_store: ReferenceStore | None = None, ref_mode: str = "steps",
                 keep_refs: bool = True, prefill_chunk: int = PREFILL_CHUNK):
        if ref_mode not in ("steps", "chunk"):
            raise InputError(f"reference mode must be 'steps' or 'chunk', not {ref_mode!r}")
        self.model = model
        self.args = model.args
        if window > self.args.max_position_embeddings:
            raise InputError(f"--window {window} exceeds the model's context ({self.args.max_position_embeddings})")
        self.window, self.eval_tokens = window, eval_tokens
        self.windows = split_windows(tokens, window, eval_tokens, max_windows)
        self.ref_store, self.ref_mode, self.keep_refs = ref_store, ref_mode, keep_refs
        self.prefill_chunk = prefill_chunk
        self._refs: dict[int, np.ndarray] = {}

    def reference(self, i: int) -> tuple[np.ndarray, float, bool]:
        """(E, V) float32 reference log-probs of window i, seconds spent, whether it came from a cache."""
        if i in self._refs:
            return self._refs[i], 0.0, True
        wt = self.windows[i]
        lp = self.ref_store.get(wt, self.eval_tokens, self.ref_mode) if self.ref_store else None
        cached, t0 = lp is not None, time.perf_counter()
        if lp is None:
            lp = reference_logprobs(self.model, wt, self.eval_tokens, self.ref_mode, self.prefill_chunk)
            if self.ref_store:
                self.ref_store.put(wt, self.eval_tokens, self.ref_mode, lp)
                lp = self.ref_store.get(wt, self.eval_tokens, self.ref_mode)  # use what later runs will read
        dt = 0.0 if cached else time.perf_counter() - t0
        if self.keep_refs:
            self._refs[i] = lp
        return lp, dt, cached

    def run_window(self, i: int, kv_policy: str = "full", kv_dtype: str = "float16", **policy_opts) -> WindowResult:
        ref, ref_dt, ref_cached = self.reference(i)
        wt, N, E = self.windows[i], self.window, self.eval_tokens
        targets = wt[N - E + 1 : N + 1]
        kl, nll, nll_ref, top1 = (np.empty(E), np.empty(E), np.empty(E), np.empty(E, dtype=bool))
        t0 = time.perf_counter()
        cache = make_cache(self.args, n_ctx=N, kv_policy=kv_policy, kv_dtype=kv_dtype, **policy_opts)
        steps = teacher_forced_steps(self.model, cache, wt, E, self.prefill_chunk)
        used_max = 0
        for j, lp in enumerate(steps):
            m = token_metrics(ref[j], lp.astype(np.float32), targets[j : j + 1])
            kl[j], nll[j], nll_ref[j], top1[j] = m["kl"][0], m["nll"][0], m["nll_ref"][0], m["top1"][0]
            used_max = max(used_max, cache.stats()["bytes_used"])
        dt = time.perf_counter() - t0
        st = cache.stats()
        return WindowResult(i, i * N, kl, nll, nll_ref, top1, int(st["tokens"]), int(st["bytes_used"]),
                            int(used_max), dt, ref_dt, ref_cached)

    def run(self, kv_policy: str = "full", kv_dtype: str = "float16", progress: ProgressFn | None = None,
            **policy_opts) -> KLReport:
        results: list[WindowResult] = []
        for i in range(len(self.windows)):
            results.append(self.run_window(i, kv_policy, kv_dtype, **policy_opts))
            if progress:
                running = float(np.concatenate([r.kl for r in results]).mean())
                progress(i + 1, len(self.windows), results[-1], running)
        return KLReport(kv_policy, kv_dtype, dict(policy_opts), self.window, self.eval_tokens,
                        dense_fp16_bytes_per_token(self.args), results, self.ref_mode)


def evaluate_kl(model, tokens: Sequence[int], kv_policy: str = "full", kv_dtype: str = "float16",
                window: int = 2048, eval_tokens: int = 256, max_windows: int | None = 8,
                ref_store: ReferenceStore | None = None, ref_mode: str = "steps",
                progress: ProgressFn | None = None, **policy_opts) -> KLReport:
    """One policy, one call (see KLEvaluator to sweep several policies over the same reference)."""
    ev = KLEvaluator(model, tokens, window, eval_tokens, max_windows, ref_store, ref_mode, keep_refs=False)
    return ev.run(kv_policy, kv_dtype, progress, **policy_opts)


def parse_policy_opts(items: Sequence[str]) -> dict:
    """["budget=0.25", "tier=ada4", "sinks=4"] -> {"budget": 0.25, "tier": "ada4", "sinks": 4}."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise InputError(f"--kv-opt expects key=value, got {item!r}")
        value = value.strip()
        for conv in (int, float):
            try:
                out[key] = conv(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


# ======================================================================================================
# Passkey retrieval
# ======================================================================================================

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                    "There and back again.")
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def passkey_needle(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def parse_lengths(text: str) -> list[int]:
    """"1k,2k,4k,7.5k" -> [1024, 2048, 4096, 7680] (k = 1024); plain integers are tokens."""
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)([kK]?)", part)
        if not m:
            raise InputError(f"--lengths expects token counts like 1k,2k,7.5k or 3000, not {part!r}")
        v = float(m.group(1)) * (1024 if m.group(2) else 1)
        if v < 64 or v != int(v):
            raise InputError(f"a passkey length must be a whole number of tokens >= 64, not {part!r}")
        out.append(int(v))
    if not out:
        raise InputError("--lengths is empty")
    return out


def parse_depths(text: str) -> list[float]:
    """"10,50,90" (percent) or "0.1,0.5,0.9" -> [0.1, 0.5, 0.9]."""
    try:
        vals = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--depths expects percentages like 10,50,90, not {text!r}") from None
    if not vals:
        raise InputError("--depths is empty")
    if any(v > 1 for v in vals):
        vals = [v / 100 for v in vals]
    if any(not 0 <= v <= 1 for v in vals):
        raise InputError(f"--depths must lie in 0..100 %, got {text!r}")
    return vals


@dataclasses.dataclass
class PasskeyPrompt:
    ids: list[int]
    key: str
    length: int  # requested total length in tokens
    depth: float  # requested depth (0..1)
    key_pos: int  # index of the needle's first token in ids

    @property
    def key_fraction(self) -> float:
        return self.key_pos / len(self.ids)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_bos=False)


def build_passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """Token ids: intro, filler, needle (at depth x length tokens), filler, question — `length` tokens in total
    (up to a few tokens: filler is cut at sentence boundaries). Pieces are tokenized separately, each
    sentence after the first with a leading space, and concatenated as ids."""
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    intro = bos + _encode(tokenizer, PASSKEY_INTRO)
    needle = _encode(tokenizer, " " + passkey_needle(key))
    question = _encode(tokenizer, " " + PASSKEY_QUESTION)
    sentences = [_encode(tokenizer, " " + s) for s in FILLER_SENTENCES]
    n_filler = length - len(intro) - len(needle) - len(question)
    if n_filler < 0:
        raise InputError(f"a passkey prompt needs at least {length - n_filler} tokens, got length {length}")
    want_before = min(max(0, round(depth * length) - len(intro)), n_filler)

    def filler(n_tokens: int, start: int) -> tuple[list[int], int]:
        """Whole sentences (cycling from `start`) totalling as close to n_tokens as possible."""
        out: list[int] = []
        s = start
        while True:
            nxt = sentences[s % len(sentences)]
            if abs(len(out) + len(nxt) - n_tokens) >= abs(len(out) - n_tokens):
                return out, s
            out += nxt
            s += 1

    before, s = filler(want_before, 0)
    after, _ = filler(length - len(intro) - len(before) - len(needle) - len(question), s)
    ids = intro + before + needle + after + question
    return PasskeyPrompt(ids, key, length, depth, len(intro) + len(before))


def passkey_prompts(tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int = 3,
                    seed: int = 0) -> list[PasskeyPrompt]:
    """trials prompts per (length, depth), keys drawn from a seeded generator (10000..99999)."""
    rng = np.random.default_rng(seed)
    out = []
    for L in lengths:
        for d in depths:
            for _ in range(trials):
                out.append(build_passkey_prompt(tokenizer, L, d, str(int(rng.integers(10000, 100000)))))
    return out


def passkey_answer_ok(text: str, key: str) -> bool:
    """Exact match: the first run of digits in the output is the key."""
    m = re.search(r"\d+", text)
    return bool(m) and m.group(0) == key


def greedy(logits: np.ndarray, history=()) -> int:
    return int(np.argmax(logits))


def run_passkey(model, tokenizer, prompts: Sequence[PasskeyPrompt], kv_policy: str = "full",
                kv_dtype: str = "float16", max_new_tokens: int = 8,
                progress: Callable[[int, int, dict], None] | None = None, **policy_opts) -> list[dict]:
    """Greedy-decode up to max_new_tokens after each prompt (cache n_ctx = length + 16); one dict per prompt:
    length, depth, key, answer (decoded text), correct."""
    results = []
    for n, p in enumerate(prompts):
        cache = make_cache(model.args, n_ctx=len(p.ids) + 16, kv_policy=kv_policy, kv_dtype=kv_dtype,
                           **policy_opts)
        t0 = time.perf_counter()
        out: list[int] = []
        steps = generate_step(model, cache, p.ids, greedy, history=list(p.ids))
        for tok, _ in steps:
            if tok in tokenizer.eos_ids:
                break
            out.append(tok)
            if len(out) >= max_new_tokens:
                break
        steps.close()
        answer = tokenizer.decode(out, skip_special=True)
        r = {"length": p.length, "tokens": len(p.ids), "depth": p.depth, "key": p.key, "answer": answer,
             "correct": passkey_answer_ok(answer, p.key), "seconds": round(time.perf_counter() - t0, 3)}
        results.append(r)
        if progress:
            progress(n + 1, len(prompts), r)
    return results


def passkey_table(results: Sequence[dict]) -> dict[tuple[int, float], tuple[int, int]]:
    """(length, depth) -> (correct, trials)."""
    table: dict[tuple[int, float], tuple[int, int]] = {}
    for r in results:
        c, n = table.get((r["length"], r["depth"]), (0, 0))
        table[(r["length"], r["depth"])] = (c + int(r["correct"]), n + 1)
    return table
