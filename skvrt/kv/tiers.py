"""Storage tiers: how one page of P tokens of one (layer, kv head) is stored, and the NumPy codecs.

A tier describes one page of P tokens as `fields(P, D)`: [(name, dtype, per-page shape)] ("P" = the page's
token count); pools lay them out inside arena frames (skvrt.kv.pool, skvrt.kv.layout). `page_bytes(P, D)`
counts every byte such a page holds (payload, per-page and per-token scales, positions, fill count).

    DenseTier(dtype)         k, v (N, P, D) float16 / float32 as they are
    QuantTier(k_bits, v_bits, v_group)
        keys:   per-channel asymmetric integers over the page (KIVI-style): k_codes (N, P, D*kb/8) uint8,
                k_min, k_scale (N, D) float16 -- one range per channel per page, so a page is encoded whole
        values: per-token groups of v_group dims: v_codes (N, P, D*vb/8) uint8, v_min, v_scale
                (N, P, D/v_group) float16
Codes are packed little-endian within a byte (element 0 in the low bits).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import layout


class _Tier:
    """What every tier shares: plain arrays for its fields, and bytes per page."""

    def alloc(self, n_pages: int, P: int, D: int) -> dict[str, np.ndarray]:
        """Contiguous arrays (n_pages, ...) of the tier's fields (codec tests, calibration reports)."""
        return layout.alloc_arrays(self, n_pages, P, D)

    def page_bytes(self, P: int, D: int, track_mass: bool = False) -> int:
        """Bytes of one page of P tokens: fields + positions (+ mass) + its fill count."""
        return layout.page_bytes(self, P, D, track_mass) + layout.FILL_BYTES


@dataclasses.dataclass(frozen=True)
class DenseTier(_Tier):
    dtype: str = "float16"

    @property
    def name(self) -> str:
        return "dense" if self.dtype == "float16" else f"dense-{self.dtype}"

    def fields(self, P, D):
        return [("k", self.dtype, ("P", D)), ("v", self.dtype, ("P", D))]

    def bytes_per_token(self, D: int) -> int:
        return 2 * D * np.dtype(self.dtype).itemsize

    def write(self, data, pid: int, slot: int, k: np.ndarray, v: np.ndarray) -> None:
        data["k"][pid, slot : slot + len(k)] = k
        data["v"][pid, slot : slot + len(v)] = v

    def read(self, data, pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> K, V (n, P, D) float32 for the pages (all slots; callers mask by fill)."""
        return data["k"][pids].astype(np.float32), data["v"][pids].astype(np.float32)

    per_slot = ("k", "v")  # arrays indexed [pid, slot]: what compaction moves


def value_fields(D: int, v_bits: int, v_group: int) -> list:
    """The value codec's fields: per-token groups of v_group dims, codes + float16 min / scale per group."""
    ng = D // v_group
    return [("v_codes", "uint8", ("P", D * v_bits // 8)), ("v_min", "float16", ("P", ng)),
            ("v_scale", "float16", ("P", ng))]


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes (..., n) uint8 < 2**bits, n * bits % 8 == 0 -> (..., n * bits / 8) uint8."""
    if bits == 8:
        return codes.astype(np.uint8)
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], -1, per).astype(np.uint8)
    out = np.zeros(c.shape[:-1], np.uint8)
    for j in range(per):
        out |= c[..., j] << (bits * j)
    return out


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return packed[..., :n]
    per = 8 // bits
    mask = (1 << bits) - 1
    out = np.stack([(packed >> (bits * j)) & mask for j in range(per)], axis=-1)
    return out.reshape(*packed.shape[:-1], -1)[..., :n]


def quantize(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int):
    """Asymmetric uniform: -> codes uint8, min fp16, scale fp16 (codes computed with the rounded fp16 params)."""
    levels = (1 << bits) - 1
    mn = lo.astype(np.float16)
    scale = ((hi - mn.astype(np.float32)) / levels).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(1.0)).astype(np.float16)
    q = np.rint((x - mn.astype(np.float32)) / scale.astype(np.float32))
    return np.clip(q, 0, levels).astype(np.uint8), mn, scale


@dataclasses.dataclass(frozen=True)
class QuantTier(_Tier):
    k_bits: int = 4
    v_bits: int = 4
    v_group: int = 32

    def __post_init__(self):
        for b in (self.k_bits, self.v_bits):
            if b not in (2, 4, 8):
                raise ValueError(f"quant tier bits must be 2, 4 or 8, not {b}")

    @property
    def name(self) -> str:
        return f"quant-k{self.k_bits}v{self.v_bits}"

    def fields(self, P, D):
        if D % self.v_group:
            raise ValueError(f"v_group {self.v_group} does not divide head_dim {D}")
        return [("k_codes", "uint8", ("P", D * self.k_bits // 8)), ("k_min", "float16", (D,)),
                ("k_scale", "float16", (D,)), *value_fields(D, self.v_bits, self.v_group)]

    per_slot = ("k_codes", "v_codes", "v_min", "v_scale")

    def encode_values(self, v: np.ndarray):
        """v (n, D) -> codes (n, D*vb/8), min, scale (n, D/g)."""
        n, D = v.shape
        g = v.reshape(n, D // self.v_group, self.v_group)
        codes, mn, sc = quantize(g, g.min(-1, keepdims=True), g.max(-1, keepdims=True), self.v_bits)
        return pack(codes.reshape(n, D), self.v_bits), mn[..., 0], sc[..., 0]

    def write_page(self, data, pid: int, k: np.ndarray, v: np.ndarray, lh=None) -> None:
        """Encode n <= P tokens into an empty page: k, v (n, D) float32 (lh, the (layer, head), unused)."""
        n, D = k.shape
        codes, mn, sc = quantize(k, k.min(0), k.max(0), self.k_bits)  # per channel over the page
        data["k_codes"][pid, :n] = pack(codes, self.k_bits)
        data["k_min"][pid], data["k_scale"][pid] = mn, sc
        vc, vmn, vsc = self.encode_values(v)
        data["v_codes"][pid, :n], data["v_min"][pid, :n], data["v_scale"][pid, :n] = vc, vmn, vsc

    def read(self, data, pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> K, V (n, P, D) float32, dequantized (NumPy twin; slots past fill are garbage, mask them)."""
        D = data["k_min"].shape[1]
        kc = unpack(data["k_codes"][pids], self.k_bits, D).astype(np.float32)  # (n, P, D)
        k = kc * data["k_scale"][pids][:, None].astype(np.float32) + data["k_min"][pids][:, None].astype(np.float32)
        vc = unpack(data["v_codes"][pids], self.v_bits, D).astype(np.float32)
        n, P = vc.shape[:2]
        vc = vc.reshape(n, P, D // self.v_group, self.v_group)
        v = vc * data["v_scale"][pids][..., None].astype(np.float32) + data["v_min"][pids][..., None].astype(np.float32)
        return k, v.reshape(n, P, D)
