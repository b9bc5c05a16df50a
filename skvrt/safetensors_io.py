"""Read and write safetensors files with NumPy only (no torch, no `safetensors` bf16 support needed).

Format (reference: the safetensors specification, https://github.com/huggingface/safetensors#format):

    [8 bytes]  N, unsigned little-endian 64-bit: length of the JSON header
    [N bytes]  UTF-8 JSON object: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
                                   "__metadata__": {str: str}}   (metadata optional)
    [rest]     the byte buffer; each tensor's raw little-endian, C-order bytes lie at
               buffer[begin:end], offsets relative to the start of the buffer (byte 8 + N of the file).

NumPy has no bfloat16, so BF16 is handled by bit manipulation: reading shifts each uint16 into the high
half of a uint32 and views it as float32 (exact); writing rounds float32 to nearest-even on the upper 16
bits (the same rounding torch uses for `.to(torch.bfloat16)`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import InputError, ModelLoadError

__all__ = ["read_safetensors", "write_safetensors", "float32_to_bfloat16_bits", "bfloat16_bits_to_float32"]

# safetensors dtype name -> little-endian numpy dtype of the stored bytes. BF16 is stored as raw uint16.
_STORED_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
# Float formats that the reader widens to float32.
_FLOAT_TO_F32 = {"F32", "F16", "BF16"}
# numpy dtype -> safetensors name, for non-float tensors written as they are.
_NP_TO_NAME: dict[np.dtype, str] = {
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64",
    np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}
_WRITE_FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation refuses headers over 100 MB too


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact). Any shape; returns a new float32 array."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, round to nearest, ties to even; NaN stays (quiet) NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lsb = (u >> np.uint64(16)) & np.uint64(1)
    rounded = ((u + np.uint64(0x7FFF) + lsb) >> np.uint64(16)).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint64(16)).astype(np.uint16)) | np.uint16(0x0040)
    return rounded


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fail(path: Path, msg: str) -> ModelLoadError:
    return ModelLoadError(f"{path}: {msg}")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """-> (header JSON object incl. `__metadata__` if present, byte offset where the data starts).
    Reads only the header; a missing, short or corrupt file raises `ModelLoadError` naming it."""
    path = Path(path)
    if not path.exists():
        raise _fail(path, "file not found")
    if not path.is_file():
        raise _fail(path, "not a regular file")
    size = path.stat().st_size
    if size < 8:
        raise _fail(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise _fail(path, f"header length {n} exceeds the file size ({size} bytes): truncated or not a "
                              "safetensors file")
        if n > _MAX_HEADER:
            raise _fail(path, f"header length {n} is implausibly large (over {_MAX_HEADER} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    return header, 8 + n


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file.

    F32/F16/BF16 come back as float32 arrays; other dtypes (I64, I32, U8, BOOL, F64, ...) keep their numpy
    type. F32 and integer tensors are zero-copy copy-on-write views of a memory map of the file (writable,
    changes stay private); F16/BF16 are widened into new arrays. Any malformed input raises
    `ModelLoadError` naming the file (and the tensor, where one is at fault).
    """
    path = Path(path)
    header, base = read_safetensors_header(path)
    size = path.stat().st_size
    buffer_len = size - base
    specs: list[tuple[str, str, tuple[int, ...], int, int]] = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(spec, dict):
            raise _fail(path, f"tensor {name!r}: header entry is not an object")
        dtype, shape, offs = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in _STORED_DTYPES:
            raise _fail(path, f"tensor {name!r}: unsupported dtype {dtype!r}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                    for d in shape)):
            raise _fail(path, f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise _fail(path, f"tensor {name!r}: bad data_offsets {offs!r}")
        begin, end = offs
        nbytes = int(np.prod(shape, dtype=np.int64)) * _STORED_DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise _fail(path, f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets "
                              f"{offs} span {end - begin}")
        if end > buffer_len:
            raise _fail(path, f"tensor {name!r}: data ends at byte {base + end} but the file has only {size} "
                              "bytes (truncated file)")
        specs.append((name, dtype, tuple(shape), begin, end))

    out: dict[str, np.ndarray] = {}
    if not specs:
        return out
    # One copy-on-write map of the whole data buffer; tensors are views into it (no read() copies).
    mm = np.memmap(path, dtype=np.uint8, mode="c", offset=base, shape=(buffer_len,)) if buffer_len else \
        np.zeros(0, np.uint8)
    for name, dtype, shape, begin, end in specs:
        stored = _STORED_DTYPES[dtype]
        arr = mm[begin:end].view(stored).reshape(shape)  # shape: as in the header, C order
        if dtype == "BF16":
            arr = bfloat16_bits_to_float32(arr)
        elif dtype == "F16":
            arr = arr.astype(np.float32)
        elif not stored.isnative:  # big-endian host: byte-swap into a native array
            arr = arr.astype(stored.newbyteorder("="))
        out[name] = arr
    return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], dtype: str = "float32",
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` to a safetensors file atomically (temp file in the same folder, then rename).

    Floating tensors are stored as `dtype` ("float32", "float16" or "bfloat16"; bfloat16 rounds
    float32 to nearest-even); integer/bool tensors keep their own type. `__metadata__` always contains
    `{"format": "pt"}` (transformers refuses files without it) plus `metadata`. Returns the path.
    """
    path = Path(path)
    if dtype not in _WRITE_FLOAT_DTYPES:
        raise InputError(f"unsupported safetensors dtype {dtype!r}: use one of {sorted(_WRITE_FLOAT_DTYPES)}")
    float_name = _WRITE_FLOAT_DTYPES[dtype]
    meta = {"format": "pt"}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InputError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")
        meta[k] = v

    header: dict[str, object] = {"__metadata__": meta}
    plan: list[tuple[str, np.ndarray, str]] = []
    offset = 0
    for name, arr in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise InputError(f"bad tensor name {name!r}")
        arr = np.asarray(arr)
        if arr.dtype.kind == "f":
            st = float_name  # every float (float64 too) is stored as the requested float type
        elif arr.dtype in _NP_TO_NAME:
            st = _NP_TO_NAME[arr.dtype]
        else:
            raise InputError(f"tensor {name!r}: cannot store numpy dtype {arr.dtype}")
        nbytes = arr.size * _STORED_DTYPES[st].itemsize
        header[name] = {"dtype": st, "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        plan.append((name, arr, st))
        offset += nbytes

    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * (-(len(hbytes)) % 8)  # pad so the data buffer starts 8-byte aligned

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(hbytes).to_bytes(8, "little"))
            f.write(hbytes)
            for name, arr, st in plan:
                if st == "BF16":
                    data = float32_to_bfloat16_bits(arr).astype("<u2", copy=False)
                else:
                    data = np.ascontiguousarray(arr, dtype=_STORED_DTYPES[st])
                if data.size:
                    f.write(memoryview(np.ascontiguousarray(data).reshape(-1)).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
