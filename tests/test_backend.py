"""Device selection (skvrt/backend.py): --device auto|cpu|cuda, $SKVRT_DEVICE, device= in skvrt.load.

This machine (and CI) has no GPU, so `cuda` must fail with one clear message naming the reason, `auto` must
pick the CPU and say why, and nothing may fall back silently. The probe's three conditions (CuPy imports, a
device is visible, NVRTC loads) are each exercised by faking the failing piece.
"""

from __future__ import annotations

import builtins
import os
import subprocess
import sys

import pytest

from skvrt import backend
from skvrt.backend import DeviceError, select


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(backend.ENV, raising=False)


def test_cpu_never_probes_cuda(monkeypatch):
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda: pytest.fail("cpu probed CUDA"))
    d = select("cpu")
    assert (d.name, d.requested) == ("cpu", "cpu")
    import numpy

    assert d.xp is numpy
    with pytest.raises(DeviceError, match="module factory needs device cuda"):
        d.module_factory()


def test_request_order_argument_env_default(monkeypatch):
    assert backend.requested_device() == "auto"
    monkeypatch.setenv(backend.ENV, "CPU")
    assert backend.requested_device() == "cpu"
    assert backend.requested_device("cuda") == "cuda"  # the argument wins over the environment
    monkeypatch.setenv(backend.ENV, "tpu")
    with pytest.raises(DeviceError, match=r"\$SKVRT_DEVICE='tpu': must be one of auto, cpu, cuda"):
        backend.requested_device()
    with pytest.raises(DeviceError, match="device='gpu'"):
        backend.requested_device("gpu")


def test_this_machine_has_no_usable_gpu():
    """The real probe, here: the reason is one line and names what is missing."""
    why = backend.cuda_unavailable_reason()
    if why is None:
        pytest.skip("a usable GPU is present")
    assert "\n" not in why and len(why) < 400
    assert any(w in why for w in ("CuPy", "GPU", "NVRTC"))


@pytest.mark.skipif(backend.cuda_unavailable_reason() is None, reason="a usable GPU is present")
def test_cuda_fails_loudly_auto_picks_cpu_with_reason():
    why = backend.cuda_unavailable_reason()
    with pytest.raises(DeviceError) as e:
        select("cuda")
    assert str(e.value) == f"--device cuda: no GPU: {why}"
    d = select("auto")
    assert d.name == "cpu" and d.reason == f"no GPU: {why}" and "auto: no GPU" in str(d)
    # for the model the same probe decides (the model runs on CUDA: backend.MODEL_ON_CUDA)
    assert backend.MODEL_ON_CUDA
    d = select("auto", for_model=True)
    assert d.name == "cpu" and d.reason == f"no GPU: {why}"


def _fake_import_error(monkeypatch, name):
    real = builtins.__import__

    def imp(mod, *a, **k):
        if mod == name or mod.startswith(name + "."):
            raise ImportError(f"No module named {name!r}")
        return real(mod, *a, **k)

    monkeypatch.setattr(builtins, "__import__", imp)


def test_reason_names_a_missing_cupy(monkeypatch):
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    _fake_import_error(monkeypatch, "cupy")
    why = backend.cuda_unavailable_reason()
    assert why.startswith("CuPy does not import") and "pip install cupy-cuda" in why
    with pytest.raises(DeviceError, match="--device cuda: no GPU: CuPy does not import"):
        select("cuda")


class _FakeRuntime:
    def __init__(self, n=None, exc=None):
        self.n, self.exc = n, exc

    def getDeviceCount(self):
        if self.exc:
            raise self.exc
        return self.n


class _FakeCupy:
    __version__ = "0-fake"

    def __init__(self, runtime):
        self.cuda = type("cuda", (), {"runtime": runtime})()


def test_reason_names_no_device_and_zero_devices(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy(_FakeRuntime(exc=RuntimeError("cudaErrorNoDevice"))))
    assert backend.cuda_unavailable_reason() == ("the CUDA runtime finds no usable GPU (RuntimeError: "
                                                 "cudaErrorNoDevice)")
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy(_FakeRuntime(n=0)))
    assert "0 GPUs" in backend.cuda_unavailable_reason()


def test_reason_names_a_missing_nvrtc(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy(_FakeRuntime(n=1)))

    class _Nvrtc:
        @staticmethod
        def getVersion():
            raise OSError("libnvrtc.so.13: cannot open shared object file")

    libs = type(sys)("cupy_backends.cuda.libs")
    libs.nvrtc = _Nvrtc
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", libs)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", _Nvrtc)
    why = backend.cuda_unavailable_reason()
    assert why.startswith("NVRTC does not load (OSError: libnvrtc.so.13") and "nvidia-cuda-nvrtc" in why


def test_a_working_gpu_without_cublas_cannot_run_the_model_no_fallback(monkeypatch):
    """A GPU with CuPy and NVRTC runs the kernels; the model also needs cuBLAS: without it, `cuda` for the model
    is an error naming cuBLAS and `auto` picks the CPU saying why."""
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setattr(backend, "cuda_info", lambda: "Fake H200, sm_90")
    monkeypatch.setattr(backend, "cublas_unavailable_reason", lambda: "cuBLAS does not load (x)")
    d = select("cuda")  # the kernels alone (skvrt.selftest) may use it
    assert d.name == "cuda" and d.info == "Fake H200, sm_90"
    with pytest.raises(DeviceError, match="the GPU cannot run the model: cuBLAS does not load"):
        select("cuda", for_model=True)
    assert select("auto").name == "cuda"
    d = select("auto", for_model=True)
    assert d.name == "cpu" and "cuBLAS" in d.reason
    monkeypatch.setattr(backend, "cublas_unavailable_reason", lambda: None)
    assert select("cuda", for_model=True).name == "cuda" and select("auto", for_model=True).name == "cuda"


def test_load_fails_before_reading_the_model(monkeypatch):
    """skvrt.load(device="cuda") raises DeviceError first (no model folder is resolved or read)."""
    import skvrt

    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda: "the CUDA runtime finds no usable GPU (x)")
    with pytest.raises(DeviceError, match="no GPU: the CUDA runtime finds no usable GPU"):
        skvrt.load("/nonexistent/model/folder", device="cuda")
    monkeypatch.setenv(backend.ENV, "cuda")
    with pytest.raises(DeviceError):
        skvrt.load("/nonexistent/model/folder")


@pytest.mark.skipif(backend.cuda_unavailable_reason() is None, reason="a usable GPU is present")
@pytest.mark.parametrize("cmd", [["run", "-p", "hi"], ["chat"], ["bench", "--contexts", "8"]])
def test_cli_device_cuda_one_clear_error(cmd):
    """`skvrt <cmd> --device cuda` here: exit 1, one line `error: --device cuda: no GPU: <reason>`, nothing on
    stdout, before any model is loaded (the model folder does not exist)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "skvrt.cli.main", *cmd, "-m", "/nonexistent/m", "--device", "cuda"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: no GPU: "), r.stderr


def test_cli_bad_device_value():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "skvrt.cli.main", "run", "-p", "hi", "-m", "/nonexistent/m",
                        "--device", "tpu"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == "error: device='tpu': must be one of auto, cpu, cuda"
