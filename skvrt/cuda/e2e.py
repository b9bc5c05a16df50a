"""End-to-end parity of the GPU model path against the CPU model: the same weights, the same token ids, a
chunked prefill then single-token decode steps, logits compared at every step. Shared by the tests
(tests/test_cuda_model.py: xp = numpy, the CPU CUDA emulator) and `python -m skvrt.selftest` (the default
model on the GPU; --dry-run on the emulator).

The CPU model (NumPy float32 weights, PagedKVCache) is the reference; it is itself checked against
transformers in float32 (tests/test_model_tiny.py, tests/test_cuda_model.py). The GPU path is
Model.on(CudaOps(module, xp, weight_dtype)) with a DeviceKVCache, optionally stepping through
skvrt/cuda/graph.py DecodeStep (CUDA graphs on cupy; the same static step eagerly on numpy).

Tolerances, as |gpu - cpu|max / |cpu|max over every logit of the run (why: skvrt/cuda/model_ops.py numerics):
    weight_dtype float32   2e-3   float32 everywhere, but summation orders and the kernels' sin / cos / exp differ
                                  at ~1e-7, which flips the float16 rounding of a few cached K / V elements (one
                                  float16 step, 2^-11 relative); measured 3.6e-4 on the default model (30 layers)
    weight_dtype float16   2e-2   weights and GEMM inputs rounded to float16 too; measured 1.6e-3 there
    policy ada             1e-2 at least: besides, a key sitting on an ADA code boundary may get the
                           neighbouring code from the other encoder (check_ada_encode: >= 97 % of the fields
                           equal), an error of one code step for that token; measured 2.2e-3 on the default
                           model with a 4-token window (float32 weights)
A wrong mask, position, page or head shows as O(1) relative errors.
For `ada` only with float32 weights: the ADA codes of a key are a discontinuous function of the key, so keys
that differ by float16 rounding may get other codes; with float32 weights the GPU encoder sees the CPU's keys
(to ~1e-6) and the CPU and GPU encoders agree (skvrt/cuda/checks.py check_ada_encode).
"""

from __future__ import annotations

import numpy as np

TOLERANCE = {"float32": 2e-3, "float16": 2e-2}
ADA_TOLERANCE = 1e-2


def run_pair(cpu_model, module, xp, ids, *, n_decode: int, chunk: int = 19, kv_policy: str = "full",
             weight_dtype: str = "float16", n_ctx: int | None = None, page_size: int | None = None,
             graphs: bool = False, gpu_model=None, info: dict | None = None, **policy_opts):
    """-> (cpu logits, gpu logits) (n_chunks + n_decode, V): the last logits of every prefill chunk, then one
    row per decode step (the decode tokens are ids[len(ids) - n_decode:]). info: filled with the decode
    step's CUDA-graph captures and capture error (graphs=True)."""
    from ..kv import make_cache
    from .cache import DeviceKVCache
    from .graph import DecodeStep
    from .model_ops import CudaOps

    args = cpu_model.args
    gpu = gpu_model or cpu_model.on(CudaOps(module, xp, weight_dtype))
    n_ctx = n_ctx or len(ids) + 8
    n_pre = len(ids) - n_decode
    out = []
    for model, device in ((cpu_model, False), (gpu, True)):
        cache = make_cache(args, n_ctx, kv_policy, "float16", page_size=page_size, **policy_opts)
        if device:
            cache = DeviceKVCache(cache, module, xp)
        rows = [model.forward(ids[s : s + chunk], cache)[-1] for s in range(0, n_pre, chunk)]
        step = DecodeStep(model, cache, use_graph=True) if device and graphs else None
        for t in ids[n_pre:]:
            rows.append(step(int(t)) if step else model.forward(np.array([t]), cache)[-1])
        if step is not None and info is not None:
            info.update(graph_captures=step.captures, capture_error=step.capture_error)
        out.append(np.stack(rows))
    return out[0], out[1]


def compare(cpu_logits, gpu_logits, weight_dtype: str, kv_policy: str = "full") -> dict:
    """Figures of a run; AssertionError beyond the tolerance of weight_dtype (and the policy)."""
    tol = max(TOLERANCE[weight_dtype], ADA_TOLERANCE if kv_policy == "ada" else 0.0)
    err = float(np.abs(gpu_logits - cpu_logits).max())
    scale = float(np.abs(cpu_logits).max())
    rel = err / max(scale, 1e-30)
    agree = float((gpu_logits.argmax(-1) == cpu_logits.argmax(-1)).mean())
    stats = {"max_abs": err, "rel": rel, "argmax_agree": agree, "rows": int(len(cpu_logits))}
    if not np.isfinite(gpu_logits).all():
        raise AssertionError(f"non-finite GPU logits {stats}")
    if rel > tol:
        raise AssertionError(f"GPU logits differ from the CPU model's: {stats} (tolerance {tol})")
    return stats


# ---- tiny random llamas (tests, selftest) ----------------------------------------------------------

TINY_SHAPES = {  # query heads, kv heads, head_dim (the CUDA kernels take head_dim 64 / 128 / 256)
    "gqa3": (6, 2, 64),
    "gqa8_d128": (8, 1, 128),
    "mha": (2, 2, 64),
}


def tiny_weights(rng, nq, nkv, D, L=2, H=128, F=192, V=97, tied=True) -> dict:
    w = {"model.embed_tokens.weight": rng.normal(0, 1, (V, H)), "model.norm.weight": rng.uniform(0.5, 1.5, H)}
    if not tied:
        w["lm_head.weight"] = rng.normal(0, 0.1, (V, H))
    for i in range(L):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": rng.uniform(0.5, 1.5, H),
              p + "post_attention_layernorm.weight": rng.uniform(0.5, 1.5, H),
              p + "self_attn.q_proj.weight": rng.normal(0, 0.15, (nq * D, H)),
              p + "self_attn.k_proj.weight": rng.normal(0, 0.15, (nkv * D, H)),
              p + "self_attn.v_proj.weight": rng.normal(0, 0.1, (nkv * D, H)),
              p + "self_attn.o_proj.weight": rng.normal(0, 0.1, (H, nq * D)),
              p + "mlp.gate_proj.weight": rng.normal(0, 0.1, (F, H)), p + "mlp.up_proj.weight": rng.normal(0, 0.1, (F, H)),
              p + "mlp.down_proj.weight": rng.normal(0, 0.1, (H, F))}
    return {k: v.astype(np.float32) for k, v in w.items()}


def tiny_config(nq, nkv, D, L=2, H=128, F=192, V=97, tied=True) -> dict:
    return dict(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=L, num_attention_heads=nq,
                num_key_value_heads=nkv, head_dim=D, rope_theta=10000.0, max_position_embeddings=512,
                tie_word_embeddings=tied, rms_norm_eps=1e-5)


def tiny_model(shape: str, seed: int = 0, tied: bool = True):
    """A random 2-layer llama of a TINY_SHAPES shape (hidden 128, vocab 97) with a random ADA calibration."""
    from ..calibrate import Calibration
    from ..models import llama

    nq, nkv, D = TINY_SHAPES[shape]
    rng = np.random.default_rng(seed)
    args = llama.ModelArgs.from_config(tiny_config(nq, nkv, D, tied=tied))
    args.kv_calibration = Calibration(rng.uniform(0.1, 2, (2, nkv, D)).astype(np.float32),
                                      rng.uniform(0.1, 2, (2, nkv, D)).astype(np.float32), {})
    return llama.Model(args, tiny_weights(rng, nq, nkv, D, tied=tied))
