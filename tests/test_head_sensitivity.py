"""Head sensitivity (skvrt.head_sensitivity) against a whole-sequence twin that drops keys by index, its place in the
sidecar, and the head weight it gives the spherical allocator (skvrt.kv.head_weight_from, rdr per-head drop cost)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from skvrt.calibrate import SIDECAR, Calibration, load_calibration
from skvrt.errors import InputError, ModelLoadError
from skvrt.head_sensitivity import FIRST_SCORED, FRAC, SINKS, STRIDE, WINDOW, head_sensitivity
from skvrt.kv import HEAD_WEIGHT_POWER, head_weight_from, make_cache, make_policy, rdr
from skvrt.ops import log_softmax

from .test_rdr import H, L, calibration, held, make, run_ops


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 3-layer model: 2 kv heads, 2 query heads each, head_dim 16."""
    pytest.importorskip("torch", reason="tiny models are built with transformers")
    from tests.test_model_tiny import build, make_tiny

    folder, _ = make_tiny(tmp_path_factory.mktemp("hs"), "t", num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16)
    return build(folder)[0]


def twin(model, tokens, seed=0):
    """The sensitivity the slow way: one whole float32 pass per (layer, kv head), every layer run; at every position
    and for each query head of the group, that head's attention is recomputed in float64 over the keys it keeps,
    selected by index (a fixed random FRAC of the tokens outside sinks + window dropped)."""
    a = model.args
    N, D = len(tokens), a.head_dim
    G = a.num_attention_heads // a.num_key_value_heads
    dropped = np.random.default_rng(seed).random(N) < FRAC

    def run(target):
        cache = make_cache(a, n_ctx=N, kv_dtype="float32")
        kv, mass = {}, []
        attend, append = cache.attend, cache.append

        def keep(layer, k, v):
            kv[layer] = (k.astype(np.float64), v.astype(np.float64))
            return append(layer, k, v)

        def att(layer, q, qpos):
            o = attend(layer, q, qpos)
            if target is None or layer != target[0]:
                return o
            o = np.array(o, copy=True)
            k, v = kv[layer][0][target[1]], kv[layer][1][target[1]]
            for t in range(N):
                every = np.arange(t + 1)
                kept = every[~(dropped[every] & (every >= SINKS) & (t - every > WINDOW))]
                m = 0.0
                for g in range(target[1] * G, (target[1] + 1) * G):
                    s = k @ q[g, t].astype(np.float64) * D ** -0.5
                    p_all = np.exp(s[every] - s[every].max())
                    m += 1 - p_all[kept].sum() / p_all.sum()
                    p = np.exp(s[kept] - s[kept].max())
                    o[g, t] = (p / p.sum()) @ v[kept]
                if t >= FIRST_SCORED and (t - FIRST_SCORED) % STRIDE == 0:
                    mass.append(m)
            return o

        cache.append, cache.attend = keep, att
        lp = log_softmax(model.forward(tokens, cache, all_logits=True)[FIRST_SCORED::STRIDE].astype(np.float64))
        return lp, (np.mean(mass) if mass else 0.0)

    exact, _ = run(None)
    out = np.zeros((a.num_hidden_layers, a.num_key_value_heads, 2))
    for layer in range(a.num_hidden_layers):
        for h in range(a.num_key_value_heads):
            lp, m = run((layer, h))
            out[layer, h] = (np.exp(exact) * (exact - lp)).sum(-1).mean(), m
    return out


def test_head_sensitivity_matches_the_whole_sequence_twin(tiny):
    tokens = np.random.default_rng(0).integers(0, 97, size=140)
    got = head_sensitivity(tiny, tokens)
    want = twin(tiny, tokens)
    assert (want[..., 1] > 0.05).all() and (want[..., 0] > 1e-6).all()  # every head loses mass and moves the output
    np.testing.assert_allclose(got[..., 1], want[..., 1], rtol=1e-5)
    np.testing.assert_allclose(got[..., 0], want[..., 0], rtol=2e-3, atol=1e-9)
    assert np.ptp(np.log(got[..., 0] / got[..., 1])) > 0.5  # heads differ
    with pytest.raises(ValueError, match="more than"):
        head_sensitivity(tiny, tokens[:FIRST_SCORED])


def test_forward_returns_only_the_rows_asked_for(tiny):
    """rows= (the measurement's scored positions) gives the same logits as every row's, sliced."""
    tokens = np.random.default_rng(2).integers(0, 97, size=40)
    rows = np.arange(3, 40, 5)
    every = tiny.forward(tokens, make_cache(tiny.args, n_ctx=40, kv_dtype="float32"), all_logits=True)  # (40, V)
    some = tiny.forward(tokens, make_cache(tiny.args, n_ctx=40, kv_dtype="float32"), rows=rows)  # (8, V)
    assert some.shape == (len(rows), every.shape[1])
    np.testing.assert_allclose(some, every[rows], rtol=1e-5, atol=1e-6)


def test_a_head_the_output_ignores_has_no_sensitivity(tiny):
    """Zero the output projection of kv head 1's query group in layer 1: masking keys there moves nothing."""
    a = tiny.args
    G, D = a.num_attention_heads // a.num_key_value_heads, a.head_dim
    model = copy.copy(tiny)
    model.layers = list(tiny.layers)
    layer = model.layers[1] = copy.copy(tiny.layers[1])
    layer.wo = tiny.layers[1].wo.copy()
    layer.wo[:, 1 * G * D : 2 * G * D] = 0
    tokens = np.random.default_rng(1).integers(0, 97, size=120)
    got = head_sensitivity(model, tokens)
    assert got[1, 1, 1] > 0.05 and got[1, 1, 0] == 0.0
    assert (np.delete(got[..., 0].ravel(), 1 * 2 + 1) > 1e-6).all()


def test_sidecar_keeps_the_head_sensitivity(tmp_path, capsys):
    rng = np.random.default_rng(2)
    q, k = rng.random((2, 3, 2, 16)).astype(np.float32)
    hs = rng.lognormal(-6, 1, (3, 2)).astype(np.float32)
    Calibration(q, k, {"format": 1}, head_sensitivity=hs).save(tmp_path)
    np.testing.assert_array_equal(load_calibration(tmp_path).head_sensitivity, hs)
    assert "head sensitivity" not in capsys.readouterr().err
    Calibration(q, k, {"format": 1}).save(tmp_path)  # a sidecar from before session 14
    assert load_calibration(tmp_path).head_sensitivity is None
    assert "predates head sensitivity" in capsys.readouterr().err
    for bad in (hs[:2], -hs, np.full_like(hs, np.nan)):
        Calibration(q, k, {"format": 1}, head_sensitivity=bad).save(tmp_path)
        with pytest.raises(ModelLoadError, match="head_sensitivity"):
            load_calibration(tmp_path)
    assert (tmp_path / SIDECAR).is_file()


def test_head_weight_from_the_sensitivity_and_the_option():
    s = np.array([[1e-3, 4e-3], [1e-4, 0.0]])
    w = head_weight_from(s, 0.5)
    floor = 1e-6 * 4e-3
    expect = np.sqrt(np.maximum(s, floor) / np.exp(np.log(np.maximum(s, floor)).mean()))
    np.testing.assert_allclose(w, expect)
    np.testing.assert_allclose(np.exp(np.log(w).mean()), 1.0)
    np.testing.assert_allclose(head_weight_from(s, 0), 1.0)

    cal = calibration(np.random.default_rng(0))
    assert cal.head_sensitivity is not None
    pol = make_policy("spherical", budget=0.1, calibration=cal)
    np.testing.assert_allclose(pol.head_weight, head_weight_from(cal.head_sensitivity, HEAD_WEIGHT_POWER))
    np.testing.assert_allclose(make_policy("spherical", budget=0.1, calibration=cal, head_weight=1).head_weight,
                               head_weight_from(cal.head_sensitivity, 1.0))
    assert make_policy("spherical", budget=0.1, calibration=cal, head_weight=0).head_weight is None
    old = Calibration(cal.q_sq, cal.k_range_sq, {})
    assert make_policy("spherical", budget=0.1, calibration=old).head_weight is None
    for bad in (-0.5, 5, "strong", True, float("nan")):
        with pytest.raises(InputError, match="head_weight must be"):
            make_policy("spherical", budget=0.1, calibration=cal, head_weight=bad)
    with pytest.raises(InputError, match="spherical"):
        make_policy("snapkv", budget=0.1, head_weight=0.5)


def test_a_per_head_drop_cost_is_a_per_head_distortion_scale():
    """rdr.assign with drop cost c_h per head equals scaling every distortion of head h by c_h with drop cost 1 --
    what the cache's head weight does -- and a scalar cost equals the same cost for every head."""
    rng = np.random.default_rng(3)
    n_lh, n = 4, 400
    lh = rng.integers(0, n_lh, n)
    util = rng.lognormal(0, 1, n)
    dist = np.sort(rng.uniform(0.01, 0.9, (n_lh, 2)), axis=1)
    sizes = np.array([8, 16])
    cur = np.zeros(n, np.int64)
    a, lam_a = rdr.assign(lh, cur, util, dist, sizes, 12, n_lh, drop_cost=2.0)
    b, lam_b = rdr.assign(lh, cur, util, dist, sizes, 12, n_lh, drop_cost=np.full(n_lh, 2.0))
    assert (a == b).all() and lam_a == lam_b
    c = np.array([1.0, 3.0, 0.5, 2.0])
    x, lam_x = rdr.assign(lh, cur, util, dist * c[:, None], sizes, 12, n_lh, drop_cost=c)
    y, lam_y = rdr.assign(lh, cur, util * c[lh], dist, sizes, 12, n_lh, drop_cost=1.0)
    assert (x == y).all() and lam_x == pytest.approx(lam_y, rel=1e-12)
    kept = np.bincount(lh[x <= 2], minlength=n_lh) / np.bincount(lh, minlength=n_lh)
    assert kept[1] > kept[0] > kept[2]  # the weightier a head, the more of its tokens stay


def test_the_cache_stores_a_sensitive_heads_tokens_richer():
    """Two spherical caches under the same budget and the same random use; one weighs layer 1's head 0 a hundred
    times the others: that head's old tokens get richer tiers, and every cache invariant holds (run_ops checks
    them; the budget among them)."""
    def mean_tier(weights):  # (L, H) mean tier index of the old tokens each head holds (1 = richest; drop counts
        # as the cheapest tier + 1)
        cache = make("spherical", 0.15, n_ctx=600, head_weight=1.0)
        object.__setattr__(cache.policy, "head_weight", weights)
        run_ops(cache, [64] * 8, np.random.default_rng(5))
        sinks_window = cache.policy.sinks + cache.policy.window
        out = np.zeros((L, H))
        for layer in range(L):
            for h in range(H):
                pos, tier = held(cache, layer, h)
                old = tier[tier > 0]
                gone = cache.offset - sinks_window - len(old)
                out[layer, h] = (old.sum() + gone * len(cache.pools)) / (len(old) + gone)
        return out

    even = mean_tier(np.ones((L, H)))
    w = np.ones((L, H))
    w[1, 0] = 100.0
    heavy = mean_tier(w)
    assert heavy[1, 0] < even[1, 0] - 0.5
