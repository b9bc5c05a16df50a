"""Calibration statistics, the sidecar, and the tier report."""

from __future__ import annotations

import numpy as np
import pytest

from skvrt.calibrate import SIDECAR, Calibration, collect_stats, load_calibration, report
from skvrt.errors import ModelLoadError
from skvrt.kv import make_cache

torch = pytest.importorskip("torch", reason="tiny models are built with transformers")
from tests.test_model_tiny import build, make_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, _ = make_tiny(tmp_path_factory.mktemp("cal"), "t", num_attention_heads=4, num_key_value_heads=2,
                          head_dim=16)
    model, _ = build(folder)
    return folder, model


def test_stats_independent_of_chunking_and_match_stored_keys(tiny):
    folder, model = tiny
    tokens = np.random.default_rng(0).integers(0, 97, size=300)
    q1, k1 = collect_stats(model, tokens, page_size=16, chunk=256)
    q2, k2 = collect_stats(model, tokens, page_size=16, chunk=37)
    np.testing.assert_allclose(q1, q2, rtol=1e-4)
    np.testing.assert_allclose(k1, k2, rtol=1e-4)
    # k_range_sq from the keys a plain fp32 cache stores, computed here from the pages
    cache = make_cache(model.args, 400, "full", "float32", page_size=16)
    model.forward(tokens, cache)
    pool = cache.pools[0]
    for layer in (0, 2):
        for h in range(2):
            ids, _ = cache.table.pages(layer, h)
            full = [pid for pid in ids if pool.fill[pid] == 16]
            k = pool.k[full]  # (n, 16, D)
            ref = np.mean(np.square(k.max(1) - k.min(1)), axis=0)
            np.testing.assert_allclose(k1[layer, h], ref, rtol=1e-4)
    assert (q1 > 0).all()


def test_sidecar_roundtrip_and_corrupt(tmp_path):
    rng = np.random.default_rng(1)
    cal = Calibration(rng.random((3, 2, 16)).astype(np.float32), rng.random((3, 2, 16)).astype(np.float32),
                      {"format": 1, "source": "test"})
    cal.save(tmp_path)
    back = load_calibration(tmp_path)
    assert (back.q_sq == cal.q_sq).all() and (back.k_range_sq == cal.k_range_sq).all()
    assert back.meta["source"] == "test"
    assert back.pair_weight.shape == (3, 2, 8)
    (tmp_path / SIDECAR).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError):
        load_calibration(tmp_path)
    assert load_calibration(tmp_path / "nowhere") is None


def test_report_more_bits_less_distortion(tiny):
    folder, model = tiny
    tokens = np.random.default_rng(2).integers(0, 97, size=400)
    (q, k), held = collect_stats(model, tokens, page_size=16, held_back=0.5)
    cal = Calibration(q, k, {"format": 1})
    rows = report(cal, held, tiers=(16, 32, 64), v_bits=(4,), page_size=16)
    mse = [r["logit_rel_mse"] for r in rows]
    assert mse[0] > mse[1] > mse[2]
    assert all(0.5 < r["attn_out_cosine"] <= 1.0 + 1e-6 for r in rows)
    assert rows[0]["bytes_per_token_head"] < rows[2]["bytes_per_token_head"]


def test_default_model_is_calibrated_and_ada_generates(converted_default):
    import skvrt

    assert (converted_default / SIDECAR).is_file()  # `skvrt pull` calibrates the default model
    llm = skvrt.load(converted_default, n_ctx=512, kv_policy="ada", kv_opts={"tier": 192, "window": 16})
    assert llm.cache.policy.name == "ada192-v4"
    text = llm.generate("The history of the Roman Empire begins", max_tokens=100, temp=0)
    assert llm.cache.stats()["pages_by_tier"]["ada192-v4"] > 0  # tokens really moved to ADA pages
    assert len(text) > 100
