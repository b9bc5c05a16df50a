"""Every CUDA source compiles the way the GPU backend will compile it, without a GPU.

1. NVRTC exactly as cupy.RawModule does (CuPy's own option assembly: its CCCL / CUDA include paths,
   --std=c++17, -ftz=true, -arch=sm_XX, --device-as-default-execution-space; skvrt.cuda.loader), for sm_80
   and sm_90, through CuPy's NVRTC binding; ptxas's report of that very compile is gated: no spills, no
   stack frame (local memory).
2. nvcc -Xptxas -v on the same sources: the same gates on nvcc's build.
The register / shared memory / spill table of both is written to the terminal at the end of the module.
Skips, with the reason, where CuPy + the NVRTC wheel or nvcc are missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from skvrt.cuda import loader, registry

ARCHS = (80, 90)
SOURCES = sorted(p.stem for p in loader.kernels_dir().glob("*.cu"))
# every configuration of every source (skvrt/cuda/registry.py: decode attention per (HEAD_DIM, GQA,
# MAX_PAGE); the other ops compile once, shapes at run time)
CASES = [pytest.param(stem, d, id=f"{stem}-{registry.config_label(d)}") for stem, d in registry.compile_cases()]
SELFTEST = Path(__file__).parent / "cuda_emu" / "emu_selftest.cu"

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")


def _nvrtc_reason() -> str | None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        loader.cupy_nvrtc_options({}, 80)
    except Exception as e:  # ImportError, a missing libnvrtc, CuPy finding no CUDA headers
        return f"CuPy's NVRTC path unavailable ({type(e).__name__}: {e}); pip install cupy-cuda13x nvidia-cuda-nvrtc"
    return None


NVRTC_MISSING = _nvrtc_reason()
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


def parse_ptxas(log: str) -> list[dict]:
    """ptxas -v output -> one row per (kernel, arch): registers, smem, stack, spill stores / loads."""
    rows = []
    parts = _ENTRY.split(log)
    for kernel, arch, body in zip(parts[1::3], parts[2::3], parts[3::3]):
        num = lambda pat: int(m.group(1)) if (m := re.search(pat, body)) else 0  # noqa: E731
        rows.append({"kernel": kernel, "arch": arch, "registers": num(r"Used (\d+) registers"),
                     "smem": num(r"(\d+) bytes smem"), "stack": num(r"(\d+) bytes stack frame"),
                     "spill_st": num(r"(\d+) bytes spill stores"), "spill_ld": num(r"(\d+) bytes spill loads"),
                     "lmem": num(r"(\d+) bytes lmem")})
    return rows


@pytest.fixture(scope="module")
def table(request):
    """Collects the ptxas rows; written to the terminal (also without -s) when the module ends."""
    rows: list[tuple] = []
    yield rows
    plugins = request.config.pluginmanager
    tr, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if not rows or tr is None:
        return
    with capture.global_and_fixture_disabled():
        write_table(tr, rows)


def write_table(tr, rows) -> None:
    tr.write_line("")
    tr.write_line("CUDA kernels compiled (registers / static smem bytes / stack / spill stores / spill loads):")
    tr.write_line("| compiler | source | defines | kernel | arch | regs | smem | stack | spill st | spill ld |")
    tr.write_line("|---|---|---|---|---|---|---|---|---|---|")
    for compiler, source, cfg, r in rows:
        tr.write_line(f"| {compiler} | {source} | {cfg} | {r['kernel']} | {r['arch']} | {r['registers']} | "
                      f"{r['smem']} | {r['stack']} | {r['spill_st']} | {r['spill_ld']} |")


def gate(rows: list[dict], what: str) -> None:
    assert rows, f"{what}: ptxas reported no kernel"
    for r in rows:
        assert r["spill_st"] == r["spill_ld"] == 0, f"{what} {r['kernel']} {r['arch']}: register spills {r}"
        assert r["stack"] == 0 and r["lmem"] == 0, f"{what} {r['kernel']} {r['arch']}: local memory {r}"


def test_every_source_is_registered():
    assert SOURCES == sorted(registry.SOURCES)


@pytest.mark.skipif(NVRTC_MISSING is not None, reason=str(NVRTC_MISSING))
@pytest.mark.parametrize("sm", ARCHS)
@pytest.mark.parametrize("source,defs", CASES)
def test_nvrtc_compiles_as_cupy_rawmodule(source, defs, sm, table):
    cubin, log = loader.nvrtc_compile(loader.kernel_path(source), defs, sm, ("--ptxas-options=-v",))
    assert cubin[:4] == b"\x7fELF"
    rows = parse_ptxas(log)
    assert {r["kernel"] for r in rows} == set(registry.SOURCES[source][0])
    gate(rows, f"NVRTC {source}.cu {defs}")
    table.extend(("nvrtc", f"{source}.cu", registry.config_label(defs), r) for r in rows)


@pytest.mark.skipif(NVRTC_MISSING is not None, reason=str(NVRTC_MISSING))
def test_nvrtc_compiles_the_emulator_selftest_kernels():
    """The emulator's own test kernels are valid CUDA too (what the emulator runs, a GPU would)."""
    cubin, _ = loader.nvrtc_compile(SELFTEST, {}, 90)
    assert cubin[:4] == b"\x7fELF"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (the CUDA toolkit's compiler is needed for the ptxas gate)")
@pytest.mark.parametrize("source,defs", CASES)
def test_nvcc_ptxas_no_spills_no_local_memory(source, defs, table, tmp_path):
    gencode = [f"-gencode=arch=compute_{sm},code=sm_{sm}" for sm in ARCHS]
    r = subprocess.run([NVCC, "-fatbin", *gencode, "-Xptxas", "-v", *loader.define_options(defs), "-o",
                        str(tmp_path / "k.fatbin"), str(loader.kernel_path(source))], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = parse_ptxas(r.stderr + r.stdout)
    assert {x["arch"] for x in rows} == {f"sm_{sm}" for sm in ARCHS}
    gate(rows, f"nvcc {source}.cu {defs}")
    table.extend(("nvcc", f"{source}.cu", registry.config_label(defs), x) for x in rows)
