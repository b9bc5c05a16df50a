"""`skvrt eval sweep` (skvrt/sweep.py) on the tiny random llama of test_evaluate: settings fitted to budgets,
every row's bytes within its budget, the markdown table, the JSON and the PNG plot, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from skvrt import evaluate as ev
from skvrt import sweep
from skvrt.errors import InputError
from skvrt.kv import make_cache

from .test_evaluate import tiny, tokens  # noqa: F401  (fixtures)


def test_parse_budgets_and_policies():
    assert sweep.parse_budgets("50,25,12.5,6.25") == [0.5, 0.25, 0.125, 0.0625]
    assert sweep.parse_budgets("10%") == [0.1]
    for bad in ("", "abc", "0", "150"):
        with pytest.raises(InputError, match="--budgets"):
            sweep.parse_budgets(bad)
    assert sweep.parse_policies("window, h2o") == ["window", "h2o"]
    with pytest.raises(InputError, match="valid: .*spherical"):
        sweep.parse_policies("window,lru")


def test_fitted_settings_fit_and_are_the_richest(tiny):
    args = tiny[1].model.args
    N = 1024
    fp16 = N * args.num_hidden_layers * args.num_key_value_heads * 2 * args.head_dim * 2
    for b in (0.5, 0.25):
        w = sweep.fit_policy(args, "window", b, N)
        assert w is not None
        assert make_cache(args, N, "window", **w).arena.nbytes <= b * fp16
        bigger = dict(w, window=w["window"] + 16)  # the next window up does not fit
        assert make_cache(args, N, "window", **bigger).arena.nbytes > b * fp16
        q = sweep.fit_policy(args, "quant", b, N)
        if q is not None:
            assert make_cache(args, N, "quant", **q).arena.nbytes <= b * fp16
        h = sweep.fit_policy(args, "h2o", b, N)
        assert h["budget"] == b and make_cache(args, N, "h2o", **h).arena.nbytes <= b * fp16
    assert sweep.fit_policy(args, "h2o", 0.001, N) is None  # below the pinned minimum


def test_sweep_writes_table_json_and_plot(tiny, tokens, tmp_path):  # noqa: F811
    _, loaded, _ = tiny
    kle = ev.KLEvaluator(loaded.model, tokens, window=896, eval_tokens=32, max_windows=1)
    rows = sweep.run_sweep(kle, ["window", "h2o", "snapkv"], [0.5, 0.4])
    assert len(rows) == 6
    for r in rows:
        assert r["options"] is not None
        # what the cache held never exceeded the budget (fraction of the fp16 bytes of the N tokens)
        assert r["kv_bytes_used_max"] <= r["budget"] * 896 * r["dense_fp16_bytes_per_token"] + 1
        assert np.isfinite(r["mean_kl"]) and r["mean_kl"] >= 0
    paths = sweep.write_sweep(rows, tmp_path / "out", {"command": "test"})
    md, js, png = paths
    table = md.read_text()
    assert table.count("\n| ") == 1 + 6 and "| 50.00% | h2o |" in table
    assert json.loads(js.read_text())["rows"][0]["policy"] == "window"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_sweep_cli(tiny, tmp_path):
    folder, _, text = tiny
    r = subprocess.run([sys.executable, "-m", "skvrt.cli.main", "eval", "sweep", "--model", str(folder), "--text",
                        str(text), "--out", str(tmp_path / "s"), "--budgets", "40", "--policies", "window,h2o",
                        "--window", "896", "--eval-tokens", "16", "--max-windows", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s" / "sweep.png").is_file() and "| 40.00% | h2o |" in (tmp_path / "s" / "sweep.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "skvrt.cli.main", "eval", "sweep", "--model", str(folder), "--text",
                          str(text), "--out", str(tmp_path / "x"), "--budgets", "40", "--policies", "lru"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "valid:" in bad.stderr
