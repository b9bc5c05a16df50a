"""Shared pytest fixtures.

`default_gguf`: path of the default model's GGUF (SmolLM2-135M-Instruct Q4_1), from env SKVRT_TEST_GGUF;
tests that need it are skipped when it is not set.
`converted_default`: that GGUF converted once per session to an fp32 Hugging Face folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    env = os.environ.get("SKVRT_TEST_GGUF")
    if not env:
        pytest.skip("set SKVRT_TEST_GGUF to the path of SmolLM2-135M-Instruct.Q4_1.gguf to run this test")
    path = Path(env)
    if not path.is_file():
        pytest.fail(f"SKVRT_TEST_GGUF={env} is not a file")
    return path


@pytest.fixture(scope="session")
def converted_default(tmp_path_factory, default_gguf) -> Path:
    from skvrt.gguf_import import convert_gguf

    return convert_gguf(default_gguf, tmp_path_factory.mktemp("converted") / "smollm2", dtype="float32")
