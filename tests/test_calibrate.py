"""Calibration statistics, the ladder's distortion, the sidecar, and the tier report."""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest

from skvrt.calibrate import (DEFAULT_LADDER, MEASURED_TIERS, SIDECAR, Calibration, calibrate, collect_stats, ladder_distortion,
                             ladder_tiers, load_calibration, report)
from skvrt.errors import ModelLoadError
from skvrt.kv import make_cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 3-layer model: 2 kv heads, 2 query heads each, head_dim 16."""
    pytest.importorskip("torch", reason="tiny models are built with transformers")
    from tests.test_model_tiny import build, make_tiny

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


def test_error_tables_from_the_model_queries_and_keys(tiny):
    """collect_stats(tables=True): the tables are polar_error_tables over the first n_fit tokens' keys, each key
    weighted by the attention the n_fit tokens' queries (G heads of its kv head) give it -- recomputed here in
    float64 from the q and k a hooked cache sees, one query at a time."""
    from skvrt.kv.ada import polar_error_tables

    folder, model = tiny
    tokens = np.random.default_rng(4).integers(0, 97, size=200)
    (q_sq, _, ea, er), _ = collect_stats(model, tokens, page_size=16, held_back=0.2, tables=True)
    n_fit = 160
    cache = make_cache(model.args, 400, "full", "float32", page_size=16)
    seen_q, seen_k = {}, {}
    attend, append = cache.attend, cache.append
    cache.attend = lambda layer, q, pos: (seen_q.setdefault(layer, q.copy()), attend(layer, q, pos))[1]
    cache.append = lambda layer, k, v: (seen_k.setdefault(layer, k.copy()), append(layer, k, v))[1]
    model.forward(tokens[:n_fit], cache)
    H, G, D = 2, 2, 16
    for layer in (0, 2):
        q = seen_q[layer].astype(np.float64).reshape(H, G, n_fit, D)
        for h in range(H):
            k = seen_k[layer][h].astype(np.float64)
            mom = np.zeros((n_fit, D // 2, 3))
            for g in range(G):
                for t in range(n_fit):
                    s = k[: t + 1] @ q[h, g, t] / np.sqrt(D)
                    p = np.exp(s - s.max())
                    p /= p.sum()
                    x, y = q[h, g, t, : D // 2], q[h, g, t, D // 2 :]
                    mom[: t + 1] += p[:, None, None] * np.stack([x * x, y * y, x * y], -1)[None]
            mom /= G * n_fit
            np.testing.assert_allclose(q_sq[layer, h], np.mean(q[h] ** 2, (0, 1)), rtol=1e-4)
            want = polar_error_tables(seen_k[layer][h], mom, 16)
            np.testing.assert_allclose(ea[layer, h], want[0], rtol=1e-3, atol=1e-9)
            np.testing.assert_allclose(er[layer, h], want[1], rtol=1e-3, atol=1e-9)


def test_tables_choose_the_tiers_widths_and_roundtrip(tmp_path, capsys):
    """A sidecar with error tables: tiers take allocate_polar_bits' widths; saved and loaded unchanged; tables
    of the wrong shape or with one half missing are refused; without tables the pair-weight split remains."""
    from skvrt.kv.ada import MAX_WIDTH, allocate_bits, allocate_polar_bits, split_bits

    rng = np.random.default_rng(6)
    q, k = rng.random((2, 3, 2, 16)).astype(np.float32)
    ea, er = (rng.lognormal(0, 2, (2, 3, 2, 8, 1)) * 4.0 ** -np.arange(MAX_WIDTH + 1)).astype(np.float32)
    cal = Calibration(q, k, {"format": 1}, angle_err=ea, radius_err=er)
    tier = cal.ada_tier(32, 4, 8)
    ba, br = allocate_polar_bits(ea, er, 32)
    np.testing.assert_array_equal(tier.widths_at(), (ba, br))
    assert (ba != split_bits(ba + br)[0]).any()
    cal.save(tmp_path)
    back = load_calibration(tmp_path)
    np.testing.assert_array_equal(back.angle_err, ea)
    np.testing.assert_array_equal(back.radius_err, er)
    np.testing.assert_array_equal(back.ada_tier(32, 2, 8).widths_at(), (ba, br))
    plain = Calibration(q, k, {"format": 1})
    np.testing.assert_array_equal(plain.ada_tier(32, 4, 8).pair_bits, allocate_bits(plain.pair_weight, 32))
    plain.save(tmp_path)  # a sidecar from before the tables: loads, and says how to get them
    assert load_calibration(tmp_path).angle_err is None
    assert "run `skvrt calibrate`" in capsys.readouterr().err
    Calibration(q, k, {"format": 1}, angle_err=ea[..., :3], radius_err=er[..., :3]).save(tmp_path)
    with pytest.raises(ModelLoadError, match="angle_err"):
        load_calibration(tmp_path)
    Calibration(q, k, {"format": 1}, angle_err=ea, radius_err=er).save(tmp_path)
    from skvrt.safetensors_io import read_safetensors, write_safetensors

    t = dict(read_safetensors(tmp_path / SIDECAR))
    del t["radius_err"]
    write_safetensors(tmp_path / SIDECAR, t, metadata={"skvrt": '{"format": 1}'})
    with pytest.raises(ModelLoadError, match="without the other"):
        load_calibration(tmp_path)


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


def test_sidecar_ladder_roundtrip_old_sidecar_and_mismatch(tmp_path):
    rng = np.random.default_rng(3)
    q, k = rng.random((2, 3, 2, 16)).astype(np.float32)
    meta = {"format": 1, "ladder": [[256, 4], [128, 4], [64, 2]], "ladder_v_group": 64, "ladder_page": 64}
    d = rng.random((3, 2, 3)).astype(np.float32)
    Calibration(q, k, meta, d).save(tmp_path)
    back = load_calibration(tmp_path)
    menu = ((256, 4), (128, 4), (64, 2))
    np.testing.assert_array_equal(back.distortion(menu), d)
    np.testing.assert_array_equal(back.distortion([(256, 4), (128, 4), (64, 2)], v_group=64, page_size=64), d)
    # any ladder made of measured tiers gets their columns, in its own order
    np.testing.assert_array_equal(back.distortion(((256, 4), (64, 2))), d[..., [0, 2]])
    np.testing.assert_array_equal(back.distortion(((64, 2), (128, 4))), d[..., [2, 1]])
    assert back.distortion(((256, 4), (128, 4), (64, 4))) is None  # a tier it did not measure
    assert back.distortion(()) is None
    assert back.distortion(menu, v_group=32) is None
    assert back.distortion(menu, page_size=32) is None
    Calibration(q, k, {"format": 1}).save(tmp_path)  # a sidecar from before the ladder
    old = load_calibration(tmp_path)
    assert old.ladder_distortion is None and old.distortion(menu) is None
    Calibration(q, k, meta, d[..., :2]).save(tmp_path)  # tensor and metadata disagree
    with pytest.raises(ModelLoadError):
        load_calibration(tmp_path)


def _synthetic_held(rng, L=2, H=2, G=2, T=29, D=16):
    """held[layer] = (q (H G, T, D), k (H, T, D), v (H, T, D)); keys with a few large channels, like RoPE keys."""
    k_scale = np.exp(rng.normal(0, 1, D)).astype(np.float32)
    return [(rng.normal(0, 1, (H * G, T, D)).astype(np.float32),
             (rng.normal(0, 1, (H, T, D)) * k_scale).astype(np.float32),
             rng.normal(0, 1, (H, T, D)).astype(np.float32)) for _ in range(L)]


def _slow_terms(tier, q, k, v, lh, P, span_pages):
    """Twin of the distortion terms for one (layer, head) by loops over queries and keys, from the keys the
    codes stand for (decode_keys) and the dequantised values. q (G, T, D), k, v (T, D)."""
    n, D = len(k) // P, k.shape[1]
    data = tier.alloc(n, P, D)
    for p in range(n):
        tier.write_page(data, p, k[p * P : (p + 1) * P], v[p * P : (p + 1) * P], lh)
    k_hat = tier.decode_keys(data, np.arange(n), lh).reshape(-1, D).astype(np.float64)
    v_hat = tier.read_values(data, np.arange(n)).reshape(-1, D).astype(np.float64)
    q, k, v = (x.astype(np.float64) for x in (q, k[: n * P], v[: n * P]))
    logit_sq = drop_sq = pairs = queries = 0
    for start in range(0, n * P, span_pages * P):
        for g in range(len(q)):
            for t in range(start, min(start + span_pages * P, n * P)):
                keys = range(start, t + 1)
                s = np.array([q[g, t] @ k[j] for j in keys]) / np.sqrt(D)
                s_hat = np.array([q[g, t] @ k_hat[j] for j in keys]) / np.sqrt(D)
                p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                o = sum(pj * v[j] for pj, j in zip(p, keys))
                for i, j in enumerate(keys):
                    logit_sq += p[i] * (s_hat[i] - s[i]) ** 2  # weighted by the attention the key gets
                    drop_sq += np.sum((v[j] - o) ** 2)
                    pairs += 1
                queries += 1
    v_err = np.mean([np.sum((v_hat[j] - v[j]) ** 2) for j in range(n * P)])
    return logit_sq / queries, v_err / (drop_sq / pairs)


def test_ladder_distortion_matches_slow_twin():
    rng = np.random.default_rng(4)
    held = _synthetic_held(rng)  # 29 tokens: 3 whole pages of 8, in spans of 2 pages and 1
    cal = Calibration(rng.random((2, 2, 16)).astype(np.float32), rng.random((2, 2, 16)).astype(np.float32), {})
    # (32, 2) and (16, 4) share key codes with (32, 4) and (16, 2): their logit term is computed once
    tiers = ladder_tiers(cal, ((32, 4), (16, 2), (32, 2), (16, 4)), v_group=8)
    terms = ladder_distortion(held, tiers, page_size=8, span_pages=2)  # (L, H, n_tiers, 2)
    assert terms.shape == (2, 2, 4, 2)
    for layer, (q, k, v) in enumerate(held):
        for h in range(2):
            for i, tier in enumerate(tiers):
                ref = _slow_terms(tier, q[2 * h : 2 * h + 2], k[h], v[h], (layer, h), P=8, span_pages=2)
                np.testing.assert_allclose(terms[layer, h, i], ref, rtol=1e-4)


def test_ladder_distortion_richer_tier_less_and_lossless_near_zero(tiny):
    folder, model = tiny
    tokens = np.random.default_rng(5).integers(0, 97, size=400)
    (q, k), held = collect_stats(model, tokens, page_size=16, held_back=0.5)
    cal = Calibration(q, k, {"format": 1})
    # 12 bits per pair (the most) + 8-bit values, then poorer and poorer tiers
    tiers = ladder_tiers(cal, ((96, 8), (64, 4), (32, 4), (16, 2)), v_group=16)
    terms = ladder_distortion(held, tiers, page_size=16, span_pages=4)
    d = terms.sum(-1)  # (L, H, n_tiers)
    assert d.shape == (3, 2, 4) and np.isfinite(terms).all() and (terms >= 0).all()
    mean = d.mean(axis=(0, 1))
    assert (np.diff(mean) > 0).all(), mean
    assert (d[..., 1:] > d[..., :-1]).mean() > 0.8  # richer is better for most (layer, head) too
    assert mean[0] < 1e-3, mean


def test_calibrate_stores_the_ladder(tiny, tmp_path):
    folder, model = tiny
    llm = types.SimpleNamespace(model=model, tokenizer=types.SimpleNamespace(encode=lambda s: [ord(c) % 97 for c in s]))
    text = "".join(chr(32 + i) for i in np.random.default_rng(6).integers(0, 90, size=400))
    ladder = ((64, 8), (32, 4))
    cal, held = calibrate(llm, text, "test", ladder=ladder, return_held=True)
    assert cal.meta["held_back_tokens"] == 100 and held[0][1].shape == (2, 100, 16)
    assert [r["tier"] for r in cal.meta["ladder_mean"]] == ["ada64-v8", "ada32-v4"]
    cal.save(tmp_path)
    back = load_calibration(tmp_path)
    d = back.distortion(ladder, v_group=16)  # head_dim 16: value groups of gcd(64, 16)
    assert d.shape == (3, 2, 2) and (d[..., 0] < d[..., 1]).mean() > 0.8
    np.testing.assert_allclose(d.mean(axis=(0, 1)), [r["d"] for r in back.meta["ladder_mean"]], rtol=1e-5)
    assert back.distortion(ladder) is None and back.distortion(DEFAULT_LADDER) is None
    # by default the menu of MEASURED_TIERS, less the tiers whose key bits do not fit 8 pairs of 12 bits
    cal = calibrate(llm, text, "test")
    fit = [[kb, vb] for kb, vb in MEASURED_TIERS if kb <= 96]
    assert cal.meta["ladder"] == fit and cal.ladder_distortion.shape == (3, 2, len(fit))
    assert cal.distortion(DEFAULT_LADDER, v_group=16) is None  # 256 key bits: not measured


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


def test_pull_calibrates_again_what_an_older_skvrt_calibrated(tiny, tmp_path, monkeypatch, capsys):
    """`skvrt pull` (run by every command that loads the default model) redoes a self-generated sidecar that lacks a
    table this version measures, with a message naming it; a current one, or one a user made from their own text, is
    left alone."""
    from skvrt import store
    from skvrt.calibrate import missing_tables

    folder, _ = tiny
    monkeypatch.setenv("SKVRT_HOME", str(tmp_path / "home"))
    dest = store.model_dir(store.DEFAULT_MODEL)
    shutil.copytree(folder, dest)
    (dest / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(store, "_refresh_tokenizer", lambda source, folder: None)
    calls = []
    monkeypatch.setattr(store, "_calibrate", lambda folder: calls.append(folder))
    rng = np.random.default_rng(0)
    L, H, D = 3, 2, 16
    shape = (L, H, D // 2, 7)

    def sidecar(source="self-generated", ladder=MEASURED_TIERS, **drop):
        tables = dict(angle_err=rng.random(shape), radius_err=rng.random(shape),
                      ladder_distortion=rng.random((L, H, len(ladder))), head_sensitivity=rng.random((L, H)))
        for name in drop:
            tables[name] = None
        if "angle_err" in drop:
            tables["radius_err"] = None
        Calibration(rng.random((L, H, D)), rng.random((L, H, D)),
                    {"format": 1, "source": source, "ladder": [list(t) for t in ladder]}, **tables).save(dest)

    assert missing_tables(dest) is None  # no sidecar: pull calibrates because there is none
    assert store.pull() == dest and calls == [dest]
    sidecar()
    assert missing_tables(dest) == []
    store.pull()
    assert calls == [dest]  # current: nothing redone
    sidecar(head_sensitivity=None)
    capsys.readouterr()
    store.pull()
    assert calls == [dest, dest] and "no head_sensitivity" in capsys.readouterr().err
    sidecar(angle_err=None, ladder=((256, 4), (192, 2)))
    assert missing_tables(dest) == ["angle_err", "radius_err", "ladder_distortion of every tier in the menu"]
    sidecar(source="my-notes.txt", head_sensitivity=None)  # the user's own calibration: theirs to redo
    assert missing_tables(dest) is None
    store.pull()
    assert calls == [dest, dest]
