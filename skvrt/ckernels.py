"""Build and load the CPU C kernels (kernels_c/*.c) through ctypes.

Compiled once per (sources, compiler flags, CPU) into <store>/build/, with `cc -O3 -march=native -fopenmp`.
No compiler, a failed build, or SKVRT_NO_C=1 -> `lib()` returns None and callers use the NumPy twins.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_lib: ctypes.CDLL | None | bool = False  # False = not tried yet
build_error: str | None = None


def _sources() -> list[Path]:
    root = resources.files("skvrt.kernels_c")
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".c"))


def _headers() -> list[Path]:
    root = resources.files("skvrt.kernels_c")
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".h"))


def _cpu_key() -> str:
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def build_dir() -> Path:
    from .store import store_root

    return store_root() / "build"


def _compile(sources: list[Path], out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        r = subprocess.run([cc, *FLAGS, "-o", str(tmp_out), *map(str, sources), "-lm"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"C kernel build failed:\n{r.stderr.strip()}")
        os.replace(tmp_out, out)  # atomic: concurrent first uses never see a half-written library


def lib() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (NumPy fallback)."""
    global _lib, build_error
    if _lib is not False:
        return _lib
    _lib = None
    if os.environ.get("SKVRT_NO_C"):
        build_error = "disabled by SKVRT_NO_C"
        return None
    try:
        sources = _sources()
        h = hashlib.sha256(" ".join(FLAGS).encode() + _cpu_key().encode())
        for s in sources + _headers():
            h.update(s.read_bytes())
        out = build_dir() / f"skvrt_kernels_{h.hexdigest()[:16]}.so"
        if not out.is_file():
            _compile(sources, out)
        _lib = ctypes.CDLL(str(out))
        _declare(_lib)
        from . import threads

        if threads.current:
            _lib.skvrt_set_threads(threads.current)
    except (RuntimeError, OSError) as e:
        build_error = str(e)
        print(f"skvrt: C kernels unavailable, using NumPy ({build_error.splitlines()[0]})", file=sys.stderr)
        _lib = None
    return _lib


def _declare(L: ctypes.CDLL) -> None:
    P = ctypes.c_void_p
    i, f = ctypes.c_int, ctypes.c_float
    for name in ("skvrt_dense_decode_f16", "skvrt_dense_decode_f32"):
        fn = getattr(L, name)
        fn.argtypes = [P, P, P, P, P, P, i, i, i, i, i, f, P, P]
        fn.restype = ctypes.c_int
    L.skvrt_set_threads.argtypes = [i]
    L.skvrt_set_threads.restype = None
    for name in ("skvrt_mixed_decode_f16", "skvrt_mixed_decode_f32"):
        fn = getattr(L, name)
        fn.argtypes = [P] * 15 + [i] * 8 + [f, P]
        fn.restype = ctypes.c_int


def set_threads(n: int) -> None:
    if _lib:  # not loaded yet: lib() applies threads.current when it loads
        _lib.skvrt_set_threads(n)


def ptr(a) -> int:
    return a.ctypes.data


def dense_decode(q, pool, page_ids, n_pages, scale: float, out, mass=None) -> None:
    """C twin of attention.attend_dense for one decode step. Shapes: see kernels_c/attention_dense.c."""
    L = lib()
    H, max_pages = page_ids.shape
    nq, D = q.shape
    assert q.dtype == "float32" and q.flags.c_contiguous and out.flags.c_contiguous
    assert page_ids.dtype == "int32" and page_ids.flags.c_contiguous and n_pages.dtype == "int32"
    fn = L.skvrt_dense_decode_f16 if pool.k.dtype == "float16" else L.skvrt_dense_decode_f32
    rc = fn(ptr(q), ptr(pool.k), ptr(pool.v), ptr(pool.fill), ptr(page_ids), ptr(n_pages), nq, H,
            pool.page_size, D, max_pages, scale, ptr(out), ptr(mass) if mass is not None else None)
    if rc != 0:
        raise ValueError(f"dense_decode rejected shapes: nq={nq} H={H} P={pool.page_size} D={D}")


def mixed_decode(q, dense_pool, ada_pool, page_ids, page_tiers, n_pages, angle_bits, radius_bits, scale: float,
                 out) -> None:
    """One decode step of one layer over dense (tier 0) and ADA (tier 1) pages: C twin of cache._scores +
    softmax_attend. q, out (nq, D) float32; page_ids (H, max_pages) int32, page_tiers (H, max_pages) int8,
    n_pages (H,) int32 (this layer's table rows); angle_bits, radius_bits (H, D/2) uint8 =
    ada.split_bits(tier.pair_bits[layer]). Shapes: see kernels_c/attention_ada.c."""
    import numpy as np

    L = lib()
    H, max_pages = page_ids.shape
    nq, D = q.shape
    P = dense_pool.page_size
    kd, ad = dense_pool.data, ada_pool.data
    tier = ada_pool.tier
    KB, vb, vg = tier.key_bits // 8, tier.v_bits, tier.v_group
    assert q.dtype == np.float32 and q.flags.c_contiguous
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (nq, D)
    assert nq % H == 0 and ada_pool.page_size == P and dense_pool.head_dim == D == ada_pool.head_dim
    assert page_ids.dtype == np.int32 and page_ids.flags.c_contiguous
    assert page_tiers.dtype == np.int8 and page_tiers.flags.c_contiguous and page_tiers.shape == (H, max_pages)
    assert n_pages.dtype == np.int32 and n_pages.flags.c_contiguous and n_pages.shape == (H,)
    for a in (angle_bits, radius_bits):
        assert a.dtype == np.uint8 and a.flags.c_contiguous and a.shape == (H, D // 2)
    kdt = kd["k"].dtype
    assert kdt in (np.float16, np.float32) and kd["v"].dtype == kdt
    n0, n1 = dense_pool.n_pages, ada_pool.n_pages
    for name, a, shape, dt in (("k", kd["k"], (n0, P, D), kdt), ("v", kd["v"], (n0, P, D), kdt),
                               ("fill0", dense_pool.fill, (n0,), np.int32),
                               ("codes", ad["codes"], (n1, P, KB), np.uint8),
                               ("frame", ad["frame"], (n1, D // 2, 4), np.float16),
                               ("v_codes", ad["v_codes"], (n1, P, D * vb // 8), np.uint8),
                               ("v_min", ad["v_min"], (n1, P, D // vg), np.float16),
                               ("v_scale", ad["v_scale"], (n1, P, D // vg), np.float16),
                               ("fill1", ada_pool.fill, (n1,), np.int32)):
        assert a.dtype == dt and a.shape == shape and a.flags.c_contiguous, name
    fn = L.skvrt_mixed_decode_f16 if kdt == np.float16 else L.skvrt_mixed_decode_f32
    rc = fn(ptr(q), ptr(kd["k"]), ptr(kd["v"]), ptr(dense_pool.fill), ptr(ad["codes"]), ptr(ad["frame"]),
            ptr(ad["v_codes"]), ptr(ad["v_min"]), ptr(ad["v_scale"]), ptr(ada_pool.fill), ptr(page_ids),
            ptr(page_tiers), ptr(n_pages), ptr(angle_bits), ptr(radius_bits), nq, H, P, D, max_pages, KB, vb, vg,
            scale, ptr(out))
    if rc != 0:
        raise ValueError(f"mixed_decode rejected its inputs (rc {rc}): nq={nq} H={H} P={P} D={D} "
                         f"key bytes={KB} v_bits={vb} v_group={vg}")
