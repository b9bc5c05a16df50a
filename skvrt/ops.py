"""NumPy float32 building blocks shared by the architectures (CPU path).

Numerics follow transformers' llama implementation (the test oracle): RMSNorm in float32 then the weight
multiply; RoPE with rotate_half and cos/sin computed in float32; softmax in float32.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: np.float32) -> np.ndarray:
    """x: (T, H) float32, weight: (H,) -> (T, H)."""
    var = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(var + eps, dtype=np.float32))).astype(np.float32, copy=False) * weight


def silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x), computed stably for large |x| in float32
    return x / (np.float32(1.0) + np.exp(-x))


def rope_tables(inv_freq: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """inv_freq: (D/2,), positions: (T,) -> cos, sin: (T, D) in the rotate_half layout (freqs repeated twice)."""
    freqs = np.outer(positions.astype(np.float32), inv_freq.astype(np.float32))  # (T, D/2)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (n_heads, T, D), cos/sin: (T, D) -> rotated x (rotate_half convention: pairs (i, i + D/2))."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def softmax_lastdim(scores: np.ndarray) -> np.ndarray:
    m = np.max(scores, axis=-1, keepdims=True)
    e = np.exp(scores - m)
    return e / np.sum(e, axis=-1, keepdims=True)


def logsumexp(x: np.ndarray) -> np.ndarray:
    """log sum exp over the last axis, in float64: (..., n) -> (..., 1). Rows need one finite entry."""
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - logsumexp(logits)


def token_logprobs(xp, logits, ids) -> np.ndarray:
    """log softmax(logits[i])[ids[i]] per row: logits (n, V) float32 (NumPy or CuPy), ids (n,) -> (n,) float64
    on the host (the log-sum-exp summed in float64)."""
    ids = xp.asarray(np.asarray(ids, np.int64))
    m = logits.max(axis=-1)  # (n,)
    lse = xp.log(xp.exp(logits - m[:, None]).sum(axis=-1, dtype=np.float64)) + m
    out = logits[xp.arange(len(ids)), ids] - lse
    return out.get() if hasattr(out, "get") else np.asarray(out)


class CpuOps:
    """The model's ops backend on the CPU: NumPy float32 (the reference path; models/llama.py Model.forward runs
    over an ops object, skvrt/cuda/model_ops.py CudaOps is the GPU one). Weights stay the float32 NumPy arrays
    they are; every method is the NumPy expression the model used inline, so results are bit for bit the same."""

    name = "cpu"
    xp = np

    def matrix(self, a: np.ndarray) -> np.ndarray:  # (out, in) float32 weight
        return a

    def vector(self, a: np.ndarray) -> np.ndarray:  # norm weights, biases, rope inverse frequencies
        return a

    def embed(self, table: np.ndarray, tokens) -> np.ndarray:
        return table[tokens]

    def rope_ctx(self, inv_freq: np.ndarray, positions: np.ndarray):
        return rope_tables(inv_freq, positions)

    def linear(self, x: np.ndarray, w: np.ndarray, b=None) -> np.ndarray:
        y = x @ w.T
        if b is not None:
            y += b
        return y

    def qkv_heads(self, qkv: np.ndarray, T: int, nq: int, nkv: int, D: int, rope):
        """(T, (nq + 2 nkv) D) -> q (nq, T, D), k (nkv, T, D) post-RoPE, v (nkv, T, D)."""
        cos, sin = rope
        heads = qkv.reshape(T, nq + 2 * nkv, D).transpose(1, 0, 2)
        return apply_rope(heads[:nq], cos, sin), apply_rope(heads[nq : nq + nkv], cos, sin), heads[nq + nkv :]

    def merge_heads(self, attn: np.ndarray, T: int) -> np.ndarray:
        return attn.transpose(1, 0, 2).reshape(T, -1)

    def rms_norm(self, x, w, eps):
        return rms_norm(x, w, eps)

    def add_rms_norm(self, x, r, w, eps):
        """x += r (in place), -> rms_norm(x) * w."""
        x += r
        return rms_norm(x, w, eps)

    def add(self, x, r):
        x += r
        return x

    def swiglu(self, gu: np.ndarray) -> np.ndarray:
        F = gu.shape[1] // 2
        return silu(gu[:, :F]) * gu[:, F:]

    def to_host(self, a) -> np.ndarray:
        return a

    def token_logprobs(self, logits: np.ndarray, ids) -> np.ndarray:
        return token_logprobs(np, logits, ids)


CPU = CpuOps()
