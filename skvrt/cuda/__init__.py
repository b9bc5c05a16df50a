"""GPU backend: CUDA kernels in kernels_cu/ (one op per .cu), compiled through CuPy RawModule.

    loader.py     reads kernels_cu/, builds cupy.RawModule per (file, defines); NVRTC compile as CuPy does
    attention.py  decode attention over paged KV (dense and ADA pages): the launch code, for any module
                  factory and array module (prepare_*: launches only, for CUDA graph capture)
    prefill.py    causal prefill attention over paged KV (chunks of T > 1 tokens)
    ops.py        RMSNorm (+ residual), RoPE, SwiGLU
    kv_write.py   dense KV append (host page plan + kernel), ADA encode of whole pages
    registry.py   every kernels_cu source: entry points, compile configurations
    checks.py     parity checks kernel vs NumPy twin, shared by the tests and `python -m skvrt.selftest`
    model_ops.py  the model's ops backend on the GPU (weights float16, cuBLAS GEMMs, the row-op kernels)
    cache.py      DeviceKVCache: the KV pages on the device, PagedKVCache's interface and host bookkeeping
    graph.py      CUDA graphs for the decode step (DecodeStep, GraphedModel)
    e2e.py        end-to-end logits, GPU path vs the CPU model (tests, selftest)
    emu/          a CUDA emulator (g++, one fiber per thread) that runs the same kernels on the CPU in tests

Nothing here imports cupy at import time: the CPU runtime never needs it.
"""
