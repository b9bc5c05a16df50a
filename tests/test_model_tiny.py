"""Tiny random-initialised llama configs against transformers fp32 (the oracle), and cache-on decode vs a
full recompute. Covers MHA, GQA, untied heads, llama3 rope scaling, both rope_theta config forms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from skvrt.kv.cache import PagedKVCache
from skvrt.loader import load_args, load_config, load_weights

torch = pytest.importorskip("torch", reason="torch (test extra) is the transformers oracle's backend")
transformers = pytest.importorskip("transformers", reason="transformers is the oracle")

CONFIGS = {
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_untied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    "gqa_8to1_llama3_rope": dict(
        num_attention_heads=8, num_key_value_heads=1, tie_word_embeddings=False, head_dim=16,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    ),
}


def make_tiny(tmp_path, name, **over):
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)
    cfg.update(over)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**cfg)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # larger-than-default init so attention patterns are not flat
        for p in model.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    folder = tmp_path / name
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def build(folder, n_ctx=512, kv_dtype="float32", page_size=16):
    config = load_config(folder)
    arch, args = load_args(config)
    model = arch.Model(args, load_weights(folder))
    return model, PagedKVCache.for_model(args, n_ctx, kv_dtype, page_size=page_size)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_logits_match_transformers(tmp_path, name):
    folder, hf = make_tiny(tmp_path, name, **CONFIGS[name])
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 97, size=150)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    model, cache = build(folder)
    # prefill in chunks (exercises chunked attention across page boundaries: page 16, chunk 37)
    outs = [model.forward(ids[s : s + 37], cache, all_logits=True) for s in range(0, 150, 37)]
    got = np.concatenate(outs)
    assert np.abs(got - ref).max() < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_cached_decode_equals_full_recompute(tmp_path, name):
    folder, _ = make_tiny(tmp_path, name, **CONFIGS[name])
    model, cache = build(folder)
    ids = list(np.random.default_rng(2).integers(0, 97, size=20))
    logits = model.forward(np.array(ids), cache)[-1]
    for _ in range(25):  # greedy decode with the cache
        ids.append(int(logits.argmax()))
        logits = model.forward(np.array(ids[-1:]), cache)[-1]
    model2, cache2 = build(folder)
    full = model2.forward(np.array(ids), cache2, all_logits=True)[-1]
    np.testing.assert_allclose(logits, full, atol=2e-5, rtol=0)


def test_rope_theta_nested_form(tmp_path):
    """transformers 5 writes rope_parameters.rope_theta; both forms give the same model."""
    folder, hf = make_tiny(tmp_path, "nested", rope_theta=50000.0)
    cfg = json.loads((folder / "config.json").read_text())
    theta = cfg.pop("rope_theta", None) or cfg["rope_parameters"]["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    _, args = load_args(cfg)
    assert args.rope_theta == 50000.0
    cfg2 = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    cfg2["rope_theta"] = theta
    _, args2 = load_args(cfg2)
    assert args2.rope_theta == args.rope_theta


def test_fp16_cache_close_to_fp32(tmp_path):
    folder, _ = make_tiny(tmp_path, "fp16", num_attention_heads=4, num_key_value_heads=2)
    ids = np.random.default_rng(3).integers(0, 97, size=64)
    m32, c32 = build(folder, kv_dtype="float32")
    m16, c16 = build(folder, kv_dtype="float16")
    a, b = m32.forward(ids, c32, all_logits=True), m16.forward(ids, c16, all_logits=True)
    # fp16 storage rounds K/V to 11 significant bits: relative error ~5e-4 per element
    assert np.abs(a - b).max() < 5e-2
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.95


def test_sharded_checkpoint_with_index(tmp_path):
    """save_pretrained with a small shard size writes model-0000x-of-0000y.safetensors + an index."""
    folder, hf = make_tiny(tmp_path, "sharded", num_attention_heads=4, num_key_value_heads=2)
    sharded = tmp_path / "sharded_out"
    hf.save_pretrained(sharded, safe_serialization=True, max_shard_size="60KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    ids = np.random.default_rng(4).integers(0, 97, size=40)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    model, cache = build(sharded)
    assert np.abs(model.forward(ids, cache, all_logits=True) - ref).max() < 1e-4


def test_bf16_checkpoint(tmp_path):
    """bf16 weights are read without torch; the oracle is the same bf16 weights run by transformers in fp32."""
    folder, hf = make_tiny(tmp_path, "bf16src", num_attention_heads=4, num_key_value_heads=2)
    hf_bf16 = hf.to(torch.bfloat16)
    out = tmp_path / "bf16"
    hf_bf16.save_pretrained(out, safe_serialization=True)
    # the oracle loads the saved bf16 folder upcast to fp32 (so its rotary buffers are fp32, not bf16-rounded)
    hf32 = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(6).integers(0, 97, size=40)
    with torch.no_grad():
        ref = hf32(torch.tensor(ids)[None]).logits[0].numpy()
    model, cache = build(out)
    assert np.abs(model.forward(ids, cache, all_logits=True) - ref).max() < 1e-4
