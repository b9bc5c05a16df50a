"""GPU backend: CUDA kernels in kernels_cu/ (one op per .cu), compiled through CuPy RawModule.

    loader.py     reads kernels_cu/, builds cupy.RawModule per (file, defines); NVRTC compile as CuPy does
    attention.py  decode attention over paged KV (dense and ADA pages): the launch code, for any module
                  factory and array module (prepare_*: launches only, for CUDA graph capture)
    ops.py        RMSNorm (+ residual), RoPE, SwiGLU
    kv_write.py   dense KV append (host page plan + kernel), ADA encode of whole pages
    registry.py   every kernels_cu source: entry points, compile configurations
    checks.py     parity checks kernel vs NumPy twin, shared by the tests and `python -m skvrt.selftest`
    emu/          a CUDA emulator (g++, one fiber per thread) that runs the same kernels on the CPU in tests

Nothing here imports cupy at import time: the CPU runtime never needs it.
"""
