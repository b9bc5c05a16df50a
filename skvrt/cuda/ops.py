"""Elementwise / row ops of the decode step on an NVIDIA GPU: the launch code of kernels_cu/rms_norm.cu,
rope.cu and swiglu.cu (grid layout and shapes are written there). GPU twins of skvrt/ops.py.

Like skvrt/cuda/attention.py, every op takes `module`, a factory (kernels_cu stem, defines) -> module with
get_function (skvrt.cuda.loader.cupy_module on a GPU, skvrt.cuda.emu.factory(order) in the CPU tests), and
`xp`, the array module of the arrays, and checks dtype / shape / contiguity before the launch.
"""

from __future__ import annotations

import numpy as np

from .attention import _check

MAX_GRID_X = 2**31 - 1


def rms_norm(module, xp, x, weight, eps: float, out, residual=None) -> None:
    """out (T, n) <- RMSNorm(x) * weight; with residual (T, n): x += residual first (written back to x).
    All float32, C-contiguous."""
    if x.ndim != 2:
        raise ValueError(f"x must be (T, n), got {x.shape}")
    T, n = x.shape
    _check(xp, "x", x, (T, n), np.float32)
    _check(xp, "weight", weight, (n,), np.float32)
    _check(xp, "out", out, (T, n), np.float32)
    if residual is not None:
        _check(xp, "residual", residual, (T, n), np.float32)
    if T:
        module("rms_norm", {}).get_function("rms_norm")(
            (T,), (256,), (x, residual, weight, out, np.int32(n), np.float32(eps)))


def rope(module, xp, x, positions, inv_freq, n_heads: int, head_dim: int, head0: int = 0) -> None:
    """Rotate heads head0 .. head0 + n_heads - 1 of every row of x (T, width) float32 in place (rotate_half
    RoPE; width >= (head0 + n_heads) head_dim, e.g. the q|k|v projection with n_heads = nq + nkv);
    positions (T,) int32, inv_freq (head_dim / 2,) float32."""
    if x.ndim != 2 or head_dim % 2 or x.shape[1] < (head0 + n_heads) * head_dim:
        raise ValueError(f"x {x.shape} does not hold heads {head0}..{head0 + n_heads - 1} of {head_dim} dims")
    T, width = x.shape
    _check(xp, "x", x, (T, width), np.float32)
    _check(xp, "positions", positions, (T,), np.int32)
    _check(xp, "inv_freq", inv_freq, (head_dim // 2,), np.float32)
    if T and n_heads:
        module("rope", {}).get_function("rope")(
            (T, n_heads), (64,), (x, positions, inv_freq, np.int32(width), np.int32(head0), np.int32(head_dim)))


def swiglu(module, xp, gu, out) -> None:
    """out (T, F) <- silu(gu[:, :F]) * gu[:, F:]; gu (T, 2F) float32."""
    if gu.ndim != 2 or gu.shape[1] % 2:
        raise ValueError(f"gu must be (T, 2F), got {gu.shape}")
    T, F = gu.shape[0], gu.shape[1] // 2
    _check(xp, "gu", gu, (T, 2 * F), np.float32)
    _check(xp, "out", out, (T, F), np.float32)
    if T * F:
        module("swiglu", {}).get_function("swiglu")((-(-F // 256), min(T, 65535)), (256,),
                                                    (gu, out, np.int32(T), np.int32(F)))
