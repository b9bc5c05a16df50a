"""Slot attention mass in float16 with stochastic rounding (NumPy twin of the C and CUDA kernels' update).

The budgeted caches keep, per token and (layer, kv head), the attention it received (`mass`, RDR's utility).
As a float32 it cost 4 of a coded token's ~43-76 bytes; float16 halves that. A float16 *sum* rounded to
nearest would stop growing once the increments fall below half its last-place unit (after a few thousand
equal increments), so every update rounds stochastically instead: the new sum y = old + x (float32) goes to
one of its two float16 neighbours a <= y < b, to b with probability (y - a) / (b - a), and the stored sum is
unbiased. Its spread: each update adds a variance of ~(y - a)(b - y) <= x * step, and the step is ~2^-10.5 of
the sum, so a sum S built from many small increments has a standard deviation of ~2^-5.75 S (2 %; measured in
tests/test_slot_mass.py) -- noise on a utility that the allocator only compares. The random bits are a hash of
(page, slot, seed) -- seed: the observing query's position -- so a run is deterministic and the C / CUDA
kernels reproduce NumPy's choice bit for bit whenever their float32 y is the same. Sums saturate at the largest
float16 (65504).

Rounding on float32 bits (y >= 0): for y >= 2^-14 (a float16 normal) the float16 neighbours are y with its
low 13 mantissa bits cleared and that + 2^13 units; below 2^-14 (float16 subnormals, steps of 2^-24) on
y * 2^24's integer part and its first 13 fractional bits. Round up iff those 13 bits > r, r = the hash's top
13 bits (uniform on 0 .. 8191): P(up) = bits / 8192.
"""

from __future__ import annotations

import numpy as np

MASS_DTYPE = "float16"
F16_MAX = 65504.0
_LOW = np.uint32(0x1FFF)  # float32 mantissa bits below float16's 10
_NORMAL_MIN = np.float32(2.0**-14)


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer hash (uint32 arrays, wrapping arithmetic)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def slot_keys(pids: np.ndarray, slots: np.ndarray, seed: int) -> np.ndarray:
    """-> uint32 hash inputs of slots (pid, slot): pid * 256 + slot + seed * 0x9E3779B9 (mod 2^32)."""
    with np.errstate(over="ignore"):
        base = (np.asarray(pids).astype(np.uint32) * np.uint32(256) + np.asarray(slots).astype(np.uint32))
        return base + np.uint32((int(seed) * 0x9E3779B9) & 0xFFFFFFFF)


def accumulate(old: np.ndarray, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """old (n,) float16 sums, x (n,) >= 0 increments, keys (n,) uint32 (slot_keys) -> (n,) float16: old + x
    rounded stochastically (module docstring)."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = old.astype(np.float32) + np.asarray(x, np.float32)  # (n,) float32, like the kernels' one add
        r = _lowbias32(np.asarray(keys, np.uint32)) >> np.uint32(19)  # (n,) 13 random bits
        bits = y.view(np.uint32)
        up = (bits & _LOW) > r
        normal = ((bits & ~_LOW) + np.where(up, np.uint32(0x2000), np.uint32(0))).view(np.float32)
        q = y * np.float32(2.0**24)  # subnormal range: q < 1024, exact
        n = np.floor(q)
        frac = np.floor((q - n) * np.float32(8192)).astype(np.uint32)
        sub = (n + (frac > r)) * np.float32(2.0**-24)
        out = np.where(y >= _NORMAL_MIN, normal, sub)
        out = np.where(out < F16_MAX, out, np.float32(F16_MAX))  # saturate (and NaN -> max)
    return out.astype(np.float16)  # exact: out is a float16 value
