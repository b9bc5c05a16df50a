"""The whole GPU model path without a GPU: Model.on(CudaOps(module, numpy)) with a DeviceKVCache, every kernel
(RMSNorm + residual, RoPE, SwiGLU, dense KV append, ADA page encode, decode and prefill attention) run unmodified
by the project's CUDA emulator (skvrt/cuda/emu), matmuls by NumPy in the GPU's numerics (float16 operands,
float32 accumulation; skvrt/cuda/model_ops.py), against the CPU model (NumPy float32, PagedKVCache) -- which is
checked against transformers float32 on the same tiny shapes here and in tests/test_model_tiny.py.

Runs: a chunked prefill (chunks across page boundaries) then single-token decode steps; logits compared at every
step within skvrt.cuda.e2e.TOLERANCE. Policies full, window and ada (ADA pages written by the GPU encoder and read
by both attention kernels); the static decode step of CUDA graphs (skvrt/cuda/graph.py) must give the eager
step's logits exactly; truncation; policies the GPU does not run raise InputError naming the supported ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from skvrt.cuda import e2e, emu
from skvrt.cuda.cache import DEVICE_POLICIES, DeviceKVCache
from skvrt.cuda.graph import DecodeStep, GraphedModel
from skvrt.cuda.model_ops import CudaOps
from skvrt.errors import InputError
from skvrt.kv import make_cache
from skvrt.models import llama

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="no g++ for the CUDA emulator")

SHAPES, tiny_config, tiny_model = e2e.TINY_SHAPES, e2e.tiny_config, e2e.tiny_model
ADA = dict(sinks=4, window=16, tier=128)  # ADA pages of 16 tokens: tokens leave the window during the runs


@pytest.fixture(scope="module")
def module():
    return emu.factory("random", seed=5)


def run(model, module, policy, weight_dtype, graphs=False, n=60, n_decode=10, seed=1):
    ids = np.random.default_rng(seed).integers(0, model.args.vocab_size, n)
    opts = ADA if policy == "ada" else dict(sinks=4, window=16) if policy == "window" else {}
    return e2e.run_pair(model, module, np, ids, n_decode=n_decode, chunk=19, kv_policy=policy,
                        weight_dtype=weight_dtype, page_size=16, graphs=graphs, **opts)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("policy,weight_dtype", [("full", "float32"), ("full", "float16"), ("ada", "float32")])
def test_gpu_model_matches_cpu_model(module, shape, policy, weight_dtype):
    model = tiny_model(shape, tied=shape != "mha")
    cpu, gpu = run(model, module, policy, weight_dtype)
    stats = e2e.compare(cpu, gpu, weight_dtype)
    assert stats["rows"] == 3 + 10 and stats["argmax_agree"] >= 0.9


def test_window_policy_drops_like_the_cpu(module):
    cpu, gpu = run(tiny_model("gqa3"), module, "window", "float32")
    e2e.compare(cpu, gpu, "float32")


def ada_cache_and_model(model, module, dev: bool, gpu_model=None):
    """An ada cache (n_ctx 80, pages of 16) and the model to run with it: the CPU pair, or the device cache on the
    emulator with the model moved to CudaOps (float32 weights)."""
    c = make_cache(model.args, 80, "ada", page_size=16, **ADA)
    if not dev:
        return c, model
    return DeviceKVCache(c, module, np), gpu_model or model.on(CudaOps(module, np, "float32"))


def test_ada_moves_tokens_into_ada_pages_on_the_device(module):
    """After the run, the device cache holds ADA pages (written by the encode kernel) for every (layer, head), with
    the same page table as the CPU cache: the host bookkeeping is PagedKVCache's own."""
    model = tiny_model("gqa3")
    ids = np.random.default_rng(3).integers(0, 97, 70)
    caches = []
    for dev in (False, True):
        c, m = ada_cache_and_model(model, module, dev)
        for s in range(0, 50, 19):
            m.forward(ids[s : min(s + 19, 50)], c)
        for t in ids[50:]:
            m.forward(np.array([t]), c)
        caches.append(c)
    a, b = caches[0], caches[1].host
    assert (b.table.page_tiers == 1).sum(axis=-1).min() >= 2  # two ADA pages per (layer, head)
    np.testing.assert_array_equal(a.table.page_ids, b.table.page_ids)
    np.testing.assert_array_equal(a.table.page_tiers, b.table.page_tiers)
    np.testing.assert_array_equal(a.arena.fill, b.arena.fill)
    dev = caches[1]
    for pool, f in zip(b.pools, dev.fields):  # device positions follow the host's (the prefill mask reads them)
        used = np.nonzero(b.arena.owner == pool.index)[0]
        valid = np.arange(pool.page_size)[None, :] < b.arena.fill[used][:, None]
        np.testing.assert_array_equal(f["positions"][used][valid], pool.positions[used][valid])
    np.testing.assert_array_equal(dev.fill_d, b.arena.fill)


@pytest.mark.parametrize("policy", ["full", "ada"])
def test_static_decode_step_equals_eager(module, policy):
    """The CUDA-graph step's launches (persistent plan / position / token buffers; captured on a GPU, run eagerly
    here) give exactly the eager decode's logits."""
    model = tiny_model("gqa3")
    eager = run(model, module, policy, "float32", graphs=False)[1]
    static = run(model, module, policy, "float32", graphs=True)[1]
    np.testing.assert_array_equal(static, eager)


def test_truncate_then_continue_matches_cpu(module):
    model = tiny_model("gqa3")
    gpu_model = model.on(CudaOps(module, np, "float32"))
    ids = np.random.default_rng(4).integers(0, 97, 64)
    outs = []
    for dev in (False, True):
        c, m = ada_cache_and_model(model, module, dev, gpu_model)
        m.forward(ids[:40], c)
        for t in ids[40:55]:
            m.forward(np.array([t]), c)
        c.truncate(45)  # inside the dense window and past the ADA pages
        outs.append(np.concatenate([m.forward(ids[45:60], c, all_logits=True), m.forward(ids[60:61], c)]))
        assert c.offset == 61
    e2e.compare(outs[0], outs[1], "float32")


def test_generation_through_graphed_model_equals_cpu_greedy(module):
    """generate_step (the CLI / LLM loop) over GraphedModel: greedy tokens equal the CPU model's."""
    from skvrt.generate import generate_step

    model = tiny_model("gqa3")
    prompt = list(np.random.default_rng(6).integers(0, 97, 30))
    toks = []
    for dev in (False, True):
        c = make_cache(model.args, 64, "full")
        m = model
        if dev:
            c = DeviceKVCache(c, module, np)
            m = GraphedModel(model.on(CudaOps(module, np, "float32")), c)
        gen = generate_step(m, c, prompt, lambda logits, hist: int(np.argmax(logits)))
        toks.append([next(gen)[0] for _ in range(8)])
    assert toks[0] == toks[1]


def test_cpu_reference_matches_transformers_on_these_shapes(tmp_path, module):
    """The reference itself: the CPU model on a transformers-made tiny model of a GPU-test shape (head_dim 64, GQA
    3:1) equals transformers float32; then the GPU path on the same checkpoint equals the CPU model."""
    torch = pytest.importorskip("torch", reason="torch (test extra) is the transformers oracle's backend")
    transformers = pytest.importorskip("transformers", reason="transformers is the oracle")
    from skvrt.loader import load_args, load_config, load_weights

    nq, nkv, D = SHAPES["gqa3"]
    torch.manual_seed(0)
    # hidden 192: transformers wants it a multiple of the head count (head_dim stays 64)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny_config(nq, nkv, D, H=192))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ids = np.random.default_rng(7).integers(0, 97, 40)
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    _, args = load_args(load_config(tmp_path))
    model = llama.Model(args, load_weights(tmp_path))
    cpu = model.forward(ids, make_cache(args, 64, kv_dtype="float32"), all_logits=True)
    assert np.abs(cpu - ref).max() < 1e-4
    a, b = e2e.run_pair(model, module, np, ids, n_decode=6, chunk=17, weight_dtype="float16")
    e2e.compare(a, b, "float16")


@pytest.mark.parametrize("policy,opts,needs", [
    ("quant", {}, "quant"),
    ("snapkv", {"budget": "90%"}, "rdr"),
    ("spherical", {"budget": "90%"}, "rdr"),
])
def test_unsupported_policies_raise_naming_the_supported(module, policy, opts, needs):
    model = tiny_model("gqa3")
    host = make_cache(model.args, 512, policy, **opts)
    with pytest.raises(InputError) as e:
        DeviceKVCache(host, module, np)
    msg = str(e.value)
    assert f"--kv-policy {host.policy.name} does not run on CUDA" in msg and needs in msg
    assert "supports " + ", ".join(DEVICE_POLICIES) in msg


def test_float32_pages_are_refused(module):
    model = tiny_model("gqa3")
    with pytest.raises(InputError, match="float16"):
        DeviceKVCache(make_cache(model.args, 64, "full", kv_dtype="float32"), module, np)


def test_float16_weights_refuse_out_of_range_values(module):
    with pytest.raises(ValueError, match="does not fit float16"):
        CudaOps(module, np).matrix(np.array([[1e6]], np.float32))


def test_context_overflow_is_an_error(module):
    from skvrt.errors import ContextOverflowError

    model = tiny_model("gqa3")
    gpu = model.on(CudaOps(module, np, "float32"))
    c = DeviceKVCache(make_cache(model.args, 20, "full"), module, np)
    gpu.forward(np.arange(20) % 97, c)
    with pytest.raises(ContextOverflowError):
        gpu.forward(np.array([1]), c)
    with pytest.raises(ContextOverflowError):
        DecodeStep(gpu, c)(1)


class _EmulatedCuda:
    """A Device stand-in for skvrt.llm: name cuda, but the emulator's module factory and numpy arrays."""

    def __init__(self, requested="cuda"):
        self.name, self.requested, self.reason, self.info = "cuda", requested, "requested", "CUDA emulator"
        self.xp = np

    def module_factory(self):
        return emu.factory("random", seed=3)


def test_llm_on_cuda_runs_the_gpu_path(loaded, monkeypatch):
    """skvrt.LLM with device cuda (here the emulator standing in): weights and KV on the 'device', decode through
    CUDA-graph steps; the first token's log-probabilities equal the CPU LLM's within the float16 tolerance."""
    import skvrt.llm as llm_mod
    from skvrt.llm import LLM

    prompt = loaded.tokenizer.encode("The capital of France is")
    cpu = LLM(loaded, n_ctx=64, device="cpu")
    want = [r for r in cpu.stream(prompt, max_tokens=3, temp=0)]
    monkeypatch.setattr(llm_mod, "select_device", lambda device, for_model: _EmulatedCuda())
    gpu = LLM(loaded, n_ctx=64, device="cuda", cuda_graphs=True)
    assert isinstance(gpu.cache, DeviceKVCache) and isinstance(gpu.model, GraphedModel)
    assert loaded.model.ops.name == "cpu"  # the loaded model is left on the CPU
    got = [r for r in gpu.stream(prompt, max_tokens=3, temp=0)]
    assert gpu.cache.offset == len(prompt) + 2 and got[-1].finish_reason == "length"
    e2e.compare(want[0].logprobs[None], got[0].logprobs[None], "float16")
    gpu.reset()
    assert gpu.cache.offset == 0 and (gpu.cache.host.table.n_pages == 0).all()


def test_auto_keeps_a_policy_the_gpu_does_not_run_on_the_cpu(loaded, monkeypatch):
    import skvrt.llm as llm_mod
    from skvrt.kv.cache import PagedKVCache
    from skvrt.llm import LLM

    monkeypatch.setattr(llm_mod, "select_device", lambda device, for_model: _EmulatedCuda("auto"))
    llm = LLM(loaded, n_ctx=64, device="auto", kv_policy="quant")
    assert llm.device.name == "cpu" and "does not run on CUDA" in llm.device.reason
    assert isinstance(llm.cache, PagedKVCache)
    monkeypatch.setattr(llm_mod, "select_device", lambda device, for_model: _EmulatedCuda("cuda"))
    with pytest.raises(InputError, match="supports full, window, ada"):
        LLM(loaded, n_ctx=64, device="cuda", kv_policy="quant")
