"""The CUDA prefill attention kernel (kernels_cu/prefill_attention.cu), run unmodified on the CPU by the project's
CUDA emulator through the same launch code as on a GPU (skvrt/cuda/prefill.py, xp = numpy), against the NumPy
twin PagedKVCache.attend (chunks of T > 1 queries: `_scores` + softmax_attend, causal by position), under the
three thread orders.

Caches are built the model's way (skvrt.cuda.checks.check_prefill: chunked appends; for ADA, old tokens moved to
ADA pages), each head's table shuffled, every float slot past fill NaN; context lengths are never multiples of the
page size, and the query chunk spans several row blocks and pages. Tolerance atol = rtol = 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from skvrt.cuda import checks, emu
from skvrt.cuda import prefill as cuda_prefill

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no g++ for the CUDA emulator")


@pytest.fixture(params=emu.ORDERS)
def module(request):
    return emu.factory(request.param, seed=13)


CASES = [  # H, G, D, P, context, chunk T, key bits (None: dense pages only), v bits, v group
    (2, 1, 64, 16, 75, 23, None, 4, 32),      # GQA 1:1, dense
    (2, 3, 64, 16, 117, 40, 128, 4, 32),      # 3:1, dense + ADA (the window's dense pages and ADA pages)
    (1, 8, 128, 16, 99, 21, 192, 2, 32),      # 8:1, head_dim 128, ADA
    (1, 3, 128, 32, 83, 83, None, 4, 32),     # the whole context is the chunk (first prefill)
    (2, 8, 64, 64, 203, 9, 40, 8, 16),        # 5-byte code rows; a short chunk (one row block)
    (1, 1, 128, 16, 150, 37, 256, 8, 64),     # 1:1, head_dim 128, 32-byte code rows
]


@pytest.mark.parametrize("H,G,D,P,n_ctx,T,key_bits,vb,vg", CASES)
def test_prefill_matches_twin(module, H, G, D, P, n_ctx, T, key_bits, vb, vg):
    assert n_ctx % P
    rng = np.random.default_rng(H * 1000 + G * 100 + D + P + n_ctx + T)
    stats, _ = checks.check_prefill(module, np, rng, H=H, G=G, D=D, P=P, n_ctx=n_ctx, T=T, key_bits=key_bits, vb=vb,
                                    vg=vg)
    assert stats["tiers"] == ("0" if key_bits is None else "0/1")  # mixed tiers where asked for


def test_launch_checks(module):
    q = np.zeros((3, 4, 48), np.float32)
    z = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match="head_dim 48"):
        cuda_prefill.prefill_attention(module, np, q, np.zeros(3, np.int32), [], [], np.zeros(4, np.int32), z, None,
                                       np.zeros(2, np.int32), 1.0, np.empty_like(q))
    q = np.zeros((3, 64, 4), np.float32).transpose(0, 2, 1)  # heads not contiguous inside a token
    with pytest.raises(ValueError, match="strides"):
        cuda_prefill.prefill_attention(module, np, q, np.zeros(3, np.int32), [], [], np.zeros(4, np.int32), z, None,
                                       np.zeros(2, np.int32), 1.0, np.empty((3, 4, 64), np.float32))
