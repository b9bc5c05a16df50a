"""KV cache: page-table contract (pages.py), preallocated tier pools (pool.py), the per-sequence cache the
model is handed (cache.py), attention over pages (attention.py), and the policy factory below."""

from __future__ import annotations

from ..errors import InputError
from .cache import PagedKVCache

KV_POLICIES = ("full",)


def make_cache(args, n_ctx: int | None = None, kv_policy: str = "full", kv_dtype: str = "float16",
               **policy_opts) -> PagedKVCache:
    """The cache for one sequence under a KV policy. `full`: every token kept in the dense tier."""
    if kv_policy not in KV_POLICIES:
        raise InputError(f"unknown --kv-policy {kv_policy!r}; valid: {', '.join(KV_POLICIES)}")
    if kv_dtype not in ("float16", "float32"):
        raise InputError(f"kv dtype must be float16 or float32, not {kv_dtype!r}")
    return PagedKVCache.for_model(args, n_ctx, kv_dtype, **policy_opts)
