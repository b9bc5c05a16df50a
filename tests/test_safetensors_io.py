"""skvrt.safetensors_io: round trips, the bf16 rounding against torch, and one clear error per bad file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from skvrt.errors import ModelLoadError
from skvrt.safetensors_io import read_safetensors, write_safetensors


def _sample(rng) -> dict[str, np.ndarray]:
    x = rng.standard_normal((7, 5)).astype(np.float32) * 3
    x[0, :4] = [0.0, -0.0, 65504.0, 1e-8]  # fp16 max, fp16 subnormal-ish
    return {
        "w": x,
        "b": rng.standard_normal(11).astype(np.float32),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 3), np.float32),
        "ids": np.arange(-3, 6, dtype=np.int64),
        "mask": np.array([[1, 0], [0, 1]], dtype=np.uint8),
        "i32": np.array([1, -2, 3], dtype=np.int32),
    }


def test_roundtrip_float32(tmp_path):
    t = _sample(np.random.default_rng(0))
    p = write_safetensors(tmp_path / "a.safetensors", t, dtype="float32", metadata={"note": "hi"})
    r = read_safetensors(p)
    assert set(r) == set(t)
    for k, v in t.items():
        assert r[k].dtype == np.asarray(v).dtype, k
        assert r[k].shape == np.asarray(v).shape, k
        np.testing.assert_array_equal(r[k], v)
    header = json.loads(p.read_bytes()[8:8 + struct.unpack("<Q", p.read_bytes()[:8])[0]])
    assert header["__metadata__"] == {"format": "pt", "note": "hi"}
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed away


def test_roundtrip_float16(tmp_path):
    t = _sample(np.random.default_rng(1))
    r = read_safetensors(write_safetensors(tmp_path / "a.safetensors", t, dtype="float16"))
    for k, v in t.items():
        v = np.asarray(v)
        if v.dtype.kind == "f":
            assert r[k].dtype == np.float32
            np.testing.assert_array_equal(r[k], v.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_array_equal(r[k], v)


def test_roundtrip_bfloat16_against_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is the independent bfloat16 reference")
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(20000) * np.exp(rng.uniform(-30, 30, 20000))).astype(np.float32)
    # exact ties (low 16 bits 0x8000) with both parities of the kept bit, infinities, overflow, tiny values
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF, 0x00008000, 0x00018000], np.uint32)
    x = np.concatenate([x, ties.view(np.float32), np.array([np.inf, -np.inf, 0.0, -0.0, 3.4e38], np.float32)])
    p = write_safetensors(tmp_path / "b.safetensors", {"x": x, "m": x.reshape(-1, 1)[:30]}, dtype="bfloat16")
    r = read_safetensors(p)
    ref = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert r["x"].dtype == np.float32
    np.testing.assert_array_equal(r["x"], ref)
    np.testing.assert_array_equal(r["m"], ref.reshape(-1, 1)[:30])
    # NaN stays NaN
    r2 = read_safetensors(write_safetensors(tmp_path / "n.safetensors", {"n": np.array([np.nan], np.float32)},
                                            dtype="bfloat16"))
    assert np.isnan(r2["n"]).all()


def test_bfloat16_file_loads_in_safetensors_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="torch needed to read the file with the reference reader")
    st = pytest.importorskip("safetensors.torch")
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(np.float32)
    p = write_safetensors(tmp_path / "c.safetensors", {"x": x, "i": np.arange(3)}, dtype="bfloat16")
    loaded = st.load_file(str(p))
    assert loaded["x"].dtype == torch.bfloat16
    np.testing.assert_array_equal(loaded["x"].float().numpy(), torch.from_numpy(x).bfloat16().float().numpy())
    np.testing.assert_array_equal(loaded["i"].numpy(), np.arange(3))


def test_reads_file_written_by_reference_writer(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    t = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "h": np.ones(5, np.float16), "k": np.arange(4)}
    st.save_file(t, str(tmp_path / "ref.safetensors"))
    r = read_safetensors(tmp_path / "ref.safetensors")
    np.testing.assert_array_equal(r["a"], t["a"])
    assert r["h"].dtype == np.float32 and (r["h"] == 1).all()
    assert r["k"].dtype == np.int64


def _good_file(tmp_path):
    return write_safetensors(tmp_path / "good.safetensors",
                             {"first": np.ones((4, 4), np.float32), "second": np.ones((8,), np.float32)})


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        read_safetensors(tmp_path / "nope.safetensors")


def test_shorter_than_8_bytes(tmp_path):
    p = tmp_path / "tiny.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(ModelLoadError, match="tiny.safetensors.*shorter than"):
        read_safetensors(p)


def test_truncated_file_names_tensor(tmp_path):
    p = _good_file(tmp_path)
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(ModelLoadError, match=r"good\.safetensors.*'second'.*truncated"):
        read_safetensors(p)


def test_header_length_larger_than_file(tmp_path):
    p = _good_file(tmp_path)
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 10)
    p.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="header length .* exceeds the file size"):
        read_safetensors(p)


def test_bad_json(tmp_path):
    body = b"{not json!}   "
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        read_safetensors(p)


def test_shape_offset_mismatch(tmp_path):
    header = {"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    body = json.dumps(header).encode()
    p = tmp_path / "mm.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body + bytes(24))
    with pytest.raises(ModelLoadError, match=r"tensor 't'.*needs 24 bytes"):
        read_safetensors(p)


def test_unsupported_dtype(tmp_path):
    header = {"t": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}
    body = json.dumps(header).encode()
    p = tmp_path / "f8.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body + bytes(2))
    with pytest.raises(ModelLoadError, match="unsupported dtype 'F8_E4M3'"):
        read_safetensors(p)


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    import skvrt.safetensors_io as sio

    p = tmp_path / "out.safetensors"
    p.write_bytes(b"old")

    def boom(x):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(sio, "float32_to_bfloat16_bits", boom)  # fails after the header was written
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_safetensors(p, {"a": np.ones(3, np.float32)}, dtype="bfloat16")
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out.safetensors"]
