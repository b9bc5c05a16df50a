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
        for s in sources:
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
