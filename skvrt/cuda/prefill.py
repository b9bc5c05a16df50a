"""Prefill attention over paged KV on an NVIDIA GPU: the launch code of kernels_cu/prefill_attention.cu (grid
layout, tiling and shapes are written there). GPU twin of PagedKVCache.attend for chunks of T > 1 tokens.

Like skvrt/cuda/attention.py, the op takes `module`, a factory (kernels_cu stem, defines) -> module with
get_function, and `xp`, the array module of the arrays, and checks dtype / shape / strides before the launch.
Tiers are the decode kernels' (attention.dense_tier / ada_tier); each tier also needs its pool's positions field
(causal masking is by position).
"""

from __future__ import annotations

import numpy as np

from .attention import NT, Tier, _check, _descs, _max_page, _ptr

R_FLOATS = 4096  # rows per block = R_FLOATS / head_dim (kernels_cu/prefill_attention.cu R)


def rows_per_block(head_dim: int) -> int:
    return R_FLOATS // head_dim


def prefill_attention(module, xp, q, qpos, tiers: list[Tier], positions: list, fill, page_ids, page_tiers, n_pages,
                      scale: float, out) -> None:
    """Causal attention of T query tokens over one layer's pages (the chunk's own keys included: the cache has
    appended them), every tier of `tiers` (dense float16 or ADA).

    q (T, nq, D) float32 whose last two axes are C-contiguous (any token stride: e.g. a view of the q|k|v
    projection rows); qpos (T,) int32; tiers: one Tier per pool in pool order (= page_tiers values);
    positions: per tier its pool's positions field (N, P_t) int32 (page stride = the tier's); fill (N,) int32;
    page_ids (H, max_pages) int32; page_tiers (H, max_pages) int8 or None (every page tier 0); n_pages (H,)
    int32; out (T, nq, D) float32 C-contiguous."""
    if q.ndim != 3 or page_ids.ndim != 2:
        raise ValueError(f"q must be (T, nq, D) and page_ids (H, max_pages), got {q.shape}, {page_ids.shape}")
    T, nq, D = q.shape
    H, max_pages = page_ids.shape
    if D not in (64, 128, 256):
        raise ValueError(f"head_dim {D} not supported by the CUDA prefill kernel (64, 128 or 256)")
    if nq % H or not 1 <= nq // H <= 16:
        raise ValueError(f"{nq} query heads over {H} KV heads: the group size must be an integer in 1..16")
    if not isinstance(q, xp.ndarray) or q.dtype != np.float32:
        raise ValueError(f"q: expected a {xp.__name__} float32 array, got {type(q).__name__} {q.dtype}")
    if q.strides[2] != 4 or q.strides[1] != 4 * D or q.strides[0] % 4 or q.strides[0] < 4 * nq * D:
        raise ValueError(f"q strides {q.strides}: heads and dims must be C-contiguous inside a token")
    if _ptr(q) % 4:
        raise ValueError("q must be 4-byte aligned")
    _check(xp, "qpos", qpos, (T,), np.int32)
    _check(xp, "fill", fill, fill.shape[:1], np.int32)
    _check(xp, "page_ids", page_ids, (H, max_pages), np.int32)
    _check(xp, "n_pages", n_pages, (H,), np.int32)
    _check(xp, "out", out, (T, nq, D), np.float32)
    if page_tiers is not None:
        _check(xp, "page_tiers", page_tiers, (H, max_pages), np.int8, 1)
    elif len(tiers) != 1:
        raise ValueError("page_tiers is needed with more than one tier")
    if len(positions) != len(tiers):
        raise ValueError(f"{len(tiers)} tiers but {len(positions)} positions fields")
    for i, (t, p) in enumerate(zip(tiers, positions)):
        _check(xp, f"positions[{i}]", p, (p.shape[0], t.page_size), np.int32, 4, t.stride)
    P = _max_page(tiers)
    G = nq // H
    if T == 0:
        return
    mod = module("prefill_attention", {"HEAD_DIM": D, "GQA": G, "MAX_PAGE": P})
    descs = _descs(xp, tiers)
    pos_ptrs = xp.asarray(np.array([_ptr(p) for p in positions], np.uint64))
    grid = (-(-T * G // rows_per_block(D)), H)
    mod.get_function("prefill_attention")(
        grid, (NT,), (q, np.int64(q.strides[0] // 4), qpos, np.int32(T), descs, pos_ptrs, fill, page_ids, page_tiers,
                      n_pages, np.int32(max_pages), np.float32(scale), out))
