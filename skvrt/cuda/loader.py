"""The one loader of the CUDA sources in kernels_cu/ (one op per .cu, shared code in .cuh).

A source's local includes (`#include "x.cuh"`, resolved next to it) are inlined with #line markers, so CuPy
gets one self-contained string: its cache key (the source text) changes when a header does, and NVRTC needs
no include path of ours. Compile-time shapes are passed as -D options, one module per (file, defines)
(habit: constants injected as #defines, compiled lazily, cached per device, file and defines).

    cupy_module(name, defines)          cupy.RawModule of kernels_cu/<name>.cu, compiled on first use on the
                                        current device
    nvrtc_compile(path, defines, sm)    compile exactly as RawModule would (CuPy's own options, NVRTC),
                                        without a GPU: for CI (tests/test_cuda_compile.py) The op wrappers (skvrt/cuda/attention.py) take a module factory,
`(name, defines) -> module`: `cupy_module` on a GPU, `skvrt.cuda.emu.factory(...)` in the CPU tests.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def kernels_dir() -> Path:
    """kernels_cu/: the installed package `skvrt.kernels_cu`, or the source tree's folder."""
    try:
        return Path(str(resources.files("skvrt.kernels_cu")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "kernels_cu"


def kernel_path(name: str) -> Path:
    path = kernels_dir() / f"{name}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"no CUDA source {path}")
    return path


def expand_includes(path: Path, _seen: frozenset = frozenset()) -> str:
    """The text of `path` with its local includes inlined (each file once per chain; #line keeps error
    positions pointing at the real files)."""
    text = path.read_text()
    if path in _seen:
        raise ValueError(f"include cycle through {path}")
    out, pos = [], 0
    for m in _LOCAL_INCLUDE.finditer(text):
        line = text.count("\n", 0, m.end()) + 2
        inc = path.parent / m.group(1)
        out += [text[pos : m.start()], f'#line 1 "{inc.name}"\n', expand_includes(inc, _seen | {path}),
                f'\n#line {line} "{path.name}"']
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def define_options(defines: dict[str, int]) -> tuple[str, ...]:
    return tuple(f"-D{k}={int(v)}" for k, v in sorted(defines.items()))


def _key(defines: dict[str, int]) -> tuple:
    return tuple(sorted((k, int(v)) for k, v in defines.items()))


@functools.lru_cache(maxsize=None)
def _cupy_module(name: str, key: tuple):
    import cupy

    return cupy.RawModule(code=expand_includes(kernel_path(name)), options=define_options(dict(key)))


def cupy_module(name: str, defines: dict[str, int]):
    """The module factory for a real GPU: cupy.RawModule of kernels_cu/<name>.cu with the defines."""
    return _cupy_module(name, _key(defines))


def cupy_nvrtc_options(defines: dict[str, int], sm: int) -> tuple[str, ...]:
    """NVRTC options of `cupy.RawModule(code, options=define_options(defines))` on a device of compute
    capability `sm`, as CuPy 14 assembles them (cupy/_core/core.pyx assemble_cupy_compiler_options, then
    cupy/cuda/compiler.py: -ftz=true, -arch=sm_XX for a cubin, --device-as-default-execution-space)."""
    from cupy._core import core

    opts = core.assemble_cupy_compiler_options(define_options(defines))
    return (*opts, "-ftz=true", f"-arch=sm_{sm}", "--device-as-default-execution-space")


def nvrtc_compile(source: Path, defines: dict[str, int], sm: int, extra: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """Compile a .cu as RawModule would (its text with local includes inlined, CuPy's options), through
    CuPy's NVRTC binding, which needs no GPU: -> (cubin, NVRTC log). extra: options appended after CuPy's
    (e.g. --ptxas-options=-v for the register report). Raises RuntimeError with the log on a compile error."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(expand_includes(source), source.name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, (*cupy_nvrtc_options(defines, sm), *extra))
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"NVRTC failed on {source.name} {defines} sm_{sm}:\n{log}") from e
        return nvrtc.getCUBIN(prog), nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)
