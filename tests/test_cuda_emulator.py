"""The CUDA emulator itself (skvrt/cuda/emu), on the small kernels of tests/cuda_emu/emu_selftest.cu: warp
shuffle semantics, atomics, dynamic shared memory, shared-memory poisoning, CUDA-rule violations reported as
errors, argument type checks, and -- the point of running several thread orders -- a deliberately broken
kernel (a shared-memory reduction missing its barrier) that the emulator catches while the correct kernel
agrees with NumPy in every order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from skvrt.cuda import emu

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no g++ for the CUDA emulator")

SOURCE = Path(__file__).parent / "cuda_emu" / "emu_selftest.cu"
NT = 128


def run(order, name, x, out, grid=1, shared_mem=0, seed=0):
    emu.load(SOURCE, {}, order, seed).get_function(name)((grid,), (NT,), (x, out), shared_mem=shared_mem)
    return out


@pytest.mark.parametrize("order", emu.ORDERS)
def test_block_sum_is_right_in_every_order(order):
    x = np.random.default_rng(1).normal(size=4 * NT).astype(np.float32)
    got = run(order, "block_sum", x, np.zeros(4, np.float32), grid=4)
    np.testing.assert_allclose(got, x.reshape(4, NT).sum(1), rtol=1e-5, atol=1e-5)


def test_missing_barrier_is_caught():
    """block_sum_missing_barrier reads s[t + stride] before other threads stored it: wrong under some orders
    (forward: thread 0 reduces before the rest of the block has stored; random), right under others
    (reverse: the stores happen first). The emulator's verdict: results differ across orders."""
    x = np.random.default_rng(2).normal(size=4 * NT).astype(np.float32)
    want = x.reshape(4, NT).sum(1)
    ok = {}
    for order in emu.ORDERS:
        got = run(order, "block_sum_missing_barrier", x, np.zeros(4, np.float32), grid=4, seed=3)
        ok[order] = bool(np.allclose(got, want, rtol=1e-5, atol=1e-5))
    assert not all(ok.values()), "the race went unnoticed in every order"
    assert ok == {"forward": False, "reverse": True, "random": False}


@pytest.mark.parametrize("order", emu.ORDERS)
def test_warp_shuffles(order):
    x = np.arange(NT, dtype=np.float32) * 3 + 1
    got = run(order, "warp_shuffles", x, np.zeros(4 * NT, np.float32)).reshape(NT, 4)
    lane, base = np.arange(NT) % 32, np.arange(NT) // 32 * 32
    np.testing.assert_array_equal(got[:, 0], x[base + (lane ^ 5)])
    np.testing.assert_array_equal(got[:, 1], x[np.where(lane + 3 < 32, np.arange(NT) + 3, np.arange(NT))])
    np.testing.assert_array_equal(got[:, 2], x[np.where(lane >= 2, np.arange(NT) - 2, np.arange(NT))])
    np.testing.assert_array_equal(got[:, 3], x[base + 7])


@pytest.mark.parametrize("order", emu.ORDERS)
def test_atomic_add_and_dynamic_shared_memory(order):
    x = np.random.default_rng(4).normal(size=3 * NT).astype(np.float32)
    np.testing.assert_allclose(run(order, "atomic_total", x, np.zeros(1, np.float32), grid=3), [x.sum()], rtol=1e-4)
    got = run(order, "dyn_smem_reverse", x[:NT].copy(), np.zeros(NT, np.float32), shared_mem=4 * NT)
    np.testing.assert_array_equal(got, x[:NT][::-1])


def test_unwritten_shared_memory_reads_nan():
    got = run("forward", "shared_uninitialised", np.ones(NT, np.float32), np.zeros(NT, np.float32))
    assert (got[: NT // 2] == 1).all() and np.isnan(got[NT // 2 :]).all()


def test_cuda_rule_violations_are_errors():
    x, out = np.zeros(NT, np.float32), np.zeros(NT, np.float32)
    with pytest.raises(emu.EmulatorError, match="__syncthreads reached by 64 threads"):
        run("forward", "divergent_barrier", x, out)
    with pytest.raises(emu.EmulatorError, match="max_dynamic_shared_size_bytes"):
        run("forward", "dyn_smem_reverse", x, out, shared_mem=64 * 1024)  # over 48 KiB without opting in
    fn = emu.load(SOURCE, {}).get_function("dyn_smem_reverse")
    fn.max_dynamic_shared_size_bytes = 64 * 1024
    fn((1,), (NT,), (x, out), shared_mem=64 * 1024)


def test_arguments_are_checked_against_the_signature():
    fn = emu.load(SOURCE, {}).get_function("block_sum")
    assert fn.signature == "pp"
    with pytest.raises(TypeError, match="takes 2 arguments"):
        fn((1,), (NT,), (np.zeros(NT, np.float32),))
    with pytest.raises(TypeError, match="pointer parameter"):
        fn((1,), (NT,), (np.zeros(NT, np.float32), 5))
