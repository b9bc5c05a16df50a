"""`python -m skvrt.selftest` (skvrt/selftest.py), the GPU suite for the day a GPU is lent: without a GPU,
--gpu exits 2 with "no GPU: <reason>"; --dry-run runs the same parity checks and benchmark code on the CUDA
emulator at small sizes (so CI exercises every code path the GPU run takes, except CuPy's own calls)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from skvrt import backend, selftest
from skvrt.cuda import checks, emu

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no g++ for the CUDA emulator")


@pytest.mark.skipif(backend.cuda_unavailable_reason() is None, reason="a usable GPU is present")
def test_gpu_without_a_gpu_is_a_clear_error():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "skvrt.selftest", "--gpu"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip() == f"skvrt selftest: no GPU: {backend.cuda_unavailable_reason()}"


def test_dry_run_passes_and_prints_counts_and_table(capsys):
    """Kernel checks, end-to-end model checks (the default model and tiny llamas, GPU path on the emulator vs the
    CPU model; default-model cases SKIP, not fail, when the model is not in the store), then both tables."""
    assert selftest.main(["--dry-run", "--contexts", "40,200"]) == 0
    out = capsys.readouterr().out
    n_model = len(selftest._model_cases(gpu=False))
    skipped = out.count("SKIP  ")
    n = len(checks.SUITE) + n_model - skipped
    assert f"{n} passed, 0 failed" in out
    assert out.count("PASS  ") == n and out.count("PASS  model e2e") == n_model - skipped
    assert skipped == 0 or "default model unavailable" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "emulated" in line]
    assert len(rows) == 6 + 4  # attention: 3 configs x 2 contexts; model decode: 2 policies x 2 contexts
    assert {r.split(" | ")[0][2:] for r in rows} == {"full", "ada", "spherical-mix"}
    assert "spherical: not measured end to end" in out


def test_emulator_vs_device_comparison_path():
    """The --gpu run compares each check's raw output with the emulator's; here a second emulator order
    stands in for the GPU, so the comparison code runs and must agree."""
    out = io.StringIO()
    passed, failed = selftest.run_checks(emu.factory("forward"), np, emu.factory("reverse"), out=out)
    assert failed == 0, out.getvalue()
    assert passed == 2 * len(checks.SUITE)
    assert out.getvalue().count("emulator vs GPU") == len(checks.SUITE)


def test_a_failing_check_is_counted_not_raised(monkeypatch):
    def broken(module, xp, rng):
        raise AssertionError("numbers differ")

    monkeypatch.setattr(checks, "SUITE", [("broken", broken, {})] + checks.SUITE[:1])
    out = io.StringIO()
    assert selftest.run_checks(emu.factory("forward"), np, out=out) == (1, 1)
    assert "FAIL  broken  AssertionError: numbers differ" in out.getvalue()


def test_bench_bytes_model():
    """Bytes read per token: dense 4 D; ADA key bits / 8 + D vb / 8 + 4 D / vg, plus one frame per page."""
    from skvrt.kv.ada import AdaTier
    from skvrt.kv.tiers import DenseTier

    assert selftest._read_bytes(DenseTier(), 100, 2, 128) == 100 * 512
    t = AdaTier(np.full((1, 1, 64), 3), 4, 32)
    assert selftest._read_bytes(t, 64, 1, 128) == 64 * (24 + 64 + 16) + 64 * 8


def test_synthetic_bench_cache_is_a_valid_cache_state():
    """The model benchmark's synthetic ada cache holds exactly the tokens a real run would (sinks + window dense,
    the rest in ADA pages), and decoding on it goes through window moves like a real cache."""
    from skvrt.cuda.graph import DecodeStep

    module = emu.factory("forward")
    rng = np.random.default_rng(0)
    model = selftest.random_model(module, np, selftest.TINY_MODEL)
    cache, held = selftest.synthetic_cache(module, np, model.args, "ada", 300, 400, rng)
    host = cache.host
    for layer in range(host.n_layers):
        for h in range(host.n_kv_heads):
            ids, tiers = host.table.pages(layer, h)
            pos = np.concatenate([host.pools[t].positions[p, : host.arena.fill[p]] for p, t in zip(ids, tiers)])
            assert sorted(pos.tolist()) == list(range(300))
    assert [n for _, n, _ in held] == [300 - 192, 192]
    step = DecodeStep(model, cache)
    for t in range(30):  # 300 + 30 - 64 - 4 - 192 >= 64: one batch leaves the window
        assert np.isfinite(step(t % 512)).all()
    assert host.n_old == 256 and cache.offset == 330
