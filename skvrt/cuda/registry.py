"""Every CUDA source of kernels_cu/: its entry points and the compile-time configurations (-D defines) the
compile gates build (tests/test_cuda_compile.py) and the GPU suite warms up (skvrt/selftest.py).

Decode and prefill attention are compiled per (HEAD_DIM, GQA, MAX_PAGE); the other ops take their shapes at run time
and compile once (no defines).
"""

from __future__ import annotations

# (HEAD_DIM, GQA, MAX_PAGE): the smallest block, a common model shape with a non-power-of-two page (ADA
# pages hold as many tokens as fit a frame), and the largest shapes the decode kernels take
DECODE_CONFIGS = [(64, 1, 16), (128, 8, 200), (256, 16, 256)]


def decode_defines(cfg) -> dict[str, int]:
    return dict(zip(("HEAD_DIM", "GQA", "MAX_PAGE"), cfg))


# stem -> (entry points, list of defines dicts)
SOURCES: dict[str, tuple[tuple[str, ...], list[dict[str, int]]]] = {
    "dense_decode": (("dense_decode_partial", "decode_combine"), [decode_defines(c) for c in DECODE_CONFIGS]),
    "ada_decode": (("ada_decode_partial", "decode_combine"), [decode_defines(c) for c in DECODE_CONFIGS]),
    "prefill_attention": (("prefill_attention",), [decode_defines(c) for c in DECODE_CONFIGS]),
    "rms_norm": (("rms_norm",), [{}]),
    "rope": (("rope",), [{}]),
    "swiglu": (("swiglu",), [{}]),
    "dense_append": (("dense_append",), [{}]),
    "ada_encode": (("ada_encode_keys", "ada_encode_values"), [{}]),
}


def compile_cases() -> list[tuple[str, dict[str, int]]]:
    """(stem, defines) for every configuration of every source."""
    return [(stem, d) for stem, (_, configs) in SOURCES.items() for d in configs]


def config_label(defines: dict[str, int]) -> str:
    return ",".join(str(v) for _, v in sorted(defines.items())) or "-"
