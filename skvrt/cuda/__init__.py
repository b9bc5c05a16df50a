"""GPU backend: CUDA kernels in kernels_cu/ (one op per .cu), compiled through CuPy RawModule.

    loader.py     reads kernels_cu/, builds cupy.RawModule per (file, defines); NVRTC compile as CuPy does
    attention.py  decode attention over paged KV (dense and ADA pages): the launch code, for any module
                  factory and array module
    emu/          a CUDA emulator (g++, one fiber per thread) that runs the same kernels on the CPU in tests

Nothing here imports cupy at import time: the CPU runtime never needs it.
"""
