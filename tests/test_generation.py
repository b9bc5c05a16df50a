"""Samplers, streaming detokenization, stream_generate's stop rules, and the LLM's prompt reuse / reset /
interrupt handling.

Oracles: brute-force reimplementations of every filter written here with plain Python loops; softmax for
the sampling distribution (chi-square bound); `tokenizer.decode(all ids)` for the streamed text; a fresh
LLM on the same full prompt for prompt reuse and for generation after an interrupt.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from skvrt.generate import stream_generate
from skvrt.kv.cache import PagedKVCache
from skvrt.llm import LLM
from skvrt.sample import (
    SamplerSettings,
    apply_repetition_penalty,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    make_sampler,
)
from skvrt.tokenizer import StreamingDetokenizer, Tokenizer

NEG_INF = -math.inf

# ---- brute-force references ----------------------------------------------------------------------------


def py_softmax(x) -> list[float]:
    m = max(v for v in x)
    e = [0.0 if v == NEG_INF else math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def ref_top_k(x, k):
    if k <= 0 or k >= len(x):
        return list(x)
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = set(order[:k])
    return [x[i] if i in keep else NEG_INF for i in range(len(x))]


def ref_top_p(x, p):
    """Smallest set of most likely tokens whose probability sums to >= p. -> (filtered, cumulative sums)."""
    if p >= 1.0:
        return list(x), []
    probs = py_softmax(x)
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep, cum, cums = set(), 0.0, []
    for i in order:
        keep.add(i)
        cum += probs[i]
        cums.append(cum)
        if cum >= p:
            break
    return [x[i] if i in keep else NEG_INF for i in range(len(x))], cums


def ref_min_p(x, min_p):
    if min_p <= 0:
        return list(x), []
    probs = py_softmax(x)
    thresh = min_p * max(probs)
    return [x[i] if probs[i] >= thresh else NEG_INF for i in range(len(x))], [p - thresh for p in probs]


def ref_repetition_penalty(x, history, penalty):
    out = list(x)
    if penalty == 1.0:
        return out
    for i in set(history):
        out[i] = out[i] / penalty if out[i] > 0 else out[i] * penalty
    return out


logit_arrays = hnp.arrays(
    np.float64, st.integers(2, 40), elements=st.floats(-30, 30, allow_nan=False, width=64), unique=True
)


# ---- filters vs brute force ----------------------------------------------------------------------------


@given(x=logit_arrays, k=st.integers(-1, 45))
def test_filter_top_k_matches_brute_force(x, k):
    got = filter_top_k(x, k)
    assert got.tolist() == ref_top_k(x.tolist(), k)


@given(x=logit_arrays, p=st.floats(0.01, 1.0))
def test_filter_top_p_matches_brute_force(x, p):
    ref, cums = ref_top_p(x.tolist(), p)
    assume(all(abs(c - p) > 1e-9 for c in cums))  # no cumulative sum on the boundary (rounding order)
    assert filter_top_p(x, p).tolist() == ref


@given(x=logit_arrays, p=st.floats(0.0, 1.0))
def test_filter_top_p_composes_after_top_k(x, p):
    """top-p sees top-k's -inf entries as probability 0."""
    k = max(1, len(x) // 2)
    xk = filter_top_k(x, k)
    ref, cums = ref_top_p(xk.tolist(), p)
    assume(all(abs(c - p) > 1e-9 for c in cums))
    assert filter_top_p(xk, p).tolist() == ref


@given(x=logit_arrays, m=st.floats(0.0, 1.0))
def test_filter_min_p_matches_brute_force(x, m):
    ref, margins = ref_min_p(x.tolist(), m)
    assume(all(abs(d) > 1e-12 for d in margins))
    assert filter_min_p(x, m).tolist() == ref


@given(x=logit_arrays, data=st.data(), penalty=st.floats(0.5, 3.0))
def test_repetition_penalty_matches_brute_force(x, data, penalty):
    history = data.draw(st.lists(st.integers(0, len(x) - 1), max_size=30))
    before = x.copy()
    got = apply_repetition_penalty(x, history, penalty)
    assert got.tolist() == ref_repetition_penalty(x.tolist(), history, penalty)
    assert (x == before).all()  # the input row is not modified


def test_repetition_penalty_only_looks_at_the_window():
    x = np.array([2.0, 1.9, -1.0, 0.5])
    s = make_sampler(SamplerSettings(temp=0, repetition_penalty=1.5, repetition_window=3))
    assert s(x, [0, 3, 3, 3]) == 0  # token 0 is outside the last 3 tokens: not penalized
    assert s(x, [3, 0, 3]) == 1  # inside: 2.0 / 1.5 < 1.9


# ---- make_sampler --------------------------------------------------------------------------------------


@given(x=logit_arrays, seed=st.integers(0, 2**32 - 1), top_k=st.integers(0, 5), top_p=st.floats(0.05, 1.0))
def test_temp_zero_is_argmax(x, seed, top_k, top_p):
    s = make_sampler(SamplerSettings(temp=0, seed=seed, top_k=top_k, top_p=top_p, min_p=0.1))
    assert s(x, []) == int(np.argmax(x))
    x32 = x.astype(np.float32)
    assert s(x32, []) == int(np.argmax(x32))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=50)
@given(x=logit_arrays, seed=st.integers(0, 2**32 - 1), top_k=st.integers(0, 6), top_p=st.floats(0.05, 1.0),
       min_p=st.floats(0.0, 0.5), temp=st.floats(0.2, 2.0))
def test_samples_stay_inside_the_filtered_set(x, seed, top_k, top_p, min_p, temp):
    """Order: temperature -> top-k -> top-p -> min-p; a draw never lands on a filtered-out token."""
    y = [v / temp for v in x.tolist()]
    y = ref_top_k(y, top_k)
    y, cums = ref_top_p(y, top_p)
    assume(all(abs(c - top_p) > 1e-9 for c in cums))
    y, margins = ref_min_p(y, min_p)
    assume(all(abs(d) > 1e-12 for d in margins))
    allowed = {i for i, v in enumerate(y) if v != NEG_INF}
    s = make_sampler(SamplerSettings(temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed))
    for _ in range(20):
        assert s(x, []) in allowed


def test_same_seed_same_tokens_different_seed_different():
    logits = np.random.default_rng(0).normal(0, 0.5, size=12)  # close to uniform over 12 tokens

    def draw(seed):
        s = make_sampler(SamplerSettings(temp=1.0, seed=seed))
        return [s(logits, []) for _ in range(60)]

    assert draw(123) == draw(123)
    assert draw(123) != draw(124)  # equal by chance with probability < 0.1**60
    assert len(set(draw(7))) > 1


@pytest.mark.parametrize("temp,top_k", [(1.0, 0), (0.5, 0), (1.0, 3)])
def test_sampling_distribution_matches_softmax(temp, top_k):
    rng = np.random.default_rng(42)
    logits = rng.normal(0, 1.0, size=6)
    n = 20000
    s = make_sampler(SamplerSettings(temp=temp, top_k=top_k, seed=2024))
    counts = np.bincount([s(logits, []) for _ in range(n)], minlength=6)
    expected = np.array(py_softmax(ref_top_k((logits / temp).tolist(), top_k))) * n
    kept = expected > 0
    assert (counts[~kept] == 0).all()
    chi2 = float((((counts - expected) ** 2)[kept] / expected[kept]).sum())
    # df <= 5: P(chi2 > 40) < 1e-6 under the null; a wrong temperature or filter gives chi2 in the hundreds
    assert chi2 < 40, (counts, expected)


# ---- the real tokenizer and model (loaded once) --------------------------------------------------------


@pytest.fixture(scope="module")
def tok(loaded) -> Tokenizer:
    return loaded.tokenizer  # built with generation_config.json (its EOS list)


# ---- streaming detokenizer -----------------------------------------------------------------------------

MULTIBYTE_TEXTS = [
    "héllo wörld 👋🏽 猫は可愛い",
    "naïve café — 日本語のテキスト 🎉🎉 done",
    "emoji 👨‍👩‍👧‍👦 family, Ελληνικά, русский, עברית, 한국어 ✓",
    "🙂🙃😉 ends with emoji 🚀",
    "  leading spaces\n\tand tabs 12345 ²³ ½",
]


def stream_pieces(tok, ids):
    d = StreamingDetokenizer(tok)
    return [d.add(i) for i in ids] + [d.finish()]


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_streaming_detokenizer_joins_to_decode(tok, text):
    ids = tok.encode(text)
    pieces = stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_texts_really_split_characters(tok):
    """The texts above exercise the hold-back: some single tokens are incomplete UTF-8 on their own."""
    partial = [i for t in MULTIBYTE_TEXTS for i in tok.encode(t) if "\ufffd" in tok.decode([i])]
    assert len(partial) > 10


# SmolLM2's byte-level vocabulary lacks a few bytes (0x04 0x06 0x13 0x14 0x16 0x1d, and 0xf1 0xf2, the lead
# bytes of U+40000..U+BFFFF): such characters cannot be encoded at all, so they are left out here.
ENCODABLE = st.characters(blacklist_categories=("Cs",), max_codepoint=0x3FFFF,
                          blacklist_characters="\ufffd\x04\x06\x13\x14\x16\x1d")


@settings(deadline=None, max_examples=150)
@given(text=st.text(ENCODABLE, max_size=30))
def test_streaming_detokenizer_random_text(tok, text):
    ids = tok.encode(text)
    pieces = stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@settings(deadline=None, max_examples=150)
@given(ids=st.lists(st.integers(17, 49151), max_size=12))
def test_streaming_detokenizer_random_ids(tok, ids):
    """Arbitrary ids (possibly invalid UTF-8): the pieces still join to the full decode."""
    assert "".join(stream_pieces(tok, ids)) == tok.decode(ids)


# ---- stream_generate with a scripted model -------------------------------------------------------------


class ScriptedModel:
    """Stands in for a Model: the i-th forward call returns logits whose argmax is script[i]."""

    def __init__(self, script, vocab):
        self.script, self.vocab, self.calls = list(script), vocab, 0

    def forward(self, tokens, cache, all_logits=False):
        cache.advance(len(tokens))
        logits = np.zeros((1, self.vocab), dtype=np.float32)
        logits[0, self.script[self.calls]] = 10.0
        self.calls += 1
        return logits


STREAM_TEXT = "Hello wörld 👋 — the quick brown fox jumps over the lazy dog. 猫 is cat."
GREEDY = SamplerSettings(temp=0)


def run_scripted(tok, script, max_tokens=200, stop=(), n_ctx=1024, prompt=(1, 2, 3)):
    cache = PagedKVCache(1, 1, 2, n_ctx, "float32")
    model = ScriptedModel(script, tok.vocab_size)
    out = list(stream_generate(model, cache, tok, list(prompt), make_sampler(GREEDY), max_tokens, stop))
    assert all(r.finish_reason is None for r in out[:-1]) and out[-1].finish_reason is not None
    return out, cache


def joined(out):
    return "".join(r.text for r in out)


def boundary_stops(tok):
    """Stop strings that straddle token boundaries, plus multi-byte ones and one inside a single token."""
    ids = tok.encode(STREAM_TEXT)
    text = STREAM_TEXT
    stops = []
    for i in range(1, len(ids)):
        b = len(tok.decode(ids[:i]))  # a token boundary, as a character offset
        s = text[b - 3 : b + 3]
        if b >= 3 and s.isascii() and len(s) == 6 and text.find(s) == b - 3:
            stops.append(s)
    return stops[::3] + ["👋 —", "ump", "猫 is"]


def test_stop_string_across_token_boundaries(tok):
    ids = tok.encode(STREAM_TEXT)
    eos = min(tok.eos_ids)
    stops = boundary_stops(tok)
    assert len(stops) >= 5
    for stop in stops:
        hit = STREAM_TEXT.find(stop)
        assert hit > 0
        out, _ = run_scripted(tok, ids + [eos], stop=[stop])
        assert joined(out) == STREAM_TEXT[:hit], stop
        assert out[-1].finish_reason == "stop"
        assert stop not in joined(out)
        if hit > 10:  # text before the stop string is streamed, not all held back to the end
            assert out[0].text != ""


def test_earliest_stop_string_wins(tok):
    ids = tok.encode(STREAM_TEXT)
    out, _ = run_scripted(tok, ids, stop=["lazy dog", "quick"])
    assert joined(out) == STREAM_TEXT[: STREAM_TEXT.find("quick")]
    assert out[-1].finish_reason == "stop"


def test_partial_stop_match_is_released(tok):
    """'lazy cat' shares the prefix 'lazy ' with the text: held back, then emitted when it diverges."""
    ids = tok.encode(STREAM_TEXT)
    out, _ = run_scripted(tok, ids + [min(tok.eos_ids)], stop=["lazy cat", "cat!"])
    assert joined(out) == STREAM_TEXT
    assert out[-1].finish_reason == "stop"  # by EOS
    # and at the end of the script without EOS, held-back text is flushed with finish "length"
    out, _ = run_scripted(tok, ids, max_tokens=len(ids), stop=["cat!"])
    assert joined(out) == STREAM_TEXT
    assert out[-1].finish_reason == "length"


def test_max_tokens_gives_length(tok):
    ids = tok.encode(STREAM_TEXT)
    out, _ = run_scripted(tok, ids, max_tokens=5)
    assert [r.token for r in out if r.token is not None] == ids[:5]
    assert joined(out) == tok.decode(ids[:5])
    assert out[-1].finish_reason == "length"
    out, cache = run_scripted(tok, ids, max_tokens=0)
    assert joined(out) == "" and out[-1].finish_reason == "length" and cache.offset == 3  # prompt prefilled


@pytest.mark.parametrize("which", ["im_end", "endoftext"])
def test_eos_gives_stop_and_is_not_emitted(tok, which):
    eos = tok.token_to_id({"im_end": "<|im_end|>", "endoftext": "<|endoftext|>"}[which])
    assert eos in tok.eos_ids  # <|im_end|> from tokenizer_config, <|endoftext|> from generation_config
    ids = tok.encode(STREAM_TEXT)
    out, _ = run_scripted(tok, ids[:6] + [eos] + ids[6:])
    assert joined(out) == tok.decode(ids[:6])
    assert out[-1].finish_reason == "stop"
    assert eos not in [r.token for r in out]
    assert tok.decode([eos]) not in joined(out)


def test_full_context_gives_context(tok):
    ids = tok.encode(STREAM_TEXT)
    out, cache = run_scripted(tok, ids, max_tokens=100, n_ctx=10, prompt=(1, 2, 3, 4))
    assert out[-1].finish_reason == "context"
    assert cache.offset == cache.n_ctx
    n = len([r for r in out if r.token is not None])
    assert joined(out) == tok.decode(ids[:n])


# ---- LLM: prompt reuse, reset, interrupts (real default model) -----------------------------------------

LLM_CTX = 256
# fp32 cache: reuse vs fresh differ only by the chunking of the matmuls, so logprobs agree to ~1e-5
# (with the fp16 cache, one-ulp fp16 rounding flips move logprobs by up to ~5e-3; ids still agree)
KV = "float32"


def greedy_stream(llm, prompt, max_tokens=8):
    out = list(llm.stream(prompt, max_tokens=max_tokens, temp=0))
    toks = [r.token for r in out if r.token is not None]
    return out, toks


def cache_positions(cache) -> list[list[list[int]]]:
    """positions held per (layer, head), sorted, read through the page table and fill counts."""
    res = []
    for layer in range(cache.n_layers):
        row = []
        for h in range(cache.n_kv_heads):
            ids, tiers = cache.table.pages(layer, h)
            pos = []
            for pid, t in zip(ids, tiers):
                pool = cache.pools[int(t)]
                pos.extend(pool.positions[pid, : pool.fill[pid]].tolist())
            row.append(sorted(pos))
        res.append(row)
    return res


def assert_cache_holds_exactly(cache, n):
    want = list(range(n))
    for row in cache_positions(cache):
        for pos in row:
            assert pos == want
    pool = cache.pools[0]
    assert int(pool.fill.sum()) == cache.n_layers * cache.n_kv_heads * n
    assert pool.n_used == cache.n_layers * cache.n_kv_heads * math.ceil(n / cache.page_size)
    # slots past fill are marked unused
    slot = np.arange(pool.page_size)[None, :]
    assert (pool.positions[slot >= pool.fill[:, None]] == -1).all()


def count_forward_tokens(monkeypatch, model):
    fed = []
    orig = model.forward

    def forward(tokens, cache, all_logits=False):
        fed.append(len(tokens))
        return orig(tokens, cache, all_logits)

    monkeypatch.setattr(model, "forward", forward)
    return fed


def assert_same_as_fresh(loaded, prompt, out, toks, max_tokens=8):
    fresh_out, fresh_toks = greedy_stream(LLM(loaded, n_ctx=LLM_CTX, kv_dtype=KV), prompt, max_tokens)
    assert toks == fresh_toks
    assert "".join(r.text for r in out) == "".join(r.text for r in fresh_out)
    for a, b in zip(out, fresh_out):
        if a.logprobs is not None:
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


def test_prompt_reuse_prefills_only_new_tokens(loaded, monkeypatch):
    tok = loaded.tokenizer
    llm = LLM(loaded, n_ctx=LLM_CTX, kv_dtype=KV)
    p1 = tok.encode("The capital of France is Paris. The capital of Germany is")
    _, t1 = greedy_stream(llm, p1, 6)
    assert len(t1) == 6
    # the cache holds the prompt and every sampled token but the last (never fed back)
    assert llm.cached_tokens == p1 + t1[:-1]
    assert llm.cache.offset == len(llm.cached_tokens)
    assert_cache_holds_exactly(llm.cache, llm.cache.offset)

    fed = count_forward_tokens(monkeypatch, loaded.model)
    p2 = p1 + t1 + tok.encode(" The capital of Italy is")
    out2, t2 = greedy_stream(llm, p2)
    assert fed[0] == len(p2) - len(p1 + t1[:-1])  # only the new tokens were prefilled
    assert llm.cached_tokens == (p2 + t2)[: llm.cache.offset]
    monkeypatch.undo()
    assert_same_as_fresh(loaded, p2, out2, t2)

    # a prompt that diverges from the cache keeps only the common prefix
    fed = count_forward_tokens(monkeypatch, loaded.model)
    p3 = p1[:-3] + tok.encode(" a country in Europe. Its capital is")
    common = len(p1) - 3
    assert p3[:common] == llm.cached_tokens[:common] and p3[common] != llm.cached_tokens[common]
    out3, t3 = greedy_stream(llm, p3)
    assert fed[0] == len(p3) - common
    monkeypatch.undo()
    assert_same_as_fresh(loaded, p3, out3, t3)

    # the same prompt again: only its last token is re-fed (its logits are needed)
    fed = count_forward_tokens(monkeypatch, loaded.model)
    out4, t4 = greedy_stream(llm, p3)
    assert fed[0] == 1
    assert t4 == t3
    monkeypatch.undo()


def test_reset(loaded):
    llm = LLM(loaded, n_ctx=LLM_CTX, kv_dtype=KV)
    prompt = loaded.tokenizer.encode("Water boils at")
    _, first = greedy_stream(llm, prompt)
    assert llm.cache.offset > 0
    llm.reset()
    assert llm.cache.offset == 0 and llm.cached_tokens == []
    assert llm.cache.pools[0].n_used == 0 and int(llm.cache.pools[0].fill.sum()) == 0
    assert (llm.cache.table.n_pages == 0).all()
    out, again = greedy_stream(llm, prompt)
    assert again == first
    assert_same_as_fresh(loaded, prompt, out, again)


LONG_TEXT = (
    "A list of fruits: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango, "
    "nectarine, orange, papaya, quince, raspberry, strawberry, tangerine, ugli fruit, vanilla bean, "
    "watermelon, and many more that grow in orchards and gardens all over the world."
)


@pytest.mark.parametrize("prompt_len,interrupt_at_forward", [
    (12, 1),  # during prefill
    (12, 4),  # during the third decode step
    (62, 4),  # the interrupted step writes position 64: a fresh page was allocated in half the layers
    (70, 1),  # a prefill that spans two pages
])
def test_keyboard_interrupt_mid_generation(loaded, monkeypatch, prompt_len, interrupt_at_forward):
    tok = loaded.tokenizer
    llm = LLM(loaded, n_ctx=LLM_CTX, kv_dtype=KV)
    assert llm.cache.page_size == 64
    prompt = tok.encode(LONG_TEXT)[:prompt_len]
    assert len(prompt) == prompt_len
    n_layers = loaded.model.args.num_hidden_layers
    state = {"forwards": 0}
    orig_append = llm.cache.append

    def append(layer, k, v):  # raise halfway through the layers: earlier layers already wrote K/V
        if layer == 0:
            state["forwards"] += 1
        if state["forwards"] == interrupt_at_forward and layer == n_layers // 2:
            raise KeyboardInterrupt
        orig_append(layer, k, v)

    monkeypatch.setattr(llm.cache, "append", append)
    out, toks = greedy_stream(llm, prompt, max_tokens=20)
    monkeypatch.undo()
    assert out[-1].finish_reason == "interrupted"
    assert len(toks) == interrupt_at_forward - 1
    assert "".join(r.text for r in out) == tok.decode(toks)
    expected_offset = 0 if interrupt_at_forward == 1 else len(prompt) + len(toks) - 1
    assert llm.cache.offset == expected_offset
    assert llm.cached_tokens == (prompt + toks)[:expected_offset]
    assert_cache_holds_exactly(llm.cache, llm.cache.offset)  # no half-written keys left behind

    # the next generation works, reuses what is cached, never reads a slot past `fill`, and matches a
    # fresh run
    llm.cache.pools[0].poison_unused()
    fed = count_forward_tokens(monkeypatch, loaded.model)
    p2 = prompt + toks + tok.encode(" grape,")
    out2, t2 = greedy_stream(llm, p2, 4)
    assert fed[0] == len(p2) - expected_offset
    assert out2[-1].finish_reason == "length"
    monkeypatch.undo()
    assert_same_as_fresh(loaded, p2, out2, t2, 4)


def test_llm_stop_string_with_real_model(loaded):
    llm = LLM(loaded, n_ctx=LLM_CTX, kv_dtype=KV)
    prompt = "Once upon a time, in a small village at the edge of a great forest, there lived"
    ids = loaded.tokenizer.encode(prompt)
    _, toks = greedy_stream(llm, ids, 24)
    text = loaded.tokenizer.decode(toks)
    # a stop string made of the end of token 10 and the start of token 11
    b = len(loaded.tokenizer.decode(toks[:10]))
    stop = text[b - 2 : b + 2]
    assert len(stop) == 4
    got = llm.generate(prompt, max_tokens=24, temp=0, stop=[stop])
    assert got == text[: text.find(stop)]
    assert llm.last_stats.finish_reason == "stop"
