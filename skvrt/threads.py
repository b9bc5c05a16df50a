"""BLAS thread pinning. OpenBLAS with more threads than free cores collapses on shared machines
(REFERENCE.md: a 41-token prefill took 5.8 s with 2 threads, 0.3 s with 1), so the count is explicit."""

from __future__ import annotations

import os

_limiter = None


def default_threads() -> int:
    env = os.environ.get("SKVRT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def set_threads(n: int | None = None) -> int:
    """Pin BLAS (OpenBLAS / MKL / BLIS) threads for this process; returns the count in force."""
    global _limiter
    from threadpoolctl import threadpool_limits

    n = n or default_threads()
    _limiter = threadpool_limits(limits=n, user_api="blas")
    global current
    current = n
    from . import ckernels

    ckernels.set_threads(n)
    return n


current: int | None = None  # threads in force after set_threads (BLAS and the C kernels' OpenMP)
