"""Shared pytest fixtures.

`default_gguf`: the default model's verified GGUF (SmolLM2-135M-Instruct Q4_1): $SKVRT_TEST_GGUF if set,
else pulled once into the model store ($SKVRT_HOME; .ci/run points it at the run's own folder).
`converted_default`: the store's fp32 HF folder converted from that GGUF by `skvrt pull`.
Offline and no store: those tests skip with the reason, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skvrt import ckernels


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"default model unavailable in CI: {reason}")
    pytest.skip(f"default model unavailable: {reason}")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    env = os.environ.get("SKVRT_TEST_GGUF")
    if env:
        path = Path(env)
        if not path.is_file():
            pytest.fail(f"SKVRT_TEST_GGUF={env} is not a file")
        return path
    from skvrt.errors import SkvrtError
    from skvrt.store import default_gguf_path

    try:
        return default_gguf_path()
    except SkvrtError as e:
        _unavailable(str(e))


@pytest.fixture(scope="session")
def converted_default(default_gguf) -> Path:
    from skvrt.errors import SkvrtError
    from skvrt.store import pull

    try:
        return pull()
    except SkvrtError as e:
        _unavailable(str(e))


@pytest.fixture(scope="session")
def default_model_dir(converted_default) -> Path:
    return converted_default


@pytest.fixture(scope="session")
def loaded(default_model_dir):
    """The default model loaded once per session (skvrt.loader.LoadedModel; read-only use)."""
    from skvrt.loader import load_folder

    return load_folder(default_model_dir)


@pytest.fixture(params=list(ckernels.VARIANTS))
def klib(request):
    """The C kernels built for each instruction-set variant (skvrt.ckernels.VARIANTS): every code path of a
    kernel -- AVX-512 where the CPU has it, AVX2, plain C -- against the same NumPy twins."""
    try:
        return ckernels.variant_lib(request.param)
    except (RuntimeError, OSError) as e:
        pytest.skip(f"kernel variant {request.param} cannot be built here: {e}")
