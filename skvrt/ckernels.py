"""Build and load the CPU C kernels (kernels_c/*.c) through ctypes.

Compiled once per (sources, compiler flags, CPU) into <store>/build/, with `cc -O3 -march=native -fopenmp`.
No compiler, a failed build, or SKVRT_NO_C=1 -> `lib()` returns None and callers use the NumPy twins.

`variant_lib(name)` builds the same sources with narrower instruction sets (VARIANTS), so the tests run every
code path of the kernels -- AVX-512, AVX2 and plain C -- on one machine against the same NumPy twins.
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
# extra flags per build variant; "native" is what the runtime loads
VARIANTS = {
    "native": [],
    "avx2": ["-mno-avx512f"],  # the AVX2 + FMA + F16C paths
    "scalar": ["-mno-avx", "-mno-avx2", "-mno-fma", "-mno-f16c", "-mno-avx512f"],  # the plain C paths
}
_lib: ctypes.CDLL | None | bool = False  # False = not tried yet
_variants: dict[str, ctypes.CDLL] = {}
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


def _compile(sources: list[Path], out: Path, extra: list[str] = ()) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        r = subprocess.run([cc, *FLAGS, *extra, "-o", str(tmp_out), *map(str, sources), "-lm"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"C kernel build failed:\n{r.stderr.strip()}")
        os.replace(tmp_out, out)  # atomic: concurrent first uses never see a half-written library


def _load(extra: list[str]) -> ctypes.CDLL:
    """Build (once) and load the kernels with FLAGS + extra; raises RuntimeError / OSError."""
    sources = _sources()
    h = hashlib.sha256(" ".join(FLAGS + list(extra)).encode() + _cpu_key().encode())
    for s in sources + _headers():
        h.update(s.read_bytes())
    out = build_dir() / f"skvrt_kernels_{h.hexdigest()[:16]}.so"
    if not out.is_file():
        _compile(sources, out, extra)
    L = ctypes.CDLL(str(out))
    _declare(L)
    from . import threads

    if threads.current:
        L.skvrt_set_threads(threads.current)
    return L


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
        _lib = _load(VARIANTS["native"])
    except (RuntimeError, OSError) as e:
        build_error = str(e)
        print(f"skvrt: C kernels unavailable, using NumPy ({build_error.splitlines()[0]})", file=sys.stderr)
        _lib = None
    return _lib


def variant_lib(name: str) -> ctypes.CDLL:
    """The kernels built for VARIANTS[name] (tests); raises RuntimeError / OSError when they cannot be built."""
    if name == "native":
        L = lib()
        if L is None:
            raise RuntimeError(build_error or "C kernels unavailable")
        return L
    if name not in _variants:
        _variants[name] = _load(VARIANTS[name])
    return _variants[name]


class TierDesc(ctypes.Structure):
    """skvrt_tier in kernels_c/attention_ada.c: one pool's page fields, each at field + pid * stride bytes."""

    _fields_ = [("kind", ctypes.c_int32), ("P", ctypes.c_int32), ("stride", ctypes.c_int64),
                ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("codes", ctypes.c_void_p),
                ("frame", ctypes.c_void_p), ("v_codes", ctypes.c_void_p), ("v_min", ctypes.c_void_p),
                ("v_scale", ctypes.c_void_p), ("mass", ctypes.c_void_p), ("KB", ctypes.c_int32),
                ("vb", ctypes.c_int32), ("vg", ctypes.c_int32), ("mass_seed", ctypes.c_uint32),
                ("angle_bits", ctypes.c_void_p), ("radius_bits", ctypes.c_void_p)]


KIND_DENSE_F16, KIND_DENSE_F32, KIND_ADA = 0, 1, 2


def _declare(L: ctypes.CDLL) -> None:
    P = ctypes.c_void_p
    i, f, i64 = ctypes.c_int, ctypes.c_float, ctypes.c_int64
    for name in ("skvrt_dense_decode_f16", "skvrt_dense_decode_f32"):
        fn = getattr(L, name)
        fn.argtypes = [P, P, P, P, P, P, i, i, i, i, i, i64, f, P, P, ctypes.c_uint32]
        fn.restype = ctypes.c_int
    L.skvrt_set_threads.argtypes = [i]
    L.skvrt_set_threads.restype = None
    L.skvrt_paged_decode.argtypes = [P, P, i, P, P, P, P, i, i, i, i, f, P]
    L.skvrt_paged_decode.restype = ctypes.c_int
    L.skvrt_ada_decode_pages.argtypes = [P] * 5 + [i64, P, P, i, P, P] + [i] * 5 + [P] * 2
    L.skvrt_ada_decode_pages.restype = ctypes.c_int
    L.skvrt_ada_write.argtypes = [P] * 5 + [i64, i, i, P, P, P, P] + [i] * 5
    L.skvrt_ada_write.restype = ctypes.c_int
    L.skvrt_ada_append.argtypes = [P] * 5 + [i64, i, i, i, P, P, P, P] + [i] * 5
    L.skvrt_ada_append.restype = ctypes.c_int


def set_threads(n: int) -> None:
    for L in [_lib, *_variants.values()]:
        if L:  # not loaded yet: _load applies threads.current when it loads
            L.skvrt_set_threads(n)


def ptr(a) -> int:
    return a.ctypes.data


def dense_decode(q, pool, page_ids, n_pages, scale: float, out, with_mass: bool = False, L=None,
                 mass_seed: int = 0) -> None:
    """C twin of attention.attend_dense for one decode step over dense pages (one layer). Shapes: see
    kernels_c/attention_dense.c. with_mass: add each slot's softmax weight (summed over the query group) to
    pool.mass (float16, rounded stochastically with mass_seed: kv/slot_mass.py). L: a library from
    variant_lib (tests); default lib()."""
    import numpy as np

    L = L or lib()
    H, max_pages = page_ids.shape
    nq, D = q.shape
    assert q.dtype == "float32" and q.flags.c_contiguous and out.flags.c_contiguous
    assert page_ids.dtype == "int32" and page_ids.flags.c_contiguous and n_pages.dtype == "int32"
    assert pool.k.strides[0] == pool.v.strides[0] == pool.stride and pool.k.strides[1:] == pool.v.strides[1:]
    assert pool.k.strides[2] == pool.k.itemsize and pool.k.strides[1] == D * pool.k.itemsize
    assert not with_mass or (pool.mass is not None and pool.mass.dtype == np.float16)
    fn = L.skvrt_dense_decode_f16 if pool.k.dtype == "float16" else L.skvrt_dense_decode_f32
    rc = fn(ptr(q), ptr(pool.k), ptr(pool.v), ptr(pool.fill), ptr(page_ids), ptr(n_pages), nq, H,
            pool.page_size, D, max_pages, pool.stride, scale, ptr(out), ptr(pool.mass) if with_mass else None,
            int(mass_seed) & 0xFFFFFFFF)
    if rc != 0:
        raise ValueError(f"dense_decode rejected shapes: nq={nq} H={H} P={pool.page_size} D={D}")


def tier_desc(pool, layer: int, ada_bits=None, with_mass: bool = False, mass_seed: int = 0) -> TierDesc:
    """The kernel's descriptor of one pool (dense or ADA) for one layer. ada_bits: (angle, radius) widths
    (L, H, D/2) uint8 of an ADA pool; with_mass: add slot mass (float16) with the stochastic rounding seed
    mass_seed (the observing query's position: set `.mass_seed` of a kept descriptor before each step). The
    descriptor holds raw pointers: keep pool (and ada_bits) alive."""
    import numpy as np

    d, t = pool.data, TierDesc()
    t.P, t.stride = pool.page_size, pool.stride
    assert not with_mass or pool.mass.dtype == np.float16
    t.mass = ptr(pool.mass) if with_mass else None
    t.mass_seed = int(mass_seed) & 0xFFFFFFFF
    if "k" in d:
        assert d["k"].dtype in (np.float16, np.float32) and d["k"].strides[0] == pool.stride
        t.kind = KIND_DENSE_F16 if d["k"].dtype == np.float16 else KIND_DENSE_F32
        t.k, t.v = ptr(d["k"]), ptr(d["v"])
        return t
    tier = pool.tier
    t.kind = KIND_ADA
    t.codes, t.frame, t.v_codes = ptr(d["codes"]), ptr(d["frame"]), ptr(d["v_codes"])
    t.v_min, t.v_scale = ptr(d["v_min"]), ptr(d["v_scale"])
    t.KB, t.vb, t.vg = tier.key_bits // 8, tier.v_bits, tier.v_group
    ba, br = ada_bits
    assert ba.dtype == br.dtype == np.uint8 and ba.flags.c_contiguous and br.flags.c_contiguous
    t.angle_bits, t.radius_bits = ptr(ba[layer]), ptr(br[layer])
    return t


def paged_decode(q, descs, fill, page_ids, page_tiers, n_pages, scale: float, out, L=None) -> None:
    """One decode step of one layer over pages of any tiers (dense / ADA), logits of ADA pages from their
    codes: C twin of cache._scores + softmax_attend. q, out (nq, D) float32; descs: one TierDesc per pool (in
    pool order = page_tiers values); fill (N,) int32 (the arena's); page_ids (H, max_pages) int32,
    page_tiers (H, max_pages) int8, n_pages (H,) int32 (this layer's table rows). Shapes: attention_ada.c."""
    import numpy as np

    L = L or lib()
    H, max_pages = page_ids.shape
    nq, D = q.shape
    assert q.dtype == np.float32 and q.flags.c_contiguous and nq % H == 0
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (nq, D)
    assert page_ids.dtype == np.int32 and page_ids.flags.c_contiguous
    assert page_tiers.dtype == np.int8 and page_tiers.flags.c_contiguous and page_tiers.shape == (H, max_pages)
    assert n_pages.dtype == np.int32 and n_pages.flags.c_contiguous and n_pages.shape == (H,)
    assert fill.dtype == np.int32 and fill.flags.c_contiguous
    arr = descs if isinstance(descs, ctypes.Array) else (TierDesc * len(descs))(*descs)
    paged_decode_unchecked(L, q, arr, fill, page_ids, page_tiers, n_pages, scale, out)


def paged_decode_unchecked(L, q, descs, fill, page_ids, page_tiers, n_pages, scale: float, out) -> None:
    """paged_decode without the Python-side checks (the cache's decode step; descs: a ctypes TierDesc array it
    built once). The kernel still validates shapes and descriptors (rc != 0 -> ValueError)."""
    H, max_pages = page_ids.shape
    nq, D = q.shape
    rc = L.skvrt_paged_decode(q.ctypes.data, ctypes.addressof(descs), len(descs), fill.ctypes.data,
                              page_ids.ctypes.data, page_tiers.ctypes.data, n_pages.ctypes.data, nq, H, D,
                              max_pages, scale, out.ctypes.data)
    if rc != 0:
        raise ValueError(f"paged_decode rejected its inputs (rc {rc}): nq={nq} H={H} D={D} tiers={len(descs)}")


def ada_decode_pages(ada_pool, pids, angle_bits, radius_bits, L=None):
    """C twin of AdaTier.decode_keys + read_values for pages `pids` of one (layer, kv head):
    -> keys, values (n, P, D) float32 (slots past a page's fill: unspecified). angle_bits, radius_bits (D/2,)
    uint8 = tier.widths_at((layer, head)). Shapes: see kernels_c/attention_ada.c."""
    import numpy as np

    L = L or lib()
    tier, d = ada_pool.tier, ada_pool.data
    P, D = ada_pool.page_size, ada_pool.head_dim
    pids = np.ascontiguousarray(pids, np.int32)
    ab, rb = (np.ascontiguousarray(b, np.uint8) for b in (angle_bits, radius_bits))
    assert ab.shape == rb.shape == (D // 2,)
    for name in ("codes", "frame", "v_codes", "v_min", "v_scale"):
        assert d[name].strides[0] == ada_pool.stride, name
    k = np.empty((len(pids), P, D), np.float32)
    v = np.empty((len(pids), P, D), np.float32)
    rc = L.skvrt_ada_decode_pages(ptr(d["codes"]), ptr(d["frame"]), ptr(d["v_codes"]), ptr(d["v_min"]),
                                  ptr(d["v_scale"]), ada_pool.stride, ptr(ada_pool.fill), ptr(pids), len(pids),
                                  ptr(ab), ptr(rb),
                                  P, D, tier.key_bits // 8, tier.v_bits, tier.v_group, ptr(k), ptr(v))
    if rc != 0:
        raise ValueError(f"ada_decode_pages rejected its inputs (rc {rc}): P={P} D={D} key bits={tier.key_bits}")
    return k, v


def _ada_encode_args(pool, k, v, angle_bits, radius_bits):
    import numpy as np

    d, tier = pool.data, pool.tier
    D = pool.head_dim
    k = np.ascontiguousarray(k, np.float32)
    v = np.ascontiguousarray(v, np.float32)
    assert k.ndim == 2 and k.shape[1] == D and v.shape == k.shape, (k.shape, v.shape, D)
    ab, rb = (np.ascontiguousarray(b, np.uint8) for b in (angle_bits, radius_bits))
    assert ab.shape == rb.shape == (D // 2,)
    for name in ("codes", "frame", "v_codes", "v_min", "v_scale"):
        assert d[name].strides[0] == pool.stride, name
    ptrs = (ptr(d["codes"]), ptr(d["frame"]), ptr(d["v_codes"]), ptr(d["v_min"]), ptr(d["v_scale"]), pool.stride)
    shape = (pool.page_size, D, tier.key_bits // 8, tier.v_bits, tier.v_group)
    return k, v, ab, rb, ptrs, shape


def ada_write(pool, pid: int, k, v, angle_bits, radius_bits, L=None) -> None:
    """C twin of AdaTier.write_page(pool.data, pid, k, v, lh): encode n <= P tokens k, v (n, D) float32 into
    the empty page pid of `pool` (a TierPool of an AdaTier). angle_bits, radius_bits (D/2,) uint8 =
    tier.widths_at((layer, head)). Same bytes as the NumPy twin (kernels_c/ada_encode.c)."""
    L = L or lib()
    k, v, ab, rb, ptrs, shape = _ada_encode_args(pool, k, v, angle_bits, radius_bits)
    rc = L.skvrt_ada_write(*ptrs, int(pid), len(k), ptr(k), ptr(v), ptr(ab), ptr(rb), *shape)
    if rc != 0:
        raise ValueError(f"ada_write rejected its inputs (rc {rc}): n={len(k)} P, D, KB, vb, vg={shape}")


def ada_append(pool, pid: int, f: int, k, v, angle_bits, radius_bits, L=None) -> None:
    """C twin of AdaTier.append(pool.data, pid, f, k, v, lh): add n tokens at slots f .. f + n of page pid,
    which holds f tokens (f == 0: write_page). Arguments as ada_write."""
    L = L or lib()
    k, v, ab, rb, ptrs, shape = _ada_encode_args(pool, k, v, angle_bits, radius_bits)
    rc = L.skvrt_ada_append(*ptrs, int(pid), int(f), len(k), ptr(k), ptr(v), ptr(ab), ptr(rb), *shape)
    if rc != 0:
        raise ValueError(f"ada_append rejected its inputs (rc {rc}): f={f} n={len(k)} P, D, KB, vb, vg={shape}")
