"""Llama-family decoder (SmolLM/SmolLM2, Llama 2/3, TinyLlama) on NumPy float32.

References: transformers `modeling_llama.py` (numerics, weight names), mlx-lm `models/llama.py` (layout).
The KV cache is handed to `Model.forward`; attention over cached tokens is the cache's job, so the model
never assumes keys are stored dense.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .. import ops
from ..errors import ConfigError, ModelLoadError

REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclasses.dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    model_type: str = "llama"
    kv_calibration: object = dataclasses.field(default=None, repr=False)  # skvrt.calibrate.Calibration or None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a config.json dict; unknown keys are ignored, derived defaults filled in."""
        missing = [k for k in REQUIRED if config.get(k) is None]
        rope = config.get("rope_parameters") or {}
        theta = config.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            missing.append("rope_theta")
        if missing:
            raise ConfigError(f"config.json is missing required field(s): {', '.join(missing)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields and v is not None}
        kwargs["rope_theta"] = float(theta)
        scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        kwargs["rope_scaling"] = scaling
        args = cls(**kwargs)
        args.validate()
        return args

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (llama uses 'silu')")
        rope_inv_freq(self)  # raises on unsupported rope scaling

    @property
    def n_rep(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


def rope_inv_freq(args: ModelArgs) -> np.ndarray:
    """(head_dim/2,) float32 inverse frequencies, with llama3 / linear rope_scaling applied."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    inv = inv.astype(np.float32)
    sc = args.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return (inv / np.float32(sc["factor"])).astype(np.float32)
    if kind == "llama3":
        # transformers `_compute_llama3_parameters`
        factor = sc["factor"]
        low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_ctx = sc["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, out).astype(np.float32)
    raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


_LAYER_MATRICES = ("wqkv", "wo", "wgu", "wdown")
_LAYER_VECTORS = ("input_norm", "post_norm", "bqkv", "bo")


class Layer:
    """One decoder block's weights, fused for fewer GEMMs: qkv (out, in) and gate|up (2F, in). Arrays as the
    ops backend holds them (CPU: float32 NumPy; CUDA: device arrays, skvrt/cuda/model_ops.py)."""

    def __init__(self, args: ModelArgs, w: dict[str, np.ndarray], i: int):
        p = f"model.layers.{i}."
        get = lambda name: _take(w, p + name)  # noqa: E731
        self.input_norm = get("input_layernorm.weight")
        self.post_norm = get("post_attention_layernorm.weight")
        q, k, v = get("self_attn.q_proj.weight"), get("self_attn.k_proj.weight"), get("self_attn.v_proj.weight")
        self.wqkv = np.ascontiguousarray(np.concatenate([q, k, v], axis=0))  # ((nq+2nkv)*D, H)
        self.bqkv = None
        if args.attention_bias:
            bq, bk, bv = get("self_attn.q_proj.bias"), get("self_attn.k_proj.bias"), get("self_attn.v_proj.bias")
            self.bqkv = np.concatenate([bq, bk, bv])
        self.wo = get("self_attn.o_proj.weight")  # (H, nq*D)
        self.bo = get("self_attn.o_proj.bias") if args.attention_bias else None
        g, u = get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")
        self.wgu = np.ascontiguousarray(np.concatenate([g, u], axis=0))  # (2F, H)
        self.wdown = get("mlp.down_proj.weight")  # (H, F)

    @classmethod
    def from_arrays(cls, **arrays) -> "Layer":
        """A layer from prepared arrays (wqkv, wo, wgu, wdown, input_norm, post_norm[, bqkv, bo])."""
        layer = cls.__new__(cls)
        for name in (*_LAYER_MATRICES, *_LAYER_VECTORS):
            setattr(layer, name, arrays.get(name))
        return layer

    def mapped(self, ops) -> "Layer":
        """This layer's weights moved to an ops backend (matrices via ops.matrix, vectors via ops.vector)."""
        out = {n: ops.matrix(getattr(self, n)) for n in _LAYER_MATRICES}
        out |= {n: None if getattr(self, n) is None else ops.vector(getattr(self, n)) for n in _LAYER_VECTORS}
        return Layer.from_arrays(**out)


def _take(w: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in w:
        raise ModelLoadError(f"weight {name!r} is missing from the checkpoint")
    return np.ascontiguousarray(w.pop(name), dtype=np.float32)


def sanitize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map checkpoint names to HF llama names (drops rotary buffers some checkpoints carry)."""
    return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}


class Model:
    """forward(tokens, cache) -> logits. Shapes (out_features, in_features) as in HF.

    One code path over an ops backend (`self.ops`): skvrt.ops.CPU (NumPy float32 weights, the C / NumPy
    attention of PagedKVCache) or skvrt.cuda.model_ops.CudaOps (weights on the GPU, RawModule kernels, cuBLAS
    GEMMs, attention by skvrt.cuda.cache.DeviceKVCache). `Model.on(ops)` moves a loaded model to a backend."""

    def __init__(self, args: ModelArgs, weights: dict[str, np.ndarray]):
        self.args = args
        self.ops = ops.CPU
        w = sanitize(dict(weights))
        self.embed = _take(w, "model.embed_tokens.weight")  # (V, H)
        if self.embed.shape != (args.vocab_size, args.hidden_size):
            raise ModelLoadError(
                f"model.embed_tokens.weight has shape {self.embed.shape}, config says "
                f"({args.vocab_size}, {args.hidden_size})"
            )
        self.layers = [Layer(args, w, i) for i in range(args.num_hidden_layers)]
        self.norm = _take(w, "model.norm.weight")
        if "lm_head.weight" in w and not args.tie_word_embeddings:
            self.lm_head = _take(w, "lm_head.weight")
        elif args.tie_word_embeddings:
            w.pop("lm_head.weight", None)
            self.lm_head = self.embed
        else:
            raise ModelLoadError("lm_head.weight is missing and tie_word_embeddings is false")
        self.inv_freq = rope_inv_freq(args)
        self.rope_freq = self.inv_freq  # as the backend holds it
        self.eps = np.float32(args.rms_norm_eps)

    @classmethod
    def from_arrays(cls, args: ModelArgs, backend, embed, layers: list[Layer], norm, lm_head=None) -> "Model":
        """A model from weights already held by `backend` (e.g. random device weights for benchmarks);
        lm_head None: tied to embed."""
        m = cls.__new__(cls)
        m.args, m.ops, m.embed, m.layers, m.norm = args, backend, embed, layers, norm
        m.lm_head = embed if lm_head is None else lm_head
        m.inv_freq = rope_inv_freq(args)
        m.rope_freq = backend.vector(m.inv_freq)
        m.eps = np.float32(args.rms_norm_eps)
        return m

    def on(self, backend) -> "Model":
        """This model with its weights moved to another ops backend (the CPU model is left as it is)."""
        embed = backend.matrix(self.embed)
        lm_head = None if self.lm_head is self.embed else backend.matrix(self.lm_head)
        return Model.from_arrays(self.args, backend, embed, [layer.mapped(backend) for layer in self.layers],
                                 backend.vector(self.norm), lm_head)

    @property
    def n_layers(self) -> int:
        return self.args.num_hidden_layers

    def forward(self, tokens, cache, all_logits: bool = False, start=None, taps=None, rows=None) -> np.ndarray:
        """tokens: (T,) ids appended after the cache's contents -> logits (T, V) or (1, V) for the last token,
        a host (NumPy) float32 array.

        The cache stores the new keys/values of every layer and computes attention over everything it holds.
        For calibration (skvrt.head_sensitivity): start = (layer, x) runs only the layers from `layer` on, on the
        residual stream x (T, hidden) entering it (the cache's earlier layers get nothing); taps, a list, receives
        a copy of the residual stream entering each layer that runs; rows, indices into tokens, returns the logits
        of those rows only (R, V), as llama.cpp's per-token output flags (the vocabulary projection is the cost).
        """
        return self.ops.to_host(self.forward_device(tokens, cache, all_logits, start, taps, rows))

    def forward_device(self, tokens, cache, all_logits: bool = False, start=None, taps=None, rows=None):
        """forward, logits left where the backend computed them (CPU: the same NumPy array)."""
        a, be = self.args, self.ops
        T = len(tokens)
        nq, nkv, D = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        positions = np.arange(cache.offset, cache.offset + T, dtype=np.int64)  # (T,)
        rope = be.rope_ctx(self.rope_freq, positions)  # CPU: cos, sin (T, D); CUDA: device positions
        first, x = (0, be.embed(self.embed, tokens)) if start is None else (start[0], start[1].copy())  # (T, H)
        h = be.rms_norm(x, self.layers[first].input_norm, self.eps) if first < len(self.layers) else None
        for li in range(first, len(self.layers)):
            layer = self.layers[li]
            if taps is not None:
                taps.append(x.copy())
            qkv = be.linear(h, layer.wqkv, layer.bqkv)  # (T, (nq + 2 nkv) D)
            q, k, v = be.qkv_heads(qkv, T, nq, nkv, D, rope)  # (nq | nkv, T, D), q and k post-RoPE
            cache.append(li, k, v)
            attn = cache.attend(li, q, positions)  # (nq, T, D)
            o = be.linear(be.merge_heads(attn, T), layer.wo, layer.bo)  # (T, H)
            h = be.add_rms_norm(x, o, layer.post_norm, self.eps)  # x += o
            down = be.linear(be.swiglu(be.linear(h, layer.wgu)), layer.wdown)  # (T, H)
            if li + 1 < len(self.layers):
                h = be.add_rms_norm(x, down, self.layers[li + 1].input_norm, self.eps)  # x += down
            else:
                x = be.add(x, down)
        if getattr(cache, "wants_surprisal", False):
            logits = be.linear(be.rms_norm(x, self.norm, self.eps), self.lm_head)  # (T, V)
            self._note_surprisal(tokens, positions, logits, cache)
            cache.advance(T)
            return logits[rows] if rows is not None else logits if all_logits else logits[-1:]
        cache.advance(T)
        x = x[rows] if rows is not None else x if all_logits else x[-1:]
        x = be.rms_norm(x, self.norm, self.eps)
        return be.linear(x, self.lm_head)  # (T or 1, V)

    def _note_surprisal(self, tokens, positions: np.ndarray, logits, cache) -> None:
        """Give the cache each token's surprisal -log p(token | the text before it), as this model predicted it:
        logits (T, V) of this forward predict tokens[1:]; the previous forward's last row (the cache keeps it)
        predicted tokens[0] (unknown, NaN, when there was none)."""
        ids = np.asarray(tokens, np.int64)
        s = np.full(len(ids), np.nan)
        if len(ids) > 1:
            s[1:] = -self.ops.token_logprobs(logits[:-1], ids[1:])
        prev = cache.predicted_logits(int(positions[0]))  # (V,) or None
        if prev is not None:
            s[0] = -self.ops.token_logprobs(prev[None], ids[:1])[0]
        cache.note_surprisal(positions, s, logits[-1].copy())
