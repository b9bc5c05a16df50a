"""Surprisal-weighted utility floor (Policy.surprisal): the model's forward reports each token's surprisal
-log p(token | text before it) to the cache, and the floor of the RDR utility follows it.

Oracle for the surprisal: one all-logits forward of the whole text on a full cache, log-softmax in float64."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from skvrt.kv import make_cache, make_policy
from skvrt.kv.cache import SURPRISAL_CAP, PagedKVCache
from skvrt.ops import CPU, log_softmax

from .test_rdr import D, H, L, held, make, random_keys


def test_token_logprobs_is_the_log_softmax_entry():
    rng = np.random.default_rng(0)
    logits = (rng.normal(0, 4, (5, 300)) + rng.normal(0, 20, (5, 1))).astype(np.float32)
    ids = rng.integers(0, 300, 5)
    np.testing.assert_allclose(CPU.token_logprobs(logits, ids), log_softmax(logits)[np.arange(5), ids], atol=1e-9)


def exact_rdr_cache(args, n_ctx, surprisal):
    """An rdr cache that stores every token exactly (old tier dense float32, budget of the whole context), so
    its logits are the full cache's."""
    pol = make_policy("snapkv", budget=1.0, kv_dtype="float32")
    pol = dataclasses.replace(pol, util_floor=1.0, surprisal=surprisal)
    return PagedKVCache.for_model(args, n_ctx, "float32", policy=pol)


def test_forward_reports_the_surprisal_of_every_token(loaded):
    model, tok = loaded.model, loaded.tokenizer
    ids = np.asarray(tok.encode("The pass key is 48213. Remember it. The grass is green. The sky is blue. " * 6))[:120]
    ref_cache = make_cache(model.args, n_ctx=128, kv_dtype="float32")
    ref = -log_softmax(model.forward(ids, ref_cache, all_logits=True)[:-1])[np.arange(len(ids) - 1), ids[1:]]

    cache = exact_rdr_cache(model.args, 1024, surprisal=1.0)
    assert cache.wants_surprisal
    for s in range(0, 100, 37):  # chunks: a chunk's first token takes the previous chunk's last prediction
        model.forward(ids[s : min(s + 37, 100)], cache)
    for t in range(100, 120):  # decode steps
        model.forward(ids[t : t + 1], cache)
    got = cache._surprisal[: len(ids)]
    assert np.isnan(got[0])  # nothing predicted the first token
    np.testing.assert_allclose(got[1:], ref, atol=2e-3)
    assert ref.max() > 5 and ref.min() < 0.1  # the text has surprising and predictable tokens

    cache.truncate(90)  # a new turn after 90 tokens: what the old tokens 90.. predicted is forgotten
    assert np.isnan(cache._surprisal[90:]).all()
    assert cache.predicted_logits(90) is None
    model.forward(ids[90:95], cache)
    assert np.isnan(cache._surprisal[90]) and not np.isnan(cache._surprisal[91:95]).any()


def test_caches_without_the_option_are_not_told():
    for pol, opts in (("spherical", {"surprisal": 0.0}), ("snapkv", {}), ("h2o", {}),
                      ("spherical", {"util_floor": 0.0, "surprisal": 1.0})):
        assert not make(pol, 0.25, **opts).wants_surprisal
    assert make("spherical", 0.25, surprisal=0.5).wants_surprisal
    assert make("spherical", 0.25).wants_surprisal  # the spherical default


def test_floor_follows_surprisal_relative_to_the_mean_and_caps():
    cache = make("spherical", 0.25, surprisal=1.0)
    s = np.array([np.nan, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 3.0, 30.0])
    cache.offset, cache._surprisal[:10] = 10, s
    mean = np.mean(s[1:])  # 33.8 / 9: the needle's 30 nats are 8.0 means, the cap
    pos = np.arange(10)
    assert 30 / mean > SURPRISAL_CAP > 3 / mean
    np.testing.assert_allclose(cache.floor_weights(pos), [SURPRISAL_CAP, *(s[1:9] / mean), SURPRISAL_CAP])
    half = make("spherical", 0.25, surprisal=0.5)
    half.offset, half._surprisal[:10] = 10, s
    np.testing.assert_allclose(half.floor_weights(pos), 0.5 + 0.5 * cache.floor_weights(pos))
    # the utility floor scales by these weights: a token no query attended keeps floor * weight
    cache._obs = [9]
    util = cache.utilities(pos, np.zeros(10))
    np.testing.assert_allclose(util, cache.policy.util_floor / 10 * cache.floor_weights(pos))


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_a_surprising_token_in_repeated_text_gets_a_richer_tier(share):
    """Repeated filler with one surprising token, attention uniform (zero queries): with the surprisal floor
    the surprising token is stored at a richer tier than the filler; without it, at the filler's tiers."""
    rng = np.random.default_rng(3)
    cache = make("spherical", 0.3, n_ctx=400, surprisal=share, head_weight=0)  # every head alike: a head weighed
    # down may store all its tokens at the cheapest tier (tests/test_head_sensitivity.py covers the weights)
    needle = 150
    surprisal = np.full(400, 0.01)
    surprisal[needle] = 6.0
    for s in range(0, 352, 16):
        for layer in range(L):
            cache.append(layer, np.stack([random_keys(rng, 16) for _ in range(H)]),
                         rng.normal(size=(H, 16, D)).astype(np.float32))
            cache.attend(layer, np.zeros((H * 3, 16, D), np.float32), np.arange(s, s + 16))
        if cache.wants_surprisal:  # as the model's forward does, before advance
            cache.note_surprisal(np.arange(s, s + 16), surprisal[s : s + 16], None)
        cache.advance(16)
    for layer in range(L):
        for h in range(H):
            pos, tier = held(cache, layer, h)
            tier_of = dict(zip(pos.tolist(), tier.tolist()))
            filler = np.array([tier_of.get(p, 99) for p in range(20, 300) if abs(p - needle) > 2])
            if share:
                assert tier_of[needle] < np.median(filler)
            else:
                assert tier_of.get(needle, 99) >= filler.min()
