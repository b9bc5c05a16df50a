"""The real default model (SmolLM2-135M-Instruct, fp32 folder from the store) against transformers fp32.

Oracle: `transformers.AutoModelForCausalLM` / `AutoTokenizer` loaded from the same folder. Checks logits at
every position (chat-templated, English and code prompts; chunked prefill), 40+ greedy tokens, cache-on
decode vs a full recompute, the fp16 cache vs the fp32 cache, and the `skvrt.load(...).chat` API.
Everything heavy is loaded once per module.
"""

from __future__ import annotations

import numpy as np
import pytest

import skvrt
from skvrt.generate import generate_step, prefill
from skvrt.kv.cache import PagedKVCache
from skvrt.sample import SamplerSettings, make_sampler

torch = pytest.importorskip("torch", reason="torch (test extra) is the transformers oracle's backend")
transformers = pytest.importorskip("transformers", reason="transformers is the oracle")

N_CTX = 512
LOGIT_TOL = 1e-3
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
RAW_ENGLISH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press. Within fifty years"
)
RAW_CODE = (
    "def fibonacci(n):\n"
    "    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    "    a, b = 0, 1\n"
    "    for _ in range(n):\n"
    "        a, b = b, a + b\n"
    "    return a\n\n\n"
    "def is_prime(n):\n"
)
GREEDY_PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"
N_GREEDY = 48  # tokens generated; at least 40 must be compared


# ---- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_tokenizer(default_model_dir):
    return transformers.AutoTokenizer.from_pretrained(default_model_dir)


def fresh_cache(loaded, kv_dtype="float32"):
    return PagedKVCache.for_model(loaded.model.args, N_CTX, kv_dtype=kv_dtype)


def hf_logits(hf_model, ids) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([list(ids)])).logits[0].float().numpy()


def prompt_ids(loaded, kind: str) -> list[int]:
    tok = loaded.tokenizer
    if kind == "chat":
        return tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True), add_bos=False)
    return tok.encode({"english": RAW_ENGLISH, "code": RAW_CODE}[kind])


def greedy_ids(loaded, ids, n, kv_dtype) -> list[int]:
    cache = fresh_cache(loaded, kv_dtype)
    sampler = make_sampler(SamplerSettings(temp=0))
    out = []
    for token, _ in generate_step(loaded.model, cache, ids, sampler, history=list(ids)):
        out.append(token)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def greedy_fp32(loaded):
    ids = loaded.tokenizer.encode(GREEDY_PROMPT)
    return ids, greedy_ids(loaded, ids, N_GREEDY, "float32")


# ---- (a) logits at every position ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "english", "code"])
def test_tokenization_matches_transformers(loaded, hf_tokenizer, kind):
    ids = prompt_ids(loaded, kind)
    if kind == "chat":
        text = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        assert loaded.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True) == text
    else:
        text = {"english": RAW_ENGLISH, "code": RAW_CODE}[kind]
    assert ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert loaded.tokenizer.decode(ids) == text


@pytest.mark.parametrize("kind", ["chat", "english", "code"])
def test_logits_every_position_match_transformers(loaded, hf_model, kind):
    ids = prompt_ids(loaded, kind)
    assert len(ids) > 20
    ref = hf_logits(hf_model, ids)
    got = loaded.model.forward(np.array(ids), fresh_cache(loaded), all_logits=True)
    assert got.shape == ref.shape == (len(ids), loaded.model.args.vocab_size)
    assert np.abs(got - ref).max() < LOGIT_TOL
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_chunked_prefill_matches_transformers(loaded, hf_model):
    ids = prompt_ids(loaded, "english")
    assert len(ids) > 3 * 7  # several chunks of 7, the last one partial
    ref = hf_logits(hf_model, ids)
    cache = fresh_cache(loaded)
    last = prefill(loaded.model, cache, ids, chunk=7)
    assert cache.offset == len(ids)
    assert np.abs(last - ref[-1]).max() < LOGIT_TOL
    # every position, chunk by chunk through the same cache
    cache = fresh_cache(loaded)
    got = np.concatenate([loaded.model.forward(np.array(ids[s : s + 7]), cache, all_logits=True)
                          for s in range(0, len(ids), 7)])
    assert np.abs(got - ref).max() < LOGIT_TOL
    assert (got.argmax(-1) == ref.argmax(-1)).all()


# ---- (b) greedy ids vs transformers generate -----------------------------------------------------------


def test_greedy_ids_match_transformers_generate(loaded, hf_model, greedy_fp32):
    ids, ours = greedy_fp32
    eos = sorted(loaded.tokenizer.eos_ids)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=N_GREEDY, do_sample=False, eos_token_id=eos,
                                pad_token_id=eos[0])
    ref = out[0, len(ids):].tolist()
    # compare up to and including transformers' first EOS (it pads after it)
    n = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
    assert n >= 40, f"transformers stopped after {n} tokens; pick a prompt that runs longer"
    assert ours[:n] == ref[:n]


# ---- (c) cache-on decode == full recompute -------------------------------------------------------------


def test_cached_decode_equals_full_recompute(loaded):
    model = loaded.model
    ids = loaded.tokenizer.encode(RAW_CODE)
    cache = fresh_cache(loaded)
    logits = model.forward(np.array(ids), cache)[-1]
    step_logits = []
    for _ in range(16):
        ids.append(int(logits.argmax()))
        logits = model.forward(np.array(ids[-1:]), cache)[-1]
        step_logits.append(logits)
    assert cache.offset == len(ids)
    full = model.forward(np.array(ids), fresh_cache(loaded), all_logits=True)
    np.testing.assert_allclose(step_logits[-1], full[-1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.stack(step_logits), full[-16:], atol=1e-4, rtol=0)


# ---- (d) fp16 cache (default) vs fp32 cache ------------------------------------------------------------


def test_fp16_cache_same_greedy_ids_as_fp32(loaded, greedy_fp32):
    ids, ref = greedy_fp32
    assert PagedKVCache.for_model(loaded.model.args, N_CTX).pools[0].k.dtype == np.float16  # the default
    got = greedy_ids(loaded, ids, 40, "float16")
    assert got == ref[:40]


# ---- (e) the Python API --------------------------------------------------------------------------------


def test_api_chat_capital_of_france(default_model_dir, hf_tokenizer):
    llm = skvrt.load(str(default_model_dir))
    ids = llm.encode_chat(CHAT)
    ref_ids = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids == list(ref_ids)
    assert len(ids) == 37
    reply = llm.chat(CHAT, temp=0, max_tokens=32)
    assert "Paris" in reply
    assert llm.last_stats.finish_reason == "stop"  # stopped at <|im_end|>, which is not in the text
    assert "<|im_end|>" not in reply
