"""ADA tier: keys as page-local polar codes per RoPE pair, attention logits from the codes (NumPy twin).

Key layout (head_dim D, rotate_half RoPE pairs (i, i + D/2), i < D/2): each pair of a post-RoPE key is a
2-vector with radius rho and angle phi. Per page and pair the tier stores a frame -- first angle theta0,
angle step gamma, first radius rho0, radius step drho (float16 each) -- and per token an angle code a
(ba bits) and a radius code r (br bits), so the pair decodes to
    (rho0 + r * drho) * (cos(theta0 + a * gamma), sin(theta0 + a * gamma)).
The bits per pair differ per (layer, kv head): calibration measures how much each pair contributes to the
logits (E[q_i^2] x the pair's page-local key range) and `allocate_bits` spreads the tier's bit budget by
reverse water-filling; a pair's bits split as ba = ceil(b / 2), br = floor(b / 2).

Logits never rebuild keys: per query head and page, LUT_i[a] = <q_i, (cos, sin)(theta0_i + a gamma_i)>,
logit(t) = scale * sum_i rho_i(t) * LUT_i[a_i(t)]. Values use the QuantTier value codec (int-v groups).
Why page-local frames: on SmolLM2 keys, global spherical codebooks (the paper's form) were 3-8x worse in
attention KL than per-page per-channel int quantization at equal bits; page-local frames + allocation beat
both (docs/ADA_NOTES.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .tiers import FILL_BYTES, POSITION_BYTES, QuantTier

MAX_PAIR_BITS = 12


def allocate_bits(weight: np.ndarray, total_bits: int, max_bits: int = MAX_PAIR_BITS) -> np.ndarray:
    """weight (..., n_pairs) >= 0 -> bits (..., n_pairs) int summing to total_bits on the last axis.

    Greedy reverse water-filling for distortion_i(b) = weight_i * 2**-b: each bit goes to the pair with the
    largest gain weight_i * 2**-(b_i + 1). Ties break to the lower pair index (deterministic)."""
    w = np.asarray(weight, dtype=np.float64)
    flat = w.reshape(-1, w.shape[-1])
    out = np.zeros(flat.shape, dtype=np.int64)
    for row, wr in zip(out, flat):
        for _ in range(total_bits):
            gain = np.where(row < max_bits, wr * np.exp2(-(row + 1.0)), -1.0)
            row[int(np.argmax(gain))] += 1
    return out.reshape(w.shape)


def split_bits(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (b + 1) // 2, b // 2


def pack_bits(fields: list[tuple[np.ndarray, int]], n_bytes: int) -> np.ndarray:
    """fields: [(codes (n,), width)] in order -> (n, n_bytes) uint8, little-endian bit stream per token."""
    n = len(fields[0][0]) if fields else 0
    bits = [((c[:, None] >> np.arange(w)) & 1).astype(np.uint8) for c, w in fields if w]
    stream = np.concatenate(bits, axis=1) if bits else np.zeros((n, 0), np.uint8)
    stream = np.pad(stream, ((0, 0), (0, 8 * n_bytes - stream.shape[1])))
    return np.packbits(stream, axis=1, bitorder="little")


def unpack_bits(packed: np.ndarray, widths: list[int]) -> list[np.ndarray]:
    """(..., n_bytes) uint8 -> one int array (...) per width, in order."""
    stream = np.unpackbits(packed, axis=-1, bitorder="little").astype(np.int64)
    out, o = [], 0
    for w in widths:
        out.append((stream[..., o : o + w] << np.arange(w)).sum(-1) if w else np.zeros(stream.shape[:-1], np.int64))
        o += w
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class AdaTier:
    """pair_bits (L, H, D/2): bits per pair for every (layer, kv head); each row sums to key_bits."""

    pair_bits: np.ndarray
    v_bits: int = 4
    v_group: int = 32

    def __post_init__(self):
        sums = self.pair_bits.sum(-1)
        if not (sums == sums.flat[0]).all() or sums.flat[0] % 8:
            raise ValueError("every (layer, head) must spend the same key bits, a multiple of 8")

    @property
    def key_bits(self) -> int:
        return int(self.pair_bits.sum(-1).flat[0])

    @property
    def name(self) -> str:
        return f"ada{self.key_bits}-v{self.v_bits}"

    @property
    def values(self) -> QuantTier:
        return QuantTier(8, self.v_bits, self.v_group)  # its value codec only

    def alloc(self, n_pages: int, P: int, D: int) -> dict[str, np.ndarray]:
        if D % self.v_group:
            raise ValueError(f"v_group {self.v_group} does not divide head_dim {D}")
        ng = D // self.v_group
        return {
            "codes": np.zeros((n_pages, P, self.key_bits // 8), np.uint8),
            "frame": np.zeros((n_pages, D // 2, 4), np.float16),  # theta0, gamma, rho0, drho per pair
            "v_codes": np.zeros((n_pages, P, D * self.v_bits // 8), np.uint8),
            "v_min": np.zeros((n_pages, P, ng), np.float16),
            "v_scale": np.zeros((n_pages, P, ng), np.float16),
        }

    per_slot = ("codes", "v_codes", "v_min", "v_scale")

    def page_bytes(self, P: int, D: int) -> int:
        k = P * self.key_bits // 8 + (D // 2) * 4 * 2
        v = P * D * self.v_bits // 8 + P * (D // self.v_group) * 2 * 2
        return k + v + FILL_BYTES + POSITION_BYTES * P

    def _widths(self, lh) -> list[int]:
        ba, br = split_bits(self.pair_bits[lh])
        return [int(w) for pair in zip(ba, br) for w in pair]

    def write_page(self, data, pid: int, k: np.ndarray, v: np.ndarray, lh=(0, 0)) -> None:
        """Encode n <= P tokens (k, v (n, D) float32) of (layer, head) = lh into an empty page."""
        n, D = k.shape
        h2 = D // 2
        x, y = k[:, :h2].astype(np.float64), k[:, h2:].astype(np.float64)  # (n, D/2) pair coordinates
        rho, phi = np.hypot(x, y), np.arctan2(y, x)
        mean = np.angle(np.sum(rho * np.exp(1j * phi), axis=0))  # (D/2,) rho-weighted circular mean
        off = np.angle(np.exp(1j * (phi - mean)))  # (n, D/2) in (-pi, pi]
        ba, br = split_bits(self.pair_bits[lh])
        na, nr = (1 << ba), (1 << br)
        lo, hi = off.min(0), off.max(0)
        theta0 = np.where(na > 1, mean + lo, mean + (lo + hi) / 2)
        gamma = np.where(na > 1, (hi - lo) / np.maximum(na - 1, 1), 0.0)
        rlo, rhi = rho.min(0), rho.max(0)
        rho0 = np.where(nr > 1, rlo, rho.mean(0))
        drho = np.where(nr > 1, (rhi - rlo) / np.maximum(nr - 1, 1), 0.0)
        frame = np.stack([np.angle(np.exp(1j * theta0)), gamma, rho0, drho], axis=-1).astype(np.float16)  # (D/2, 4)
        f32 = frame.astype(np.float64)  # codes from the stored (rounded) frame, so decoding is consistent
        # angle past the stored theta0: the offset from the page's lowest angle (in [0, span], span may
        # exceed pi for pairs that rotate fast) plus the tiny rounding shift of theta0; never re-wrapped
        rel = (off - lo) + np.angle(np.exp(1j * (theta0 - f32[:, 0])))
        a = np.where(f32[:, 1] > 0, np.rint(rel / np.where(f32[:, 1] > 0, f32[:, 1], 1)), 0)
        r = np.where(f32[:, 3] > 0, np.rint((rho - f32[:, 2]) / np.where(f32[:, 3] > 0, f32[:, 3], 1)), 0)
        a = np.clip(a, 0, na - 1).astype(np.int64)
        r = np.clip(r, 0, nr - 1).astype(np.int64)
        fields = [(c[:, i], int(w)) for i in range(h2) for c, w in ((a, ba[i]), (r, br[i]))]
        data["codes"][pid, :n] = pack_bits(fields, self.key_bits // 8)
        data["frame"][pid] = frame
        vc, vmn, vsc = self.values.encode_values(v)
        data["v_codes"][pid, :n], data["v_min"][pid, :n], data["v_scale"][pid, :n] = vc, vmn, vsc

    def codes(self, data, pids: np.ndarray, lh) -> tuple[np.ndarray, np.ndarray]:
        """-> angle codes a, radius codes r, each (n_pages, P, D/2) int."""
        fields = unpack_bits(data["codes"][pids], self._widths(lh))
        return np.stack(fields[0::2], -1), np.stack(fields[1::2], -1)

    def scores(self, data, pids: np.ndarray, q: np.ndarray, lh, scale: float) -> np.ndarray:
        """Logits from codes. q (G, T, D) -> (G, T, n_pages, P) = scale * sum_i rho_i * LUT_i[a_i]."""
        G, T, D = q.shape
        h2 = D // 2
        a, r = self.codes(data, pids, lh)  # (n, P, h2)
        fr = data["frame"][pids].astype(np.float32)  # (n, h2, 4)
        na = int((1 << split_bits(self.pair_bits[lh])[0]).max())
        ang = fr[:, :, 0, None] + np.arange(na, dtype=np.float32) * fr[:, :, 1, None]  # (n, h2, na)
        # LUT (G, T, n, h2, na): <q_i, (cos, sin)(angle)>
        cos, sin = np.cos(ang), np.sin(ang)
        rho = fr[:, None, :, 2] + r * fr[:, None, :, 3]  # (n, P, h2)
        out = np.empty((G, T, len(pids), a.shape[1]), np.float32)
        for t0 in range(0, T, 8):  # query blocks bound the (G, t, n, P, h2) gather
            qb = q[:, t0 : t0 + 8]
            lut = qb[:, :, None, :h2, None] * cos + qb[:, :, None, h2:, None] * sin  # (G, t, n, h2, na)
            picked = np.take_along_axis(lut[:, :, :, None], a[None, None, :, :, :, None], axis=-1)[..., 0]
            out[:, t0 : t0 + 8] = np.einsum("gtnpi,npi->gtnp", picked, rho)
        return out * np.float32(scale)

    def read_values(self, data, pids: np.ndarray) -> np.ndarray:
        D = data["frame"].shape[1] * 2
        vt = self.values
        from .tiers import unpack

        vc = unpack(data["v_codes"][pids], vt.v_bits, D).astype(np.float32)
        n, P = vc.shape[:2]
        vc = vc.reshape(n, P, D // vt.v_group, vt.v_group)
        v = vc * data["v_scale"][pids][..., None].astype(np.float32) + data["v_min"][pids][..., None].astype(np.float32)
        return v.reshape(n, P, D)

    def decode_keys(self, data, pids: np.ndarray, lh) -> np.ndarray:
        """Test/report helper only (the attention path never calls it): keys (n, P, D) the codes stand for."""
        a, r = self.codes(data, pids, lh)
        fr = data["frame"][pids].astype(np.float32)
        ang = fr[:, None, :, 0] + a * fr[:, None, :, 1]
        rho = fr[:, None, :, 2] + r * fr[:, None, :, 3]
        return np.concatenate([rho * np.cos(ang), rho * np.sin(ang)], axis=-1)
