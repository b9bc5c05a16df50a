"""Writing the KV cache on an NVIDIA GPU: the launch code of kernels_cu/dense_append.cu (new tokens into
dense float16 pages) and kernels_cu/ada_encode.cu (whole ADA pages encoded from float keys / values).

Page allocation stays on the host (the page table and the arena's free list are host objects,
skvrt/kv/pages.py, pool.py): `plan_dense_append` does PagedKVCache.append's allocation (new pages pushed
to the table) and returns where each token goes; the kernel writes the data, the positions and the fill.
Ops take `module` and `xp` as in skvrt/cuda/attention.py.
"""

from __future__ import annotations

import numpy as np

from .attention import _check

DENSE = 0  # the dense tier's pool index (skvrt/kv/cache.py)


def plan_dense_append(cache, layer: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """PagedKVCache.append's page allocation for T new tokens of `layer`, without writing any data: pages are
    allocated and pushed to the table exactly as append would; -> page_ids, slots (H, T) int32 (host).
    The host's fill counts are not changed (dense_append raises them on the device); for the rdr policies,
    append's _make_room must have been run by the caller."""
    pool = cache.pools[DENSE]
    P = pool.page_size
    H = cache.n_kv_heads
    if cache.offset + T > cache.n_ctx:
        from ..errors import ContextOverflowError

        raise ContextOverflowError(f"context full: {cache.offset} cached + {T} new tokens > n_ctx {cache.n_ctx}")
    pids, slots = np.empty((H, T), np.int32), np.empty((H, T), np.int32)
    for h in range(H):
        idx = cache.table.last(layer, h, DENSE)
        pid = int(cache.table.page_ids[layer, h, idx]) if idx >= 0 else -1
        f = int(pool.fill[pid]) if pid >= 0 else 0
        for t in range(T):
            if pid < 0 or f == P:
                pid = pool.alloc()  # resets the frame's fill to 0 and its positions to -1
                cache.table.push(layer, h, pid, DENSE)
                f = 0
            pids[h, t], slots[h, t] = pid, f
            f += 1
    return pids, slots


def dense_append(module, xp, k, v, page_ids, slots, k_pages, v_pages, pos_pages, fill, pos0: int,
                 positions=None) -> None:
    """k, v (H, T, D) float32 (any strides with a contiguous last axis); page_ids, slots (H, T) int32;
    k_pages, v_pages (N, P, D) float16 and pos_pages (N, P) int32: the dense pool's fields (page stride =
    the arena's frame bytes); fill (N,) int32: the arena's. Token t of head h -> page page_ids[h, t], slot
    slots[h, t], position pos0 + t -- or positions[t] when `positions` (T,) int32 (a device array: what a CUDA
    graph replays with a new position) is given."""
    H, T, D = k.shape
    if v.shape != k.shape or k.dtype != np.float32 or v.dtype != np.float32:
        raise ValueError(f"k, v must both be (H, T, D) float32, got {k.shape} {k.dtype}, {v.shape} {v.dtype}")
    if k.strides != v.strides or k.strides[2] != 4:
        raise ValueError("k and v must have the same strides and a contiguous last axis")
    N, P, _ = k_pages.shape
    stride = k_pages.strides[0]
    _check(xp, "k_pages", k_pages, (N, P, D), np.float16, 2, stride)
    _check(xp, "v_pages", v_pages, (N, P, D), np.float16, 2, stride)
    _check(xp, "pos_pages", pos_pages, (N, P), np.int32, 4, stride)
    _check(xp, "fill", fill, (N,), np.int32)
    _check(xp, "page_ids", page_ids, (H, T), np.int32)
    _check(xp, "slots", slots, (H, T), np.int32)
    if positions is not None:
        _check(xp, "positions", positions, (T,), np.int32)
    if H * T:
        module("dense_append", {}).get_function("dense_append")(
            (T, H), (128,), (k, v, np.int64(k.strides[0] // 4), np.int64(k.strides[1] // 4), page_ids, slots,
                             k_pages, v_pages, pos_pages, fill, np.int64(stride), positions, np.int32(pos0), np.int32(D),
                             np.int32(T)))


def ada_encode_pages(module, xp, k, v, jobs, angle_bits, radius_bits, data: dict, v_bits: int, v_group: int) -> None:
    """Encode whole ADA pages (twin: AdaTier.write_page). k, v (n_jobs, P_src, D) float32 C-contiguous;
    jobs (n_jobs, 3) int32 rows (page id, n tokens 1..P, kv head); angle_bits, radius_bits (H, D/2) uint8
    of the layer, on the device; data: the ADA pool's fields by name (codes, frame, v_codes, v_min,
    v_scale) as xp arrays (page stride = the arena's frame bytes)."""
    if k.ndim != 3:
        raise ValueError(f"k must be (n_jobs, P_src, D), got {k.shape}")
    J, Ps, D = k.shape
    if D > 256 or D % 16:
        raise ValueError(f"head_dim {D}: the ADA encode kernel takes multiples of 16 up to 256")
    _check(xp, "k", k, (J, Ps, D), np.float32)
    _check(xp, "v", v, (J, Ps, D), np.float32)
    _check(xp, "jobs", jobs, (J, 3), np.int32)
    H = angle_bits.shape[0]
    _check(xp, "angle_bits", angle_bits, (H, D // 2), np.uint8, 1)
    _check(xp, "radius_bits", radius_bits, (H, D // 2), np.uint8, 1)
    codes = data["codes"]
    N, P, key_bytes = codes.shape
    stride = codes.strides[0]
    if v_bits not in (2, 4, 8) or v_group % 8 or D % v_group:
        raise ValueError(f"v_bits {v_bits} / v_group {v_group} not supported")
    ng = D // v_group
    for name, shape, dt, align in (("codes", (N, P, key_bytes), np.uint8, 1), ("frame", (N, D // 2, 4), np.float16, 2),
                                   ("v_codes", (N, P, D * v_bits // 8), np.uint8, 1),
                                   ("v_min", (N, P, ng), np.float16, 2), ("v_scale", (N, P, ng), np.float16, 2)):
        _check(xp, f"ADA {name}", data[name], shape, dt, align, stride)
    if Ps > P:
        raise ValueError(f"{Ps} source tokens per job > {P} tokens per page")
    if J:
        mod = module("ada_encode", {})
        mod.get_function("ada_encode_keys")(
            (J,), (128,), (k, jobs, angle_bits, radius_bits, codes, data["frame"], np.int64(stride), np.int64(Ps * D),
                           np.int32(D), np.int32(key_bytes)))
        mod.get_function("ada_encode_values")(
            (J,), (128,), (v, jobs, data["v_codes"], data["v_min"], data["v_scale"], np.int64(stride),
                           np.int64(Ps * D), np.int32(D), np.int32(v_bits), np.int32(v_group)))


def device_arena(xp, arena):
    """A device copy of a host FrameArena's bytes and fill -> (buf, fill) as xp arrays (numpy: the arena's own)."""
    if xp is np:
        return arena.buf, arena.fill
    return xp.asarray(arena.buf), xp.asarray(arena.fill)


def pool_fields(xp, pool, buf) -> dict:
    """The pool's field arrays as strided xp views of `buf` (the arena's bytes, on the device for cupy):
    same offsets, shapes and strides as pool.data."""
    out = {}
    base = pool.arena.buf.ctypes.data
    for name, a in pool.data.items():
        off = a.ctypes.data - base
        if xp is np and buf is pool.arena.buf:
            out[name] = a
        elif xp is np:
            out[name] = np.ndarray(a.shape, a.dtype, buf, off, a.strides)
        else:
            out[name] = xp.ndarray(a.shape, a.dtype, buf.data + off, a.strides)
    return out

