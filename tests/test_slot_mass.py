"""Slot attention mass as float16 with stochastic rounding (skvrt.kv.slot_mass): each update lands on a float16
neighbour of the exact float32 sum, unbiased, so long accumulations of small increments keep growing where
round-to-nearest float16 stalls. The C and CUDA kernels' copies are checked against it in test_ckernels.py,
test_rdr.py and test_cuda_emu_attention.py."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from skvrt.kv import slot_mass


def neighbours(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float16 values a <= y <= b next to float32 y >= 0 (a == b when y is a float16)."""
    near = y.astype(np.float16)
    a = np.where(near.astype(np.float32) <= y, near, np.nextafter(near, np.float16(0)))
    b = np.where(near.astype(np.float32) >= y, near, np.nextafter(near, np.float16(np.inf)))
    return a, b


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-30, 12))
def test_every_update_lands_on_a_float16_neighbour_of_the_exact_sum(seed, log2_scale):
    rng = np.random.default_rng(seed)
    n = 4000
    old = np.minimum(rng.exponential(2.0**log2_scale, n), slot_mass.F16_MAX).astype(np.float16)
    x = rng.exponential(2.0**log2_scale, n).astype(np.float32) * rng.integers(0, 2, n)  # some zero increments
    keys = slot_mass.slot_keys(rng.integers(0, 5000, n), rng.integers(0, 256, n), int(rng.integers(0, 2**20)))
    got = slot_mass.accumulate(old, x, keys)
    y = old.astype(np.float32) + x
    a, b = neighbours(np.minimum(y, np.float32(slot_mass.F16_MAX)))
    assert got.dtype == np.float16
    assert ((got == a) | (got == b)).all()
    exact = (y < slot_mass.F16_MAX) & (y == np.minimum(y, slot_mass.F16_MAX).astype(np.float16).astype(np.float32))
    assert (got[exact] == y[exact]).all(), "a representable sum must stay exact"
    assert (got[x == 0] == old[x == 0]).all()


def test_rounding_is_unbiased():
    # one y between two float16 values (a normal and a subnormal case), many keys: the mean lands on y
    for y0 in (np.float32(1.0 + 2**-12 * 0.3), np.float32(3 * 2.0**-24 + 2.0**-24 * 0.7)):
        n = 200_000
        keys = slot_mass.slot_keys(np.arange(n) // 256, np.arange(n) % 256, 12345)
        got = slot_mass.accumulate(np.zeros(n, np.float16), np.full(n, y0, np.float32), keys).astype(np.float64)
        lo, hi = neighbours(np.array([y0]))
        a, b = float(lo[0]), float(hi[0])
        p_up = (y0 - a) / (b - a)
        assert set(np.unique(got)) == {a, b}
        assert abs((got == b).mean() - p_up) < 5 * np.sqrt(p_up * (1 - p_up) / n)
        assert abs(got.mean() - float(y0)) < 5 * (b - a) * np.sqrt(p_up * (1 - p_up) / n)


def test_long_accumulation_keeps_growing_where_round_to_nearest_stalls():
    # 20,000 decode steps each giving a slot 1e-3 of attention: the float64 sum is 20; float16 rounded to nearest
    # stops at 4 (the increment is below half a step there); the stochastic sums scatter around 20 with a relative
    # standard deviation of ~2 % (slot_mass's docstring) and average to it
    steps, inc = 20_000, np.float32(1e-3)
    slots = 64
    rn = np.zeros(slots, np.float16)
    sr = np.zeros(slots, np.float16)
    for step in range(steps):
        rn = (rn.astype(np.float32) + inc).astype(np.float16)
        sr = slot_mass.accumulate(sr, np.full(slots, inc), slot_mass.slot_keys(np.zeros(slots, int), np.arange(slots), step))
    exact = steps * float(inc)
    assert (rn.astype(np.float64) < 0.25 * exact).all(), "round to nearest would have kept up (the test proves nothing)"
    rel = sr.astype(np.float64) / exact - 1
    assert abs(rel.mean()) < 0.01 and np.abs(rel).max() < 0.08 and 0.005 < rel.std() < 0.04


def test_saturates_at_the_largest_float16():
    old = np.array([65000, 65504, 1.0], np.float16)
    got = slot_mass.accumulate(old, np.array([1e4, 1.0, np.inf], np.float32), np.arange(3, dtype=np.uint32))
    assert (got == np.float16(65504)).all()


def test_keys_mix_page_slot_and_seed():
    k = slot_mass.slot_keys(np.array([0, 0, 1]), np.array([0, 1, 0]), 0)
    assert len(set(k.tolist())) == 3 and k.dtype == np.uint32
    assert (slot_mass.slot_keys(np.array([3]), np.array([5]), 7) != slot_mass.slot_keys(np.array([3]), np.array([5]), 8)).all()
