"""The model's ops backend on an NVIDIA GPU (models/llama.py Model.forward runs over it; skvrt.ops.CpuOps is the
CPU one): weights on the device, activations float32, the row ops through the RawModule kernels of
skvrt/cuda/ops.py (fused RMSNorm with the residual add, RoPE in place on the q|k|v projection, SwiGLU), matmuls
through cuBLAS.

Like the kernel wrappers it takes `module` (factory (kernels_cu stem, defines) -> module) and `xp` (cupy on a
GPU; numpy with the CPU CUDA emulator, which is how CI runs this whole path).

Numerics (weight_dtype "float16", the default):
  * weights are stored in float16 (bfloat16 is not used: CuPy 14 handles it only through the optional
    ml_dtypes package, and NumPy -- the emulator path and every twin -- has no bfloat16; Llama weights fit
    float16's range, which `matrix` checks);
  * a linear layer rounds its float32 input rows to float16 (the GEMM operand), multiplies on the tensor cores
    with float32 accumulation and writes float32: cublasGemmEx(A, B float16 -> C float32,
    CUBLAS_COMPUTE_32F) called directly, not cupy.matmul (which would also accumulate in float32 -- its
    default compute type for float16 is CUBLAS_COMPUTE_32F -- but round the *output* to float16). Under
    numpy the same math: float16-rounded operands, float32 products and sums;
  * the residual stream, RMSNorm, RoPE, softmax / attention and SwiGLU are float32; KV pages float16.
weight_dtype "float32" keeps float32 weights and float32 GEMMs (cupy.matmul; NumPy @): the same math as the CPU
model up to summation order, for exact parity checks.
"""

from __future__ import annotations

import numpy as np

from . import ops as cuda_ops
from ..ops import token_logprobs

FP16_MAX = 65504.0


class DeviceMatrix:
    """A weight matrix (out, in) on the device. w: xp array (float16 or float32); w32: numpy only, the float32
    upcast the emulated GEMM multiplies with (kept so it is not rebuilt at every call)."""

    __slots__ = ("w", "w32")

    def __init__(self, w, w32=None):
        self.w, self.w32 = w, w32

    @property
    def shape(self):
        return self.w.shape


class CudaOps:
    name = "cuda"

    def __init__(self, module, xp, weight_dtype: str = "float16"):
        if weight_dtype not in ("float16", "float32"):
            raise ValueError(f"weight dtype must be float16 or float32, not {weight_dtype!r}")
        self.module, self.xp, self.weight_dtype = module, xp, np.dtype(weight_dtype)
        self.static_pos = None  # device positions (T,) int32 of a static (graph-captured) step, else None
        self._one = np.ones(1, np.float32)  # cuBLAS alpha / beta (host pointer mode)
        self._zero = np.zeros(1, np.float32)

    # ---- weights -------------------------------------------------------------------------------------

    def matrix(self, a: np.ndarray) -> DeviceMatrix:
        a = np.asarray(a)
        if self.weight_dtype == np.float16 and a.size and float(np.abs(a).max()) > FP16_MAX:
            raise ValueError(f"a weight of magnitude {float(np.abs(a).max()):.3g} does not fit float16")
        w = np.ascontiguousarray(a, dtype=self.weight_dtype)
        if self.xp is np:
            return DeviceMatrix(w, w.astype(np.float32))
        return DeviceMatrix(self.xp.asarray(w))

    def device_matrix(self, w) -> DeviceMatrix:
        """A matrix already on the device in the weight dtype (random benchmark weights)."""
        if w.dtype != self.weight_dtype or not w.flags.c_contiguous:
            raise ValueError(f"expected a C-contiguous {self.weight_dtype} matrix, got {w.dtype}")
        return DeviceMatrix(w, w.astype(np.float32) if self.xp is np else None)

    def vector(self, a):
        return self.xp.asarray(np.ascontiguousarray(a, dtype=np.float32)) if isinstance(a, np.ndarray) else a

    # ---- ops -----------------------------------------------------------------------------------------

    def embed(self, table: DeviceMatrix, tokens):
        xp = self.xp
        idx = tokens if isinstance(tokens, xp.ndarray) else xp.asarray(np.asarray(tokens, np.int64))
        return xp.ascontiguousarray(table.w[idx].astype(np.float32))

    def rope_ctx(self, inv_freq, positions: np.ndarray):
        """-> (device positions (T,) int32, device inverse frequencies): what the rope kernel reads."""
        if self.static_pos is not None:
            return self.static_pos, inv_freq
        return self.xp.asarray(positions.astype(np.int32)), inv_freq

    def linear(self, x, m: DeviceMatrix, b=None):
        """x (T, in) float32 -> x @ w.T (+ b): (T, out) float32 (module docstring: numerics)."""
        xp = self.xp
        T = x.shape[0]
        N, K = m.w.shape
        if self.weight_dtype == np.float32:
            y = x @ m.w.T
        elif xp is np:
            y = x.astype(np.float16).astype(np.float32) @ m.w32.T
        else:
            y = xp.empty((T, N), np.float32)
            self._gemm_f16(xp.ascontiguousarray(x.astype(np.float16)), m.w, y)
        if b is not None:
            y += b
        return y

    def _gemm_f16(self, x16, w16, y32) -> None:
        """y32 (T, N) = x16 (T, K) @ w16 (N, K).T: cublasGemmEx, float16 operands, float32 accumulate / output.
        Row-major y = x w^T is column-major y^T (N x T) = w (op T on the (K x N) column-major view) x^T."""
        import cupy
        from cupy.cuda import cublas, runtime

        T, K = x16.shape
        N = w16.shape[0]
        handle = cupy.cuda.device.get_cublas_handle()
        cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, N, T, K, self._one.ctypes.data,
                      w16.data.ptr, runtime.CUDA_R_16F, K, x16.data.ptr, runtime.CUDA_R_16F, K,
                      self._zero.ctypes.data, y32.data.ptr, runtime.CUDA_R_32F, N, cublas.CUBLAS_COMPUTE_32F,
                      cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)

    def qkv_heads(self, qkv, T: int, nq: int, nkv: int, D: int, rope):
        """RoPE in place on the q and k heads of the (T, (nq + 2 nkv) D) projection -> views q (nq, T, D),
        k, v (nkv, T, D)."""
        positions, inv_freq = rope
        cuda_ops.rope(self.module, self.xp, qkv, positions, inv_freq, nq + nkv, D)
        heads = qkv.reshape(T, nq + 2 * nkv, D).transpose(1, 0, 2)
        return heads[:nq], heads[nq : nq + nkv], heads[nq + nkv :]

    def merge_heads(self, attn, T: int):
        return self.xp.ascontiguousarray(attn.transpose(1, 0, 2)).reshape(T, -1)

    def rms_norm(self, x, w, eps):
        out = self.xp.empty_like(x)
        cuda_ops.rms_norm(self.module, self.xp, x, w, float(eps), out)
        return out

    def add_rms_norm(self, x, r, w, eps):
        out = self.xp.empty_like(x)
        cuda_ops.rms_norm(self.module, self.xp, x, w, float(eps), out, residual=r)  # x += r, fused
        return out

    def add(self, x, r):
        x += r
        return x

    def swiglu(self, gu):
        out = self.xp.empty((gu.shape[0], gu.shape[1] // 2), np.float32)
        cuda_ops.swiglu(self.module, self.xp, gu, out)
        return out

    def to_host(self, a) -> np.ndarray:
        return a.get() if hasattr(a, "get") else np.asarray(a)

    def token_logprobs(self, logits, ids) -> np.ndarray:
        return token_logprobs(self.xp, logits, ids)
