"""KV cache: page-table contract (pages.py), storage tiers and codecs (tiers.py), preallocated tier pools
(pool.py), the per-sequence cache the model is handed (cache.py), attention over pages (attention.py), and
the policy factory below."""

from __future__ import annotations

import sys

from ..errors import InputError
from .ada import AdaTier, allocate_bits
from .cache import PagedKVCache, Policy
from .tiers import QuantTier

KV_POLICIES = {
    "full": "every token kept in the dense tier (float16 by default)",
    "window": "StreamingLLM: sinks + recent window kept dense, older tokens dropped",
    "ada": "Spherical KV ADA: sinks + recent window dense, older tokens as page-local polar codes per RoPE pair "
           "(key bits per token per head: tier=192; value bits: v_bits=4), logits from the codes; needs "
           "`skvrt calibrate`",
    "quant": "KIVI-like: sinks + recent window dense, older tokens as per-channel int-k keys and per-token "
             "int-v values (k_bits / v_bits / v_group options; default 4 / 4 / 32)",
}


def make_policy(kv_policy: str = "full", sinks: int = 4, window: int = 64, k_bits: int = 4, v_bits: int = 4,
                v_group: int = 32, tier: int = 192, calibration=None) -> Policy:
    if kv_policy not in KV_POLICIES:
        raise InputError(f"unknown --kv-policy {kv_policy!r}; valid: {', '.join(KV_POLICIES)}")
    if kv_policy == "full":
        return Policy()
    if sinks < 0 or window < 1:
        raise InputError(f"sinks must be >= 0 and window >= 1 (got sinks={sinks}, window={window})")
    if kv_policy == "window":
        return Policy("window", sinks, window, None, keep_all=False)
    if kv_policy == "ada":
        if calibration is None:
            print("skvrt: this model has no calibration sidecar (run `skvrt calibrate`); --kv-policy ada falls "
                  "back to the dense tier", file=sys.stderr)
            return Policy()
        if tier % 8 or not 8 <= tier <= 12 * calibration.q_sq.shape[-1] // 2:
            raise InputError(f"ada tier must be a multiple of 8 key bits per token per head, 8..., not {tier}")
        if v_bits not in (2, 4, 8):
            raise InputError(f"v_bits must be 2, 4 or 8, not {v_bits}")
        bits = allocate_bits(calibration.pair_weight, int(tier))
        return Policy(f"ada{tier}-v{v_bits}", sinks, window, AdaTier(bits, int(v_bits), int(v_group)), keep_all=False)
    try:
        tier = QuantTier(int(k_bits), int(v_bits), int(v_group))
    except ValueError as e:
        raise InputError(str(e)) from None
    return Policy(f"quant-k{tier.k_bits}v{tier.v_bits}", sinks, window, tier, keep_all=False)


def make_cache(args, n_ctx: int | None = None, kv_policy: str = "full", kv_dtype: str = "float16",
               page_size: int | None = None, **policy_opts) -> PagedKVCache:
    """The cache for one sequence under a KV policy (see KV_POLICIES); policy_opts go to make_policy."""
    if kv_dtype not in ("float16", "float32"):
        raise InputError(f"kv dtype must be float16 or float32, not {kv_dtype!r}")
    try:
        policy = make_policy(kv_policy, calibration=getattr(args, "kv_calibration", None), **policy_opts)
    except TypeError as e:
        raise InputError(f"bad option for --kv-policy {kv_policy}: {e}") from None
    kw = {"page_size": page_size} if page_size else {}
    try:
        return PagedKVCache.for_model(args, n_ctx, kv_dtype, policy=policy, **kw)
    except ValueError as e:  # a tier that does not fit this model's shapes
        raise InputError(f"--kv-policy {kv_policy}: {e}") from None
