"""skvrt.gguf_import: GGUF -> Hugging Face folder.

Checks on the default model (needs SKVRT_TEST_GGUF): transformers loads the folder, its NLL on English
prose is that of a correct conversion (~2.1; a wrong q/k row order gives ~4.1), greedy text is right, and
the weights are bit-identical to transformers' own GGUF loader. Checks on tiny GGUFs written here with
`gguf.GGUFWriter`: the q/k un-permutation against a NumPy re-implementation of llama.cpp's converter
permute, dtypes, progress, atomic output, and one clear error per bad input.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from skvrt.errors import InputError, ModelLoadError
from skvrt.gguf_import import convert_gguf, unpermute_qk
from skvrt.safetensors_io import read_safetensors

PARAGRAPH = (
    "Water is one of the most important substances on Earth. It covers about seventy percent of the "
    "planet's surface and is found in oceans, rivers, lakes, and ice. All living things need water to survive. "
    "People use water for drinking, cooking, cleaning, and growing food. When water is heated, it turns into "
    "steam, and when it is cooled below zero degrees Celsius, it freezes into ice. Because fresh water is "
    "limited, many countries are working to protect their water supplies and reduce waste."
)


def _dtype_kw(torch):
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


# ------------------------------------------------------------------------------------- default model
def test_converted_folder_contents(converted_default):
    names = sorted(p.name for p in converted_default.iterdir())
    # the conversion's files, plus the ADA calibration sidecar `skvrt pull` adds
    assert names == ["config.json", "generation_config.json", "model.safetensors", "skvrt-convert.json",
                     "skvrt-kv.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((converted_default / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (576, 1536, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["rms_norm_eps"] == 1e-05 and cfg["rope_theta"] == 100000.0
    assert cfg["max_position_embeddings"] == 8192 and cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    tc = json.loads((converted_default / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tc["add_bos_token"] is False and tc["model_max_length"] == 8192
    assert tc["eos_token"] == "<|im_end|>" and "<|im_start|>" in tc["chat_template"]
    gen = json.loads((converted_default / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]  # <|im_end|> first, <|endoftext|> too (llama.cpp stops on both)
    tensors = read_safetensors(converted_default / "model.safetensors")
    assert len(tensors) == 1 + 1 + 30 * 9 and "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    assert sum(t.size for t in tensors.values()) == 134_515_008


@pytest.fixture(scope="module")
def hf_model(converted_default):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(converted_default), **_dtype_kw(torch))
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(converted_default))
    return model, tok


def test_transformers_nll_is_that_of_a_correct_conversion(hf_model):
    import torch

    model, tok = hf_model
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    assert ids.shape[1] > 80
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
    assert math.isfinite(nll)
    assert nll < 3.0, f"mean NLL {nll:.3f}: q/k row order (or something else) is wrong"


def test_transformers_greedy_answer(hf_model):
    import torch

    model, tok = hf_model
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.shape[1] == 37
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).startswith("The capital of France is Paris")


def test_weights_bit_identical_to_transformers_gguf_loader(converted_default, default_gguf, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    torch.set_num_threads(1)
    d = tmp_path / "gg"
    d.mkdir()
    (d / default_gguf.name).symlink_to(default_gguf.resolve())
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file=default_gguf.name,
                                                            **_dtype_kw(torch))
    theirs = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    ours = read_safetensors(converted_default / "model.safetensors")
    assert set(ours) == set(theirs)
    for k, v in ours.items():
        assert v.shape == theirs[k].shape, k
        assert np.array_equal(v.view(np.uint32), theirs[k].view(np.uint32)), k


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        convert_gguf(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


@pytest.mark.parametrize("keep", [100, 3_000_000, 60_000_000])
def test_truncated_gguf(default_gguf, tmp_path, keep):
    p = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as f:
        p.write_bytes(f.read(keep))
    with pytest.raises(ModelLoadError, match="truncated"):
        convert_gguf(p, tmp_path / "out")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["cut.gguf"]


# ----------------------------------------------------------------------------------------- tiny GGUFs
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """NumPy restatement of llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (HF -> GGUF rows)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def _byte_chars() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


TINY = dict(layers=2, hidden=16, ffn=32, heads=4, kv=2, ctx=64)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
TOKENS = SPECIALS + _byte_chars() + ["Ġt", "he", "Ġthe"]


def _hf_weights(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, f, v = TINY["hidden"], TINY["ffn"], len(TOKENS)
    hd = h // TINY["heads"]
    w = {"model.embed_tokens.weight": rng.standard_normal((v, h)), "model.norm.weight": 1 + rng.random(h)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rng.standard_normal((TINY["heads"] * hd, h))
        w[p + "self_attn.k_proj.weight"] = rng.standard_normal((TINY["kv"] * hd, h))
        w[p + "self_attn.v_proj.weight"] = rng.standard_normal((TINY["kv"] * hd, h))
        w[p + "self_attn.o_proj.weight"] = rng.standard_normal((h, TINY["heads"] * hd))
        w[p + "mlp.gate_proj.weight"] = rng.standard_normal((f, h))
        w[p + "mlp.up_proj.weight"] = rng.standard_normal((f, h))
        w[p + "mlp.down_proj.weight"] = rng.standard_normal((h, f))
        w[p + "input_layernorm.weight"] = 1 + rng.random(h)
        w[p + "post_attention_layernorm.weight"] = 1 + rng.random(h)
    return {k: (x * 0.1).astype(np.float32) for k, x in w.items()}


_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    i, module = hf.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
    return f"blk.{i}.{_TO_GGUF[module]}.weight"


def write_tiny_gguf(path: Path, weights: dict[str, np.ndarray], arch="llama", tok_model="gpt2", pre="smollm",
                    extra: dict | None = None) -> Path:
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(TINY["ctx"])
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    for hf, x in weights.items():
        if hf.endswith("q_proj.weight"):
            x = llama_cpp_permute(x, TINY["heads"])
        elif hf.endswith("k_proj.weight"):
            x = llama_cpp_permute(x, TINY["kv"])
        w.add_tensor(_gguf_name(hf), np.ascontiguousarray(x))
    for name, (arr, raw) in (extra or {}).items():
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unpermute_matches_reference_formula():
    rng = np.random.default_rng(5)
    n, d, cols = 3, 8, 5
    g = rng.standard_normal((n * d, cols)).astype(np.float32)
    hf = unpermute_qk(g, n)
    for h in range(n):
        for p in range(2):
            for i in range(d // 2):
                np.testing.assert_array_equal(hf[h * d + p * (d // 2) + i], g[h * d + 2 * i + p])
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(hf, n), n), hf)


def test_tiny_llama_roundtrips_weights(tmp_path):
    hf = _hf_weights()
    src = write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    calls = []
    out = convert_gguf(src, tmp_path / "tiny", progress=lambda d, t, n: calls.append((d, t, n)))
    got = read_safetensors(out / "model.safetensors")
    assert set(got) == set(hf)
    for k in hf:
        np.testing.assert_array_equal(got[k], hf[k], err_msg=k)
    assert [c[0] for c in calls] == list(range(1, len(hf) + 1))
    assert all(c[1] == len(hf) for c in calls) and {c[2] for c in calls} == set(hf)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["head_dim"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["tie_word_embeddings"] is True
    # the tokenizer: control tokens split out, merges applied by rank
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(out / "tokenizer.json"))
    the = TOKENS.index("Ġthe")
    assert tk.encode("<|im_start|> the").ids == [1, the]
    assert tk.encode("the").ids == [TOKENS.index("t"), TOKENS.index("he")]


def test_tiny_llama_loads_in_transformers_with_untied_head(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = _hf_weights(1)
    hf["lm_head.weight"] = np.random.default_rng(9).standard_normal(hf["model.embed_tokens.weight"].shape) \
        .astype(np.float32)
    out = convert_gguf(write_tiny_gguf(tmp_path / "t.gguf", hf), tmp_path / "t")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), **_dtype_kw(torch))
    sd = model.state_dict()
    for k, v in hf.items():
        np.testing.assert_array_equal(sd[k].numpy(), v, err_msg=k)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tiny_llama_half_dtypes(tmp_path, dtype):
    hf = _hf_weights(2)
    out = convert_gguf(write_tiny_gguf(tmp_path / "t.gguf", hf), tmp_path / "t", dtype=dtype)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    got = read_safetensors(out / "model.safetensors")
    k = "model.layers.1.self_attn.q_proj.weight"
    if dtype == "float16":
        np.testing.assert_array_equal(got[k], hf[k].astype(np.float16).astype(np.float32))
    else:
        np.testing.assert_allclose(got[k], hf[k], rtol=2 ** -8)
        assert np.all((got[k].view(np.uint32) & 0xFFFF) == 0)


def test_non_llama_architecture(tmp_path):
    src = write_tiny_gguf(tmp_path / "q.gguf", _hf_weights(), arch="qwen2")
    with pytest.raises(ModelLoadError, match="architecture 'qwen2'"):
        convert_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_gpt2_tokenizer(tmp_path):
    src = write_tiny_gguf(tmp_path / "s.gguf", _hf_weights(), tok_model="llama")
    with pytest.raises(ModelLoadError, match="tokenizer model 'llama'"):
        convert_gguf(src, tmp_path / "out")


def test_unsupported_pre_tokenizer(tmp_path):
    src = write_tiny_gguf(tmp_path / "p.gguf", _hf_weights(), pre="llama-bpe")
    with pytest.raises(ModelLoadError, match="pre-tokenizer type 'llama-bpe'"):
        convert_gguf(src, tmp_path / "out")


def test_unsupported_quant_type(tmp_path):
    gguf = pytest.importorskip("gguf")
    hf = _hf_weights()
    hf.pop("model.layers.0.mlp.down_proj.weight")
    # Q8_1 has no NumPy dequantizer. down_proj is (hidden 16, ffn 32): one 32-value Q8_1 block per row.
    q81 = gguf.GGMLQuantizationType.Q8_1
    block, type_size = gguf.GGML_QUANT_SIZES[q81]
    assert TINY["ffn"] == block
    raw = np.zeros((TINY["hidden"], type_size), np.uint8)
    src = write_tiny_gguf(tmp_path / "q.gguf", hf,
                          extra={"blk.0.ffn_down.weight": (raw, q81)})
    with pytest.raises(ModelLoadError, match="'blk.0.ffn_down.weight'.*unsupported quantization type Q8_1"):
        convert_gguf(src, tmp_path / "out")


def test_existing_output_and_overwrite(tmp_path):
    src = write_tiny_gguf(tmp_path / "t.gguf", _hf_weights())
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        convert_gguf(src, out)
    assert (out / "keep.txt").exists()
    convert_gguf(src, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "t.gguf"]


def test_interrupted_convert_leaves_nothing(tmp_path, monkeypatch):
    import skvrt.gguf_import as gi

    src = write_tiny_gguf(tmp_path / "t.gguf", _hf_weights())

    def stop(done, total, name):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, tmp_path / "out", progress=stop)
    assert sorted(os.listdir(tmp_path)) == ["t.gguf"]

    def fail_after_weights(path, obj):  # interrupted after model.safetensors went into the temp folder
        raise KeyboardInterrupt

    monkeypatch.setattr(gi, "_write_json", fail_after_weights)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(src, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["t.gguf"]
