"""Lookahead prefill (Policy.lookahead): generate.prefill runs the prompt twice; the first pass records the
prompt's last `obs` queries per layer, the second adds to each token's RDR utility the attention those
queries give it (`PagedKVCache._prior`), computed as the token leaves the recent window; the second pass's own
queries are not observers (the prior stands for them).

Oracles: a full float32 cache (the model's own logits, and the last queries' softmax over every key computed
here in float64 from the full cache's keys)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from skvrt.errors import InputError
from skvrt.generate import prefill
from skvrt.kv import make_cache, make_policy
from skvrt.kv.attention import gather_dense
from skvrt.kv.cache import PagedKVCache

from .test_rdr import D, H, L, held, make, random_keys

TEXT = ("The pass key is 48213. Remember it. The grass is green. The sky is blue. The sun is yellow. Here we go. "
        "There and back again. ") * 8 + "What is the pass key? The pass key is"


def exact_lookahead_cache(args, n_ctx, lookahead=True, horizon=None):
    """An rdr cache that stores every token exactly (old tier dense float32, budget of the whole context): its
    first pass sees what a full cache sees."""
    pol = make_policy("snapkv", budget=1.0, kv_dtype="float32", lookahead=lookahead, horizon=horizon)
    return PagedKVCache.for_model(args, n_ctx, "float32", policy=dataclasses.replace(pol, window=16))


@pytest.mark.parametrize("horizon", [None, 0, 48])
def test_two_pass_prefill_gives_the_full_cache_logits_and_the_last_queries_attention(loaded, horizon):
    """The prior of a token: the last queries' attention to it, summed over the query group and averaged over the
    queries, times reach / G -- the same attention weighted by min(distance, horizon) / horizon, summed over the
    group and the keys, averaged over the queries (Policy.horizon; 0: no scaling)."""
    model, tok = loaded.model, loaded.tokenizer
    ids = np.asarray(tok.encode(TEXT))[:200]
    n, obs = len(ids), 32

    # oracle: a full float32 cache; record the last obs queries of every layer as the model's forward makes them
    ref = make_cache(model.args, n_ctx=256, kv_dtype="float32")
    queries = {}
    attend = ref.attend

    def hook(layer, q, qpos):
        rows = qpos >= n - obs
        if rows.any():
            queries.setdefault(layer, []).append(q[:, rows].astype(np.float64))
        return attend(layer, q, qpos)

    ref.attend = hook
    ref_logits = prefill(model, ref, ids, chunk=48)

    cache = exact_lookahead_cache(model.args, 1024, horizon=horizon)
    assert cache.wants_lookahead and cache.policy.obs == obs
    E = cache.policy.horizon
    assert E == (256 if horizon is None else horizon)
    logits = prefill(model, cache, ids, chunk=48)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-3)  # the second pass is a normal prefill
    assert cache.offset == n and cache._look_end is None

    G = model.args.num_attention_heads // model.args.num_key_value_heads
    scale = model.args.head_dim ** -0.5
    left = cache.policy.sinks + cache.n_old  # tokens that left the window: positions sinks .. left - 1
    assert left > 100
    for layer in (0, model.args.num_hidden_layers // 2, model.args.num_hidden_layers - 1):
        q = np.concatenate(queries[layer], axis=1)  # (nq, obs, D)
        for h in range(model.args.num_key_value_heads):
            ids_h, _ = ref.table.pages(layer, h)
            k, _, kpos = gather_dense(ref.pools[0], ids_h)
            s = np.einsum("gtd,jd->gtj", q[h * G : (h + 1) * G], k.astype(np.float64)) * scale  # (G, obs, n)
            s = np.where(kpos[None, None, :] > np.arange(n - obs, n)[None, :, None], -np.inf, s)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            want = np.zeros(n)
            want[kpos] = p.mean(axis=1).sum(axis=0)  # summed over the query group, mean over the queries
            if E:
                far = np.minimum(np.arange(n - obs, n)[:, None] - kpos[None, :], E) / E  # (obs, n), 0 for later keys
                want *= (p * np.maximum(far, 0)).sum(axis=(0, 2)).mean() / G
            got = cache._prior[layer * model.args.num_key_value_heads + h, :n]
            old = np.arange(cache.policy.sinks, left)
            np.testing.assert_allclose(got[old], want[old], rtol=2e-3, atol=1e-7)
            assert not got[left:].any() and not got[: cache.policy.sinks].any()  # pinned tokens never left


def test_caches_without_the_option_prefill_once(loaded):
    model, tok = loaded.model, loaded.tokenizer
    ids = np.asarray(tok.encode(TEXT))[:120]
    cache = exact_lookahead_cache(model.args, 1024, lookahead=False)
    calls = []
    cache.begin_lookahead = lambda end: calls.append(end)
    prefill(model, cache, ids, chunk=48)
    assert not cache.wants_lookahead and cache._prior is None and not calls


def test_ctrl_c_in_the_first_pass_leaves_the_cache_where_the_prompt_began(loaded):
    model, tok = loaded.model, loaded.tokenizer
    ids = np.asarray(tok.encode(TEXT))[:160]
    cache = exact_lookahead_cache(model.args, 1024)
    prefill(model, cache, ids[:40], chunk=48)  # an earlier turn
    calls = []

    class Interrupting:
        def __init__(self, inner):
            self.inner = inner

        def forward(self, tokens, c, all_logits=False):
            calls.append(len(tokens))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return self.inner.forward(tokens, c, all_logits)

    with pytest.raises(KeyboardInterrupt):
        prefill(Interrupting(model), cache, ids[40:], chunk=48)
    assert cache.offset == 40 and cache._look_end is None and cache._look_q is None
    ref = exact_lookahead_cache(model.args, 1024, lookahead=False)
    prefill(model, ref, ids[:40], chunk=48)
    np.testing.assert_allclose(prefill(model, cache, ids[40:], chunk=48), prefill(model, ref, ids[40:], chunk=48),
                               rtol=1e-4, atol=1e-3)  # the turn can be sent again


def test_lookahead_is_an_option_of_the_budgeted_policies():
    assert make_policy("snapkv", budget=0.5, lookahead="yes").lookahead
    assert not make_policy("h2o", budget=0.5).lookahead
    for policy in ("full", "window", "quant"):
        with pytest.raises(InputError, match="budgeted policies"):
            make_policy(policy, budget=0.5, lookahead=1)
    with pytest.raises(InputError, match="lookahead must be auto, true or false"):
        make_policy("snapkv", budget=0.5, lookahead="maybe")


def test_horizon_is_a_whole_number_of_tokens_of_a_budgeted_policy():
    assert make_policy("snapkv", budget=0.5).horizon == 256
    assert make_policy("snapkv", budget=0.5, horizon=0).horizon == 0
    for bad in (-1, 2.5, "far", True):
        with pytest.raises(InputError, match="horizon must be a whole number of tokens"):
            make_policy("snapkv", budget=0.5, horizon=bad)
    for policy in ("full", "window", "quant"):
        with pytest.raises(InputError, match="budgeted policies"):
            make_policy(policy, budget=0.5, horizon=64)


def feed(cache, rng, n, last_queries=None, needle=None, needle_key=None):
    """Append n random tokens (16 a chunk) to every (layer, head), random queries except at the last 8 positions
    (last_queries (D,), when given): the shape of a prefill of the synthetic caches of test_rdr."""
    rng = np.random.default_rng(rng)
    for s in range(0, n, 16):
        for layer in range(L):
            keys = np.stack([random_keys(rng, 16) for _ in range(H)])
            if needle is not None and s <= needle < s + 16:
                keys[:, needle - s] = needle_key
            q = rng.normal(0, 0.3, (H * 3, 16, D)).astype(np.float32)
            if last_queries is not None and s + 16 >= n:
                q[:, -8:] = last_queries
            cache.append(layer, keys, rng.normal(size=(H, 16, D)).astype(np.float32))
            cache.attend(layer, q, np.arange(s, s + 16))
        cache.advance(16)


@pytest.mark.parametrize("lookahead", [False, True])
def test_the_token_the_prompt_ends_asking_for_is_kept(lookahead):
    """A tight budget drops most old tokens. The prompt's last queries point at one early token (the needle): the
    second pass keeps it (and at a rich tier); without lookahead nothing tells it apart from its neighbours."""
    cache = make("snapkv", 0.45, n_ctx=400, lookahead=lookahead, obs=8)
    needle, n = 40, 352
    needle_key = random_keys(np.random.default_rng(9), 1)[0]
    q = needle_key / np.linalg.norm(needle_key) * 40  # attends to the needle and little else
    if lookahead:
        cache.begin_lookahead(n)
        feed(cache, 1, n, q, needle, needle_key)
        cache.end_lookahead(0)
        assert cache.offset == 0 and cache._look_q is not None and set(cache._look_q) == set(range(L))
    feed(cache, 1, n, q, needle, needle_key)
    kept = [set(held(cache, layer, h)[0].tolist()) for layer in range(L) for h in range(H)]
    old = np.arange(cache.policy.sinks, n - cache.policy.window - 16)
    share = np.mean([len(k & set(old.tolist())) / len(old) for k in kept])
    assert share < 0.5  # the budget drops most old tokens
    if lookahead:
        assert all(needle in k for k in kept)
    else:  # nothing told it apart from its neighbours when it left the window: dropped in some heads
        assert not all(needle in k for k in kept)


def slot_masses(cache):
    """Attention mass of every token every (layer, head) holds, in the slots of its pages."""
    out = []
    for layer in range(L):
        for h in range(H):
            for pid, t in zip(*cache.table.pages(layer, h)):
                out.append(cache.pools[t].mass[pid, : int(cache.arena.fill[pid])].astype(np.float64))
    return np.concatenate(out)


def test_second_pass_queries_are_not_observers():
    """The prompt's last queries (`_prior`) stand for the prompt's queries: the second pass adds no attention mass
    and records no observer, so a prompt token's utility is its prior + the floor, not also the mean over every
    later prompt query. Queries after the prompt (decode steps) observe as usual."""
    cache = make("snapkv", 0.45, n_ctx=400, lookahead=True, obs=8)
    plain = make("snapkv", 0.45, n_ctx=400, lookahead=False, obs=8)
    n = 352
    cache.begin_lookahead(n)
    feed(cache, 1, n)
    cache.end_lookahead(0)
    feed(cache, 1, n)
    feed(plain, 1, n)
    assert cache.offset == n and cache._obs == [] and not slot_masses(cache).any()
    assert len(plain._obs) == n // 16 * 8 and slot_masses(plain).any()  # without lookahead every chunk observes
    checked = 0
    for layer in range(L):
        for h in range(H):
            pos, _ = held(cache, layer, h)
            old = pos[(pos >= cache.policy.sinks) & (pos < cache.policy.sinks + cache.n_old)]
            if not len(old):
                continue
            lh = np.full(len(old), layer * H + h)
            want = cache._floor() * cache.floor_weights(old) + cache._prior[lh, old]
            np.testing.assert_allclose(cache.utilities(old, np.zeros(len(old)), lh), want)
            assert cache._prior[lh, old].any()
            checked += 1
    assert checked >= 2
    rng = np.random.default_rng(2)
    for step in range(3):  # decode steps after the prompt
        for layer in range(L):
            cache.append(layer, np.stack([random_keys(rng, 1) for _ in range(H)]),
                         rng.normal(size=(H, 1, D)).astype(np.float32))
            cache.attend(layer, rng.normal(0, 0.3, (H * 3, 1, D)).astype(np.float32), np.array([n + step]))
        cache.advance(1)
    assert cache._obs == [n, n + 1, n + 2] and slot_masses(cache).any()


def old_tokens_held(cache, n):
    return sum(int(((pos >= cache.policy.sinks) & (pos < n)).sum())
               for pos in (held(cache, layer, h)[0] for layer in range(L) for h in range(H)))


@pytest.mark.parametrize("horizon", [0, 256])
def test_the_second_pass_fills_the_budget_like_one_pass(horizon):
    """The first pass ends with the allocator's multiplier priced for its own utilities (attention mass). The
    second pass's are the prior, on another scale: placing its first departures at that stale multiplier, without a
    search, dropped every old token of every head (horizon 256) while the budget had room for ~240. After the
    truncation the allocator searches afresh, so the second pass holds about what one pass holds."""
    n = 352
    plain = make("snapkv", 0.45, n_ctx=400, lookahead=False, obs=8)
    feed(plain, 1, n)
    cache = make("snapkv", 0.45, n_ctx=400, lookahead=True, obs=8, horizon=horizon)
    cache.begin_lookahead(n)
    feed(cache, 1, n)
    cache.end_lookahead(0)
    feed(cache, 1, n)
    want = old_tokens_held(plain, n - plain.policy.window)
    assert want > 150
    assert old_tokens_held(cache, n - cache.policy.window) >= 0.8 * want


def test_spherical_looks_ahead_by_default_only_when_tokens_will_be_dropped():
    """auto (the spherical default): a second pass only when the budget cannot hold the whole context at the
    cheapest tier -- when nothing will be dropped, the prior would only move tokens between precisions."""
    loose, tight = make("spherical", 0.3, n_ctx=400), make("spherical", 0.15, n_ctx=400)
    assert loose.holds_all and loose.keeps_all and not loose.wants_lookahead
    assert not tight.holds_all and tight.wants_lookahead and tight._prior.shape == (L * H, 400)
    assert make("spherical", 0.3, n_ctx=400, lookahead=1).wants_lookahead
    assert not make("spherical", 0.15, n_ctx=400, lookahead="off").wants_lookahead
    assert make_policy("snapkv", budget=0.5, lookahead="auto").lookahead is None
    assert not make("h2o", 0.5, n_ctx=400).wants_lookahead  # the baselines prefill once unless asked
