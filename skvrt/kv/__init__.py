"""KV cache: page-table contract (pages.py), storage tiers and codecs (tiers.py), preallocated tier pools
(pool.py), the per-sequence cache the model is handed (cache.py), attention over pages (attention.py), and
the policy factory below."""

from __future__ import annotations

import sys

from ..errors import InputError
import numpy as np

from .cache import PagedKVCache, Policy
from .tiers import DenseTier, QuantTier

# ADA tiers of the spherical policy's ladder: (key bits per token per head, value bits), richest first
from ..calibrate import DEFAULT_LADDER
DENSE_STEP = "dense"  # a ladder step that keeps old tokens dense (distortion 0, ~3.4x the bytes of ada256-v4)
SPHERICAL_LADDER = (DENSE_STEP, *DEFAULT_LADDER)  # the spherical policy's default old-token tiers
LADDER_V_GROUP = 64
RDR_WINDOW = 32  # default recent window of the budgeted policies
SPHERICAL_DROP_COST = 2.0  # distortion of dropping a token, relative to its whole contribution (rdr.assign);
# 1, 2 and 8 measured on the dev text (bench/rdr_dev.py, docs/QUALITY.md): 2 best at 10 %, equal at 25 %
SPHERICAL_KEEP_IF_FITS = True  # drop nothing while every token fits at the cheapest tier (rdr.assign)
SPHERICAL_UTIL_FLOOR = 1.0  # utility floor, a fraction of a uniform attention share (Policy.util_floor)
SPHERICAL_SURPRISAL = 1.0  # share of that floor spread by each token's surprisal (Policy.surprisal); passkey at
# 7.5K, 25 %: of the 6 / 9 prompts the full cache answers, 5 with it and 3 without (docs/QUALITY.md, session 8)

HEAD_WEIGHT_POWER = 0.5  # spherical: each head's distortions x (its calibrated sensitivity / the geometric mean
# over heads) ^ this (Policy.head_weight, `head_weight_from`). Dev KL at 10 / 12.5 %: 0.0523 / 0.0366 without,
# 0.0304 / 0.0208 with; powers 0.25 and 1 gained less (docs/QUALITY.md, session 14)
LOOKAHEAD_HORIZON = 256  # lookahead's per-head scale of the prior (Policy.horizon); WikiText KL at 12.5 / 10 %:
# 0.0473 / 0.0738 -> 0.0388 / 0.0557 (docs/QUALITY.md, session 13)
SPHERICAL_LOOKAHEAD = None  # prefill twice, choosing tiers knowing the prompt's last queries (Policy.lookahead);
# None = auto: when the budget cannot hold the whole context at the cheapest tier (tokens will be dropped). WikiText
# KL at 12.5 / 10 %: 0.0688 / 0.0927 -> 0.0582 / 0.0818, for a 2x prefill there (docs/QUALITY.md, session 9)

KV_POLICIES = {
    "full": "every token kept in the dense tier (float16 by default)",
    "window": "StreamingLLM: sinks + recent window kept dense, older tokens dropped",
    "ada": "Spherical KV ADA: sinks + recent window dense, older tokens as page-local polar codes per RoPE pair "
           "(key bits per token per head: tier=192; value bits: v_bits=4), logits from the codes; needs "
           "`skvrt calibrate`",
    "quant": "KIVI-like: sinks + recent window dense, older tokens as per-channel int-k keys and per-token "
             "int-v values (k_bits / v_bits / v_group options; default 4 / 4 / 32)",
    "snapkv": "SnapKV-like eviction under --kv-budget: tokens kept at dense precision by the attention of each "
              "prefill chunk's last queries (pooled over neighbours) and, for tokens written during decoding, of "
              "the decode steps since (a mean per observing query), the rest dropped",
    "h2o": "H2O-like eviction under --kv-budget: tokens kept at dense precision by accumulated attention "
           "(prefill observation window + every decode step), the rest dropped",
    "spherical": "Spherical KV (ADA + RDR) under --kv-budget: each token outside sinks + window stays dense, gets "
                 "an ADA tier or is dropped (ladder=dense,256:4,192:2: key:value bits; by default dense and 256:4 "
                 "when the budget holds every token at 256:4, else 256:4 and 192:2), by attention utility x "
                 "calibrated distortion, jointly over layers and heads; needs `skvrt calibrate`",
}
BUDGETED = ("snapkv", "h2o", "spherical")


def parse_ladder(ladder) -> tuple:
    """'dense,256:4,192:2,128:2' (or a sequence of "dense" / pairs) -> ("dense", (256, 4), (192, 2), (128, 2)):
    the old-token tiers, richest first; "dense" (the cache's dense dtype, distortion 0) may only come first."""
    if ladder is None:
        return SPHERICAL_LADDER
    try:
        if isinstance(ladder, str):
            ladder = [part.strip() for part in ladder.split(",") if part.strip()]
        out = tuple(s if s == DENSE_STEP else tuple(int(x) for x in (s.split(":") if isinstance(s, str) else s))
                    for s in ladder)
        ada = [s for s in out if s != DENSE_STEP]
        bad = any(len(s) != 2 for s in ada)
    except (ValueError, TypeError):
        bad = True
    if bad:
        raise InputError(f"bad ladder {ladder!r}: use dense and key_bits:value_bits pairs, richest first, e.g. "
                         f"dense,256:4,192:2,128:2") from None
    if not out or any(kb % 8 or kb <= 0 or vb not in (2, 4, 8) for kb, vb in ada):
        raise InputError(f"bad ladder {ladder!r}: key bits multiples of 8, value bits 2, 4 or 8")
    if DENSE_STEP in out[1:]:
        raise InputError(f"bad ladder {ladder!r}: dense can only be the first (richest) tier")
    return out


def proxy_distortion(calibration, tiers) -> np.ndarray:
    """(L, H, n) distortion estimate from the sidecar's statistics when it has no measured ladder: the logit
    error of b_i bits on pair i ~ scale^2 sum_i w_i 2^-b_i / 12 (w = E[q^2] x key range^2, the model behind
    allocate_bits), plus a value term (int-vb over a group's ~4.7 sigma range, relative to the spread)."""
    D = calibration.q_sq.shape[-1]
    out = []
    for t in tiers:
        logit = (calibration.pair_weight * np.exp2(-t.pair_bits.astype(np.float64))).sum(-1) / 12 / D
        value = (4.7 / (2 ** t.v_bits - 1)) ** 2 / 12
        out.append(logit + value)
    return np.stack(out, axis=-1)


def head_weight_from(sensitivity: np.ndarray, power: float) -> np.ndarray:
    """(L, H) sensitivity (the sidecar's, skvrt.head_sensitivity) -> (L, H) weight (s / geometric mean of s) ^
    power, where s is floored at 1e-6 of its largest value (a head the output ignores gets a small weight, not 0)."""
    s = np.maximum(np.asarray(sensitivity, np.float64), 1e-6 * max(float(np.max(sensitivity)), 1e-30))
    return np.exp(power * (np.log(s) - np.log(s).mean()))


def _flag(name: str, value, default: bool) -> bool:
    """A yes/no policy option: True / False, 1 / 0, or the strings true / false / yes / no / on / off."""
    if value is None:
        return default
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InputError(f"{name} must be true or false (1 / 0), not {value!r}")


def make_policy(kv_policy: str = "full", sinks: int = 4, window: int | None = None, k_bits: int = 4,
                v_bits: int = 4, v_group: int = 32, tier: int = 192, calibration=None, budget=None,
                ladder=None, kv_dtype: str = "float16", obs: int = 32, chunk: int | None = None,
                distortion: str = "measured", batch: int | None = None, drop_cost: float | None = None,
                util_floor: float | None = None, keep_if_fits: bool | None = None,
                surprisal: float | None = None, lookahead=None, horizon: int | None = None,
                head_weight: float | None = None) -> Policy:
    if kv_policy not in KV_POLICIES:
        raise InputError(f"unknown --kv-policy {kv_policy!r}; valid: {', '.join(KV_POLICIES)}")
    if window is None:
        window = RDR_WINDOW if kv_policy in BUDGETED else 64
    if lookahead is not None and kv_policy not in BUDGETED:
        raise InputError(f"lookahead is an option of the budgeted policies ({', '.join(BUDGETED)}), not {kv_policy}")
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer))
                                or horizon < 0):
        raise InputError(f"horizon must be a whole number of tokens >= 0 (0: no scaling), not {horizon!r}")
    if horizon is not None and kv_policy not in BUDGETED:
        raise InputError(f"horizon is an option of the budgeted policies ({', '.join(BUDGETED)}), not {kv_policy}")
    if head_weight is not None and kv_policy != "spherical":
        raise InputError(f"head_weight is an option of the spherical policy (it weighs calibrated distortions), "
                         f"not {kv_policy}")
    if kv_policy == "full":
        return Policy(budget=budget)
    if sinks < 0 or window < 1:
        raise InputError(f"sinks must be >= 0 and window >= 1 (got sinks={sinks}, window={window})")
    if kv_policy in BUDGETED and budget is None:
        raise InputError(f"--kv-policy {kv_policy} needs a --kv-budget (e.g. 25%, 0.25 or 64MiB)")
    if batch is not None and batch < 1:
        raise InputError(f"batch must be >= 1, not {batch}")
    common = dict(sinks=sinks, window=window, keep_all=False, budget=budget, chunk=chunk, batch=batch)
    if lookahead is None:
        look = SPHERICAL_LOOKAHEAD if kv_policy == "spherical" else False
    elif str(lookahead).strip().lower() == "auto":
        look = None
    else:
        try:
            look = _flag("lookahead", lookahead, False)
        except InputError:
            raise InputError(f"lookahead must be auto, true or false (1 / 0), not {lookahead!r}") from None
    budgeted = dict(lookahead=look, horizon=int(horizon if horizon is not None else LOOKAHEAD_HORIZON))
    if kv_policy == "window":
        return Policy("window", **common)
    if kv_policy in ("snapkv", "h2o"):
        return Policy(kv_policy, old_tiers=(DenseTier(kv_dtype),), allocator="rdr", obs=obs,
                      utility="mean" if kv_policy == "snapkv" else "sum", **budgeted, **common)
    if kv_policy in ("ada", "spherical") and calibration is None:
        if kv_policy == "spherical":
            raise InputError("--kv-policy spherical needs the model's calibration sidecar: run `skvrt calibrate`")
        print("skvrt: this model has no calibration sidecar (run `skvrt calibrate`); --kv-policy ada falls "
              "back to the dense tier", file=sys.stderr)
        return Policy(budget=budget)
    if kv_policy == "spherical":
        if (drop_cost is not None and not float(drop_cost) > 0) or (util_floor is not None and not float(util_floor) >= 0):
            raise InputError(f"drop_cost must be > 0 and util_floor >= 0 (got {drop_cost}, {util_floor})")
        if surprisal is not None and not 0 <= float(surprisal) <= 1:
            raise InputError(f"surprisal must be a share between 0 and 1 (got {surprisal})")
        power = HEAD_WEIGHT_POWER if head_weight is None else head_weight
        if isinstance(power, bool) or not isinstance(power, (int, float, np.integer, np.floating)) or not 0 <= power <= 4:
            raise InputError(f"head_weight must be a power between 0 (every head alike) and 4, not {head_weight!r}")
        steps = parse_ladder(ladder)
        dense = steps[0] == DENSE_STEP
        ada_steps = steps[1:] if dense else steps
        max_bits = 12 * calibration.q_sq.shape[-1] // 2
        if any(kb > max_bits for kb, _ in ada_steps):
            raise InputError(f"ladder key bits must be <= {max_bits}")
        ada_tiers = tuple(calibration.ada_tier(kb, vb, LADDER_V_GROUP) for kb, vb in ada_steps)
        if distortion not in ("measured", "proxy"):
            raise InputError(f"distortion must be measured (the sidecar's, when it has this ladder) or proxy")
        measured = (calibration.distortion(ada_steps, LADDER_V_GROUP) if distortion == "measured" and ada_steps
                    else None)
        if measured is None and distortion == "measured" and ada_steps:
            print(f"skvrt: the calibration sidecar has no measured distortion for every tier of the ladder "
                  f"{','.join(f'{kb}:{vb}' for kb, vb in ada_steps)}; spherical uses the proxy estimate (run "
                  f"`skvrt calibrate` to measure them)", file=sys.stderr)
        L, H = calibration.q_sq.shape[:2]
        dist = (measured if measured is not None else proxy_distortion(calibration, ada_tiers) if ada_tiers
                else np.zeros((L, H, 0)))
        tiers = ada_tiers
        if dense:  # old tokens kept dense: the fp16 copy's error is negligible next to any code's (distortion 0)
            tiers = (DenseTier(kv_dtype), *ada_tiers)
            dist = np.concatenate([np.zeros((L, H, 1)), dist], axis=-1)
        return Policy("spherical", old_tiers=tiers, allocator="rdr", utility="mean", distortion=dist, obs=obs,
                      drop_cost=float(drop_cost if drop_cost is not None else SPHERICAL_DROP_COST),
                      util_floor=float(util_floor if util_floor is not None else SPHERICAL_UTIL_FLOOR),
                      keep_if_fits=_flag("keep_if_fits", keep_if_fits, SPHERICAL_KEEP_IF_FITS),
                      surprisal=float(surprisal if surprisal is not None else SPHERICAL_SURPRISAL),
                      head_weight=(head_weight_from(calibration.head_sensitivity, float(power))
                                   if power and calibration.head_sensitivity is not None else None),
                      ladder_by_room=ladder is None, **budgeted, **common)
    if kv_policy == "ada":
        if tier % 8 or not 8 <= tier <= 12 * calibration.q_sq.shape[-1] // 2:
            raise InputError(f"ada tier must be a multiple of 8 key bits per token per head, 8..., not {tier}")
        if v_bits not in (2, 4, 8):
            raise InputError(f"v_bits must be 2, 4 or 8, not {v_bits}")
        return Policy(f"ada{tier}-v{v_bits}", old_tiers=(calibration.ada_tier(int(tier), int(v_bits), int(v_group)),),
                      **common)
    try:
        qt = QuantTier(int(k_bits), int(v_bits), int(v_group))
    except ValueError as e:
        raise InputError(str(e)) from None
    return Policy(f"quant-k{qt.k_bits}v{qt.v_bits}", old_tiers=(qt,), **common)


def make_cache(args, n_ctx: int | None = None, kv_policy: str = "full", kv_dtype: str = "float16",
               page_size: int | None = None, **policy_opts) -> PagedKVCache:
    """The cache for one sequence under a KV policy (see KV_POLICIES); policy_opts go to make_policy."""
    if kv_dtype not in ("float16", "float32"):
        raise InputError(f"kv dtype must be float16 or float32, not {kv_dtype!r}")
    try:
        policy = make_policy(kv_policy, calibration=getattr(args, "kv_calibration", None), kv_dtype=kv_dtype,
                             **policy_opts)
    except TypeError as e:
        raise InputError(f"bad option for --kv-policy {kv_policy}: {e}") from None
    kw = {"page_size": page_size} if page_size else {}
    try:
        return PagedKVCache.for_model(args, n_ctx, kv_dtype, policy=policy, **kw)
    except ValueError as e:  # a tier that does not fit this model's shapes
        raise InputError(f"--kv-policy {kv_policy}: {e}") from None
