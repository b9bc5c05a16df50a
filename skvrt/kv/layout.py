"""Byte layout of one page inside a frame (see skvrt.kv.pool): the tier's fields, then per-slot metadata.

A tier describes its page as fields [(name, dtype, per-page shape)], where "P" in a shape stands for the
page's token count; `layout` places them one after another, each aligned to ALIGN bytes.
"""

from __future__ import annotations

import numpy as np

from .slot_mass import MASS_DTYPE

ALIGN = 16  # byte alignment of every field inside a frame
FILL_BYTES = 4  # int32 fill count per frame (arena metadata)
MAX_PAGE_TOKENS = 256  # the kernels' limit on tokens per page


SHORT_POSITIONS_MAX_CTX = 32767  # contexts up to this many tokens can keep positions as int16


def position_dtype(n_ctx: int, track_mass: bool) -> str:
    """Dtype of the per-slot positions: int16 for the budgeted (RDR, CPU-only) caches whose context fits it --
    every byte of a budgeted page is a byte the allocator cannot spend on codes (2 B of ~56 per ada192-v2
    token) -- int32 otherwise (the CUDA kernels read int32 positions of the fifo policies' pages)."""
    return "int16" if track_mass and n_ctx <= SHORT_POSITIONS_MAX_CTX else "int32"


def slot_fields(track_mass: bool, pos_dtype: str = "int32") -> list[tuple[str, str, tuple]]:
    """Per-slot metadata every page carries: positions (P,) pos_dtype (position_dtype); mass (P,) float16 when
    tracked (sums updated with stochastic rounding: slot_mass.py)."""
    return [("positions", pos_dtype, ("P",))] + ([("mass", MASS_DTYPE, ("P",))] if track_mass else [])


def _shape(shape: tuple, P: int) -> tuple[int, ...]:
    return tuple(P if s == "P" else s for s in shape)


def layout(fields, P: int) -> tuple[dict[str, int], int]:
    """fields [(name, dtype, per-page shape)] -> ({name: byte offset in the page}, page bytes), ALIGN-aligned."""
    offsets, o = {}, 0
    for name, dtype, shape in fields:
        o = -(-o // ALIGN) * ALIGN
        offsets[name] = o
        o += int(np.prod(_shape(shape, P), dtype=np.int64)) * np.dtype(dtype).itemsize
    return offsets, -(-o // ALIGN) * ALIGN


def page_fields(tier, P: int, D: int, track_mass: bool, pos_dtype: str = "int32") -> list[tuple[str, str, tuple]]:
    """The tier's fields + per-slot metadata, shapes resolved for P tokens."""
    return [(n, dt, _shape(s, P)) for n, dt, s in [*tier.fields(P, D), *slot_fields(track_mass, pos_dtype)]]


def page_bytes(tier, P: int, D: int, track_mass: bool, pos_dtype: str = "int32") -> int:
    return layout(page_fields(tier, P, D, track_mass, pos_dtype), P)[1]


def tokens_per_frame(tier, frame_bytes: int, D: int, track_mass: bool, pos_dtype: str = "int32") -> int:
    """Largest P <= MAX_PAGE_TOKENS whose page fits in a frame (0 if not even one token fits)."""
    lo, hi = 0, MAX_PAGE_TOKENS
    while lo < hi:  # page bytes grow with P
        mid = (lo + hi + 1) // 2
        if page_bytes(tier, mid, D, track_mass, pos_dtype) <= frame_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def alloc_arrays(tier, n_pages: int, P: int, D: int) -> dict[str, np.ndarray]:
    """Plain contiguous arrays (n_pages, ...) for a tier's fields (codec tests, calibration reports)."""
    return {n: np.zeros((n_pages, *_shape(s, P)), dt) for n, dt, s in tier.fields(P, D)}
