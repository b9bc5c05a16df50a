"""Run CUDA kernels on the CPU: build a .cu with g++ against the project's emulator (cuda_emu.h, which says
what is modelled) and launch its kernels through ctypes.

The kernel source is compiled as it is: g++ force-includes cuda_emu.h and include/ (a stand-in cuda_fp16.h),
then a small generated translation unit #includes the .cu and adds, per `__global__` function, an exported
launcher (EMU_EXPORT) and, per `extern __shared__` array, its definition. One shared library per
(source text with its local includes, defines, flags, header), cached in <store>/build/cuda_emu/.

`Module` / `Function` mirror the part of cupy.RawModule / RawKernel that the op wrappers use, so the same
launch code runs here and on a GPU: `module.get_function(name)(grid, block, args, shared_mem=0)` and a
settable `max_dynamic_shared_size_bytes`. Arguments are checked against the kernel's C signature the way a
GPU launch needs them: arrays for pointers (None = null), np.int32 / np.float32 / ... scalars of exactly the
parameter's type (CuPy passes a Python int as 64 bits, which would shift every later argument).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .. import loader

ORDERS = ("forward", "reverse", "random")
HERE = Path(__file__).resolve().parent
FLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing"]
_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
_DYN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([\w\s]+?)\s+(\w+)\s*\[\s*\]\s*;")
_VALUE_TYPES = {"i": np.int32, "I": np.uint32, "q": np.int64, "Q": np.uint64, "f": np.float32, "d": np.float64}
_CTYPES = {"i": ctypes.c_int32, "I": ctypes.c_uint32, "q": ctypes.c_int64, "Q": ctypes.c_uint64,
           "f": ctypes.c_float, "d": ctypes.c_double}


class EmulatorError(RuntimeError):
    """A launch the emulator refused or a CUDA rule the kernel broke (barrier divergence, ...)."""


class _LaunchCfg(ctypes.Structure):  # == emu::LaunchCfg in cuda_emu.h
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_ulonglong),
                ("smem_limit", ctypes.c_ulonglong), ("order", ctypes.c_int), ("seed", ctypes.c_ulonglong)]


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def build_dir() -> Path:
    from ...store import store_root

    return store_root() / "build" / "cuda_emu"


def _host_tu(source: Path, text: str) -> str:
    kernels = _KERNEL.findall(text)
    if not kernels:
        raise ValueError(f"{source}: no __global__ function")
    lines = [f'#include "{source}"']
    for ctype, name in _DYN_SMEM.findall(text):
        lines.append(f"thread_local __attribute__((aligned(16))) {ctype} {name}"
                     f"[EMU_DYN_SMEM_BYTES / sizeof({ctype})];")
    lines += [f"EMU_EXPORT({k})" for k in kernels]
    return "\n".join(lines) + "\n"


def build(source: Path, defines: dict[str, int]) -> Path:
    """Compile `source` (a .cu) with the emulator -> path of the shared library (cached)."""
    cxx = compiler()
    if not cxx:
        raise EmulatorError("no C++ compiler (g++ or $CXX) for the CUDA emulator")
    source = Path(source).resolve()
    text = loader.expand_includes(source)
    opts = [*FLAGS, "-include", str(HERE / "cuda_emu.h"), "-I", str(HERE / "include"), "-I", str(source.parent),
            *loader.define_options(defines)]
    h = hashlib.sha256("\0".join([cxx, *opts, text, (HERE / "cuda_emu.h").read_text()]).encode())
    out = build_dir() / f"{source.stem}_{h.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tu = Path(tmp) / "host.cpp"
        tu.write_text(_host_tu(source, text))
        tmp_out = Path(tmp) / out.name
        r = subprocess.run([cxx, *opts, "-o", str(tmp_out), str(tu)], capture_output=True, text=True)
        if r.returncode != 0:
            raise EmulatorError(f"emulator build of {source.name} {defines} failed:\n{r.stderr.strip()}")
        os.replace(tmp_out, out)  # atomic: concurrent builds never see a half-written library
    return out


class Function:
    """One kernel of a Module: call as a CuPy RawKernel, (grid, block, args, shared_mem=0)."""

    def __init__(self, module: "Module", name: str):
        lib = module.lib
        self.module, self.name = module, name
        self._launch = getattr(lib, f"emu_launch_{name}")
        self._launch.argtypes = [ctypes.POINTER(_LaunchCfg), ctypes.POINTER(ctypes.c_void_p)]
        self._launch.restype = ctypes.c_int
        sig = getattr(lib, f"emu_signature_{name}")
        sig.restype = ctypes.c_char_p
        self.signature = sig().decode()
        if "?" in self.signature:
            raise EmulatorError(f"{name}: a parameter type the emulator cannot pass ({self.signature})")
        self.max_dynamic_shared_size_bytes = 0

    def _arg(self, i: int, code: str, a):
        if code == "p":
            if a is None:
                return ctypes.c_void_p(None)
            if isinstance(a, np.ndarray):
                return ctypes.c_void_p(a.ctypes.data)
            raise TypeError(f"{self.name} argument {i}: a pointer parameter takes an array or None, not {type(a)}")
        want = _VALUE_TYPES[code]
        if not (isinstance(a, np.generic) and a.dtype == want):
            raise TypeError(f"{self.name} argument {i}: pass np.{np.dtype(want).name} for a "
                            f"{np.dtype(want).name} parameter, not {type(a).__name__} (CuPy would pass a Python "
                            f"scalar as 64 bits)")
        return _CTYPES[code](a.item())

    def __call__(self, grid, block, args, shared_mem: int = 0):
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments, got {len(args)}")
        held = [self._arg(i, c, a) for i, (c, a) in enumerate(zip(self.signature, args))]
        argv = (ctypes.c_void_p * len(held))(*[ctypes.addressof(x) for x in held])
        grid, block = (tuple(x) + (1,) * (3 - len(x)) if isinstance(x, tuple) else (x, 1, 1) for x in (grid, block))
        cfg = _LaunchCfg((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                         self.max_dynamic_shared_size_bytes, ORDERS.index(self.module.order), self.module.next_seed())
        if self._launch(ctypes.byref(cfg), argv) != 0:
            raise EmulatorError(f"{self.name}: {self.module.lib.emu_error().decode()}")


class Module:
    """A .cu built for the emulator, launched under one thread order ("forward", "reverse", "random")."""

    def __init__(self, path: Path, order: str = "forward", seed: int = 0):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
        self.lib = ctypes.CDLL(str(path))
        self.lib.emu_error.restype = ctypes.c_char_p
        self.order, self._seed = order, seed
        self._functions: dict[str, Function] = {}

    def next_seed(self) -> int:
        """A new seed for every launch (random order), reproducible from the module's seed."""
        self._seed = (self._seed * 6364136223846793005 + 1442695040888963407) % 2**64
        return self._seed

    def get_function(self, name: str) -> Function:
        if name not in self._functions:
            self._functions[name] = Function(self, name)
        return self._functions[name]


def load(source: Path, defines: dict[str, int], order: str = "forward", seed: int = 0) -> Module:
    return Module(build(source, defines), order, seed)


def factory(order: str = "forward", seed: int = 0):
    """A module factory for the op wrappers: (kernels_cu stem, defines) -> Module under `order`."""
    modules: dict[tuple, Module] = {}

    def module(name: str, defines: dict[str, int]) -> Module:
        key = (name, tuple(sorted(defines.items())))
        if key not in modules:
            modules[key] = load(loader.kernel_path(name), defines, order, seed)
        return modules[key]

    return module
