"""Device selection: `--device auto|cpu|cuda` (CLI), `device=` (skvrt.load / LLM), `$SKVRT_DEVICE`.

    cpu    NumPy + the C kernels (kernels_c/); always available.
    cuda   CuPy + the CUDA kernels of kernels_cu/ through RawModule (skvrt/cuda). Needs all three of: CuPy
           imports, the CUDA runtime sees a device, NVRTC loads (the `nvidia-cuda-nvrtc` wheel or a toolkit).
           If any is missing, selecting `cuda` raises DeviceError naming the first missing piece; it never
           falls back to the CPU.
    auto   `cuda` when all three hold *and* the runtime can run the model there, else `cpu`; the reason for
           the choice is kept (Device.reason; LLM.device).

The explicit argument wins over $SKVRT_DEVICE, which wins over "auto". Probing imports CuPy only when CUDA is
a candidate (auto or cuda); `cpu` never touches it.

The model on CUDA (MODEL_ON_CUDA): weights on the device in float16, activations float32, the row ops and
attention through the RawModule kernels, GEMMs through cuBLAS (skvrt/cuda/model_ops.py), the KV cache's pages on
the device (skvrt/cuda/cache.py DeviceKVCache: policies full, window, ada; the budgeted RDR policies raise
InputError). Running the model also needs cuBLAS (the `nvidia-cublas` wheel or a toolkit): for the model,
`cuda` raises DeviceError and `auto` picks the CPU when it does not load. The kernels alone:
`python -m skvrt.selftest --gpu`.
"""

from __future__ import annotations

import dataclasses
import os

from .errors import SkvrtError

DEVICES = ("auto", "cpu", "cuda")
ENV = "SKVRT_DEVICE"
MODEL_ON_CUDA = True  # the end-to-end model runs on CUDA (skvrt/cuda/model_ops.py, cache.py)


class DeviceError(SkvrtError):
    """The requested device cannot be used (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Device:
    name: str         # "cpu" or "cuda"
    requested: str    # what was asked for: "auto", "cpu" or "cuda"
    reason: str       # why this device (auto), or "requested"
    info: str = ""    # cuda: device name, compute capability, NVRTC version

    @property
    def xp(self):
        """The array module of this device: numpy or cupy."""
        if self.name == "cuda":
            import cupy

            return cupy
        import numpy

        return numpy

    def module_factory(self):
        """(kernels_cu stem, defines) -> module with get_function: cupy RawModule on cuda."""
        if self.name != "cuda":
            raise DeviceError("the CUDA module factory needs device cuda (the CPU runs kernels_c/; the CUDA "
                              "emulator for tests is skvrt.cuda.emu.factory)")
        from .cuda.loader import cupy_module

        return cupy_module

    def __str__(self) -> str:
        s = self.name + (f" ({self.info})" if self.info else "")
        return s if self.requested != "auto" else f"{s} [auto: {self.reason}]"


def cuda_unavailable_reason() -> str | None:
    """None when CUDA kernels can run here (CuPy imports, a device is visible, NVRTC loads); else why not,
    one line, naming the missing piece and the fix."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken install raising something else
        return (f"CuPy does not import ({type(e).__name__}: {e}); install the wheel matching the driver's CUDA, "
                f"e.g. pip install cupy-cuda12x or cupy-cuda13x")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, driver too old, no device
        return f"the CUDA runtime finds no usable GPU ({type(e).__name__}: {e})"
    if n < 1:
        return "the CUDA runtime reports 0 GPUs (check CUDA_VISIBLE_DEVICES)"
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:
        return f"NVRTC does not load ({type(e).__name__}: {e}); pip install nvidia-cuda-nvrtc-cu12 (or -cu13)"
    return None


def cublas_unavailable_reason() -> str | None:
    """None when cuBLAS loads through CuPy (the model's GEMMs); else why not, one line."""
    try:
        from cupy_backends.cuda.libs import cublas  # noqa: F401  (loads libcublas / libcublasLt)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"cuBLAS does not load ({type(e).__name__}: {first}); pip install nvidia-cublas (CUDA 13) or nvidia-cublas-cu12"
    return None


def cuda_info() -> str:
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props.get("name", b"?")
    name = name.decode() if isinstance(name, bytes) else str(name)
    major, minor = nvrtc.getVersion()
    return f"{name}, sm_{dev.compute_capability}, NVRTC {major}.{minor}, CuPy {cupy.__version__}"


def requested_device(device: str | None = None) -> str:
    """The device asked for: the argument, else $SKVRT_DEVICE, else auto (validated, lower-cased)."""
    src = "device" if device is not None else f"${ENV}"
    value = device if device is not None else os.environ.get(ENV) or "auto"
    v = str(value).strip().lower()
    if v not in DEVICES:
        raise DeviceError(f"{src}={value!r}: must be one of {', '.join(DEVICES)}")
    return v


def select(device: str | None = None, *, for_model: bool = False) -> Device:
    """Resolve the device. for_model: the caller will run the whole model there (skvrt.load), so CUDA must
    also support the model path (MODEL_ON_CUDA). `cuda` raises DeviceError with the reason; never falls back."""
    req = requested_device(device)
    if req == "cpu":
        return Device("cpu", req, "requested")
    if req == "auto" and for_model and not MODEL_ON_CUDA:  # no probe (importing CuPy costs ~1 s)
        return Device("cpu", req, "the model does not run on CUDA yet (skvrt.backend.MODEL_ON_CUDA)")
    why = cuda_unavailable_reason()
    label = "no GPU: "
    if why is None and for_model:  # the model's GEMMs need cuBLAS too
        why, label = cublas_unavailable_reason(), "the GPU cannot run the model: "
    if req == "cuda":
        if why is not None:
            raise DeviceError(f"--device cuda: {label}{why}")
        info = cuda_info()
        if for_model and not MODEL_ON_CUDA:
            raise DeviceError(f"--device cuda: a GPU is here ({info}) but the end-to-end model does not run on "
                              f"CUDA yet (only the kernels do: python -m skvrt.selftest --gpu); use --device cpu")
        return Device("cuda", req, "requested", info)
    if why is not None:
        return Device("cpu", req, f"{label}{why}")
    return Device("cuda", req, "CuPy, a GPU and NVRTC found" + (" (and cuBLAS)" if for_model else ""), cuda_info())
