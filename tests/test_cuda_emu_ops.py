"""The CUDA kernels of the decode step besides attention -- kernels_cu/rms_norm.cu, rope.cu, swiglu.cu,
dense_append.cu, ada_encode.cu -- run unmodified on the CPU by the project's CUDA emulator through the same
launch code as on a GPU (skvrt/cuda/ops.py, kv_write.py with xp = numpy), against their NumPy twins
(skvrt/ops.py; PagedKVCache.append; AdaTier.write_page), under the three thread orders.

The checks themselves live in skvrt/cuda/checks.py (the GPU suite, `python -m skvrt.selftest --gpu`, runs
the same code on a GPU); their tolerances and why are written there and in each kernel's header.
"""

from __future__ import annotations

import numpy as np
import pytest

from skvrt.cuda import checks, emu, kv_write
from skvrt.cuda import ops as cuda_ops

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no g++ for the CUDA emulator")


@pytest.fixture(params=emu.ORDERS)
def module(request):
    return emu.factory(request.param, seed=11)


@pytest.mark.parametrize("T,n,residual", [(5, 576, True), (3, 4096, False), (2, 100, True), (1, 8192, True)])
def test_rms_norm(module, T, n, residual):
    checks.check_rms_norm(module, np, np.random.default_rng(n + T), T=T, n=n, residual=residual)


@pytest.mark.parametrize("T,nq,nkv,D,pos_max,theta", [
    (6, 6, 2, 64, 131072, 500000.0),   # GQA 3:1, positions to 128K (large angles: the double reduction)
    (4, 4, 4, 128, 8192, 10000.0),     # 1:1
    (3, 16, 2, 128, 32768, 500000.0),  # 8:1
    (2, 2, 1, 256, 4096, 10000.0),
])
def test_rope(module, T, nq, nkv, D, pos_max, theta):
    checks.check_rope(module, np, np.random.default_rng(D + nq), T=T, nq=nq, nkv=nkv, D=D, pos_max=pos_max,
                      theta=theta)


@pytest.mark.parametrize("T,F", [(3, 1536), (1, 100), (5, 257)])
def test_swiglu(module, T, F):
    checks.check_swiglu(module, np, np.random.default_rng(F), T=T, F=F)


@pytest.mark.parametrize("H,D,P,n_prev,T,nq,dev_pos", [
    (2, 64, 16, 21, 37, 4, False),    # continues a part-filled page, then new pages
    (3, 128, 32, 40, 29, 9, False),   # 3:1 GQA
    (1, 64, 5, 0, 1, 8, False),       # first token of an empty cache, 5-token pages
    (2, 128, 16, 16, 1, 2, False),    # a decode step that opens a new page
    (2, 64, 16, 21, 37, 4, True),     # positions from a device array (a CUDA graph's decode step)
    (2, 128, 16, 16, 1, 2, True),
])
def test_dense_append_byte_exact(module, H, D, P, n_prev, T, nq, dev_pos):
    checks.check_dense_append(module, np, np.random.default_rng(H * D + P + T), H=H, D=D, P=P, n_prev=n_prev, T=T,
                              nq=nq, device_positions=dev_pos)


@pytest.mark.parametrize("H,D,P,key_bits,vb,vg,skew", [
    (2, 64, 32, 128, 4, 32, False),
    (2, 64, 16, 40, 8, 8, True),       # 5-byte code rows; skewed allocation: 0-bit and 12-bit pairs
    (2, 128, 16, 192, 2, 64, True),
    (1, 128, 64, 256, 4, 16, False),
    (1, 256, 24, 512, 8, 32, False),   # head_dim 256, a page of 24 tokens
])
def test_ada_encode(module, H, D, P, key_bits, vb, vg, skew):
    stats, _ = checks.check_ada_encode(module, np, np.random.default_rng(D + key_bits + vb), H=H, D=D, P=P,
                                       key_bits=key_bits, vb=vb, vg=vg, skew=skew)
    assert stats["codes_same"] >= 0.97


@pytest.mark.parametrize("key_bits", [64, 192])
def test_ada_encode_polar_widths(module, key_bits):
    """Angle and radius widths chosen separately (a sidecar's error tables): 0-bit angles beside 6-bit ones."""
    stats, _ = checks.check_ada_encode(module, np, np.random.default_rng(key_bits), H=2, D=64, P=32,
                                       key_bits=key_bits, vb=4, vg=32, polar=True)
    assert stats["codes_same"] >= 0.97


def test_ada_encode_pages_decode_through_the_ada_kernel(module):
    """Pages the encode kernel wrote, read by the ADA decode kernel, give the twin's attention (the two GPU
    halves of the ADA tier agree on the format)."""
    checks.check_decode(module, np, np.random.default_rng(5), H=2, G=3, D=64, P=16, T=117, key_bits=128)


def test_suite_runs_under_the_emulator(module):
    """Every entry of the GPU suite's check list passes here (what --dry-run runs)."""
    for name, fn, kw in checks.SUITE:
        fn(module, np, np.random.default_rng(0), **kw)


def test_launch_checks(module):
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="weight: expected"):
        cuda_ops.rms_norm(module, np, x, np.zeros(7, np.float32), 1e-5, np.empty_like(x))
    with pytest.raises(ValueError, match="C-contiguous"):
        cuda_ops.rms_norm(module, np, np.zeros((8, 2), np.float32).T, np.zeros(8, np.float32), 1e-5, np.empty_like(x))
    with pytest.raises(ValueError, match="does not hold heads"):
        cuda_ops.rope(module, np, x, np.zeros(2, np.int32), np.zeros(4, np.float32), 2, 8)
    with pytest.raises(ValueError, match="gu must be"):
        cuda_ops.swiglu(module, np, np.zeros((2, 7), np.float32), np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="float32"):
        kv_write.dense_append(module, np, np.zeros((1, 2, 8), np.float16), np.zeros((1, 2, 8), np.float16),
                              None, None, None, None, None, None, 0)
