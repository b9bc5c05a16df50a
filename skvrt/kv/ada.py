"""ADA tier: keys as page-local polar codes per RoPE pair, attention logits from the codes (NumPy twin).

Key layout (head_dim D, rotate_half RoPE pairs (i, i + D/2), i < D/2): each pair of a post-RoPE key is a
2-vector with radius rho and angle phi. Per page and pair the tier stores a frame -- first angle theta0,
angle step gamma, first radius rho0, radius step drho (float16 each) -- and per token an angle code a
(ba bits) and a radius code r (br bits), so the pair decodes to
    (rho0 + r * drho) * (cos(theta0 + a * gamma), sin(theta0 + a * gamma)).
The bits per pair differ per (layer, kv head): calibration measures how much each pair contributes to the
logits and how the tier's bit budget is spread over them: with the sidecar's measured error tables
(`polar_error_tables`: the logit error of each pair's angle code alone and radius code alone at 0..MAX_WIDTH bits)
`allocate_polar_bits` chooses every pair's angle and radius widths separately; without them, `allocate_bits`
spreads bits by reverse water-filling on E[q_i^2] x the pair's page-local key range, and a pair's bits split as
ba = ceil(b / 2), br = floor(b / 2).

Logits never rebuild keys: per query head and page, LUT_i[a] = <q_i, (cos, sin)(theta0_i + a gamma_i)>,
logit(t) = scale * sum_i rho_i(t) * LUT_i[a_i(t)]. Values use the QuantTier value codec (int-v groups).
Why page-local frames: on SmolLM2 keys, global spherical codebooks (the paper's form) were 3-8x worse in
attention KL than per-page per-channel int quantization at equal bits; page-local frames + allocation beat
both (docs/ADA_NOTES.md).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .tiers import QuantTier, _Tier, value_fields

MAX_PAIR_BITS = 12
MAX_WIDTH = 6  # most bits of one angle or radius code (LUTs of 2^6 entries: the C kernels' in-register lookups)


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


def allocate_polar_bits(angle_err: np.ndarray, radius_err: np.ndarray, total_bits: int,
                        max_pair: int = MAX_PAIR_BITS) -> tuple[np.ndarray, np.ndarray]:
    """angle_err, radius_err (..., n_pairs, W + 1): logit error of a pair when only its angle (radius) is coded
    with 0..W bits -> angle bits, radius bits (..., n_pairs) int, together summing to total_bits per row.

    The error of a pair is modelled as angle_err[ba] + radius_err[br]. Greedy by error saved per bit; a move
    adds 1, 2 or 3 bits to one code (a 1-bit angle code can be worse than none: its two levels sit on the arc's
    ends). Ties go to the lower pair, the angle, the shorter move (deterministic)."""
    ea = np.asarray(angle_err, np.float64)
    er = np.asarray(radius_err, np.float64)
    W = ea.shape[-1] - 1
    n = ea.shape[-2]
    if total_bits > n * min(max_pair, 2 * W):
        raise ValueError(f"{total_bits} bits do not fit {n} pairs of at most {min(max_pair, 2 * W)} bits")
    tables = (ea.reshape(-1, n, W + 1), er.reshape(-1, n, W + 1))  # (R, n, W + 1) each
    R = len(tables[0])
    bits = np.zeros((2, R, n), np.int64)  # angle, radius
    left = np.full(R, total_bits)
    rows, pairs = np.arange(R)[:, None], np.arange(n)[None, :]
    while (left > 0).any():  # every row makes one move: the most error saved per bit
        gains = []
        for step in (1, 2, 3):
            room = (bits.sum(0) + step <= max_pair) & (step <= left)[:, None]
            for j in (0, 1):
                b = bits[j]
                saved = tables[j][rows, pairs, b] - tables[j][rows, pairs, np.minimum(b + step, W)]
                gains.append(np.where(room & (b + step <= W), saved / step, -np.inf))
        best = np.argmax(np.concatenate(gains, axis=1), axis=1)  # (R,) over (step, angle / radius, pair)
        move, i = np.divmod(best, n)
        step, j = move // 2 + 1, move % 2
        go = left > 0
        bits[j[go], np.nonzero(go)[0], i[go]] += step[go]
        left -= np.where(go, step, 0)
    ba_all, br_all = bits
    return ba_all.reshape(ea.shape[:-1]), br_all.reshape(ea.shape[:-1])


def polar_error_tables(k: np.ndarray, q_moments: np.ndarray, page_size: int = 64,
                       max_width: int = MAX_WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Measured cost of each pair's angle and radius code, for `allocate_polar_bits`.

    k (T, D) post-RoPE keys of one (layer, kv head), coded in page-local frames of page_size consecutive tokens
    (whole pages only); q_moments (D/2, 3) E[q_x^2], E[q_y^2], E[q_x q_y] of each pair over the head's queries,
    or (T, D/2, 3) such moments per key (skvrt.calibrate.attention_moments: weighted by the attention each key
    gets). -> angle_err, radius_err (D/2, max_width + 1): mean over keys of e_i' M_i e_i / D, the squared logit
    error (scale 1/sqrt(D)) from pair i's error e_i when its angle (radius) alone is coded with b bits, the
    other exact."""
    T, D = k.shape
    h2 = D // 2
    n = T // page_size
    if n == 0:
        raise ValueError(f"{T} keys: not one page of {page_size}")
    out = np.zeros((2, h2, max_width + 1))
    m_all = np.asarray(q_moments, np.float64)
    for p in range(n):
        kp = k[p * page_size : (p + 1) * page_size].astype(np.float64)
        m = m_all if m_all.ndim == 2 else m_all[p * page_size : (p + 1) * page_size]  # (D/2, 3) or (P, D/2, 3)
        rho, phi = AdaTier._polar(kp)  # (P, D/2)
        for b in range(max_width + 1):
            levels = np.full(h2, 1 << b)
            frame = AdaTier._fit(rho, phi, levels, levels)
            a, r = AdaTier._encode(rho, phi, frame, levels, levels)
            f = frame.astype(np.float64)
            coded = (f[:, 0] + a * f[:, 1], f[:, 2] + r * f[:, 3])  # angle, radius as the codes decode
            for j, (ang, rad) in enumerate(((coded[0], rho), (phi, coded[1]))):
                ex, ey = rad * np.cos(ang) - rho * np.cos(phi), rad * np.sin(ang) - rho * np.sin(phi)
                out[j, :, b] += np.sum(m[..., 0] * ex**2 + m[..., 1] * ey**2 + 2 * m[..., 2] * ex * ey, axis=0)
    out /= n * page_size * D
    return out[0], out[1]


def pack_bits(fields: list[tuple[np.ndarray, int]], n_bytes: int) -> np.ndarray:
    """fields: [(codes (n,), width)] in order -> (n, n_bytes) uint8, little-endian bit stream per token."""
    n = len(fields[0][0]) if fields else 0
    words = np.zeros((n, (n_bytes + 15) // 8), np.uint64)  # one spare word for fields crossing the last one
    o = 0
    for c, w in fields:
        if w:
            v = np.asarray(c).astype(np.uint64) & np.uint64((1 << w) - 1)
            i, s = divmod(o, 64)
            words[:, i] |= v << np.uint64(s)
            if s + w > 64:
                words[:, i + 1] |= v >> np.uint64(64 - s)
        o += w
    return words.astype("<u8").view(np.uint8).reshape(n, -1)[:, :n_bytes]


def unpack_bits(packed: np.ndarray, widths: list[int]) -> list[np.ndarray]:
    """(..., n_bytes) uint8 -> one int array (...) per width, in order."""
    nb = packed.shape[-1]
    pad = np.zeros((*packed.shape[:-1], -(-nb // 8) * 8 + 8 - nb), np.uint8)
    words = np.ascontiguousarray(np.concatenate([packed, pad], axis=-1)).view("<u8")  # (..., n_words + 1)
    out, o = [], 0
    for w in widths:
        if not w:
            out.append(np.zeros(packed.shape[:-1], np.int64))
            continue
        i, s = divmod(o, 64)
        v = words[..., i] >> np.uint64(s)
        if s + w > 64:
            v = v | (words[..., i + 1] << np.uint64(64 - s))
        out.append((v & np.uint64((1 << w) - 1)).astype(np.int64))
        o += w
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class AdaTier(_Tier):
    """pair_bits (L, H, D/2): bits per pair for every (layer, kv head); each row sums to key_bits.
    angle_bits (same shape) or None: how many of a pair's bits code its angle (the rest its radius); None splits
    them as `split_bits` does."""

    pair_bits: np.ndarray
    v_bits: int = 4
    v_group: int = 32
    angle_bits: np.ndarray | None = None

    def __post_init__(self):
        sums = self.pair_bits.sum(-1)
        if not (sums == sums.flat[0]).all() or sums.flat[0] % 8:
            raise ValueError("every (layer, head) must spend the same key bits, a multiple of 8")
        ba, br = self.widths
        if ba.shape != self.pair_bits.shape or (ba < 0).any() or (br < 0).any() or max(ba.max(), br.max()) > MAX_WIDTH:
            raise ValueError(f"angle and radius codes take 0..{MAX_WIDTH} bits each")

    @classmethod
    def polar(cls, angle_bits: np.ndarray, radius_bits: np.ndarray, v_bits: int = 4, v_group: int = 32) -> "AdaTier":
        """A tier from separate angle and radius widths (allocate_polar_bits)."""
        return cls(np.asarray(angle_bits) + np.asarray(radius_bits), v_bits, v_group, np.asarray(angle_bits))

    @functools.cached_property
    def widths(self) -> tuple[np.ndarray, np.ndarray]:
        """-> angle bits, radius bits (L, H, D/2) int64: the code field widths of every pair."""
        if self.angle_bits is None:
            return split_bits(self.pair_bits.astype(np.int64))
        ba = self.angle_bits.astype(np.int64)
        return ba, self.pair_bits.astype(np.int64) - ba

    def widths_at(self, index=...) -> tuple[np.ndarray, np.ndarray]:
        """-> (angle bits, radius bits) of widths[index], e.g. a layer's (H, D/2) or a (layer, head)'s (D/2,)."""
        return self.widths[0][index], self.widths[1][index]

    @functools.cached_property
    def key_bits(self) -> int:
        return int(self.pair_bits.sum(-1).flat[0])

    @property
    def name(self) -> str:
        return f"ada{self.key_bits}-v{self.v_bits}"

    @property
    def values(self) -> QuantTier:
        return QuantTier(8, self.v_bits, self.v_group)  # its value codec only

    def fields(self, P, D):
        if D % self.v_group:
            raise ValueError(f"v_group {self.v_group} does not divide head_dim {D}")
        return [("codes", "uint8", ("P", self.key_bits // 8)),
                ("frame", "float16", (D // 2, 4)),  # theta0, gamma, rho0, drho per pair
                *value_fields(D, self.v_bits, self.v_group)]

    per_slot = ("codes", "v_codes", "v_min", "v_scale")

    def _widths(self, lh) -> list[int]:
        ba, br = self.widths_at(lh)
        return [int(w) for pair in zip(ba, br) for w in pair]

    @staticmethod
    def _fit(rho: np.ndarray, phi: np.ndarray, na: np.ndarray, nr: np.ndarray) -> np.ndarray:
        """Page-local frame of n tokens' pairs: rho, phi (n, D/2) -> (D/2, 4) float16 theta0, gamma, rho0, drho."""
        mean = np.angle(np.sum(rho * np.exp(1j * phi), axis=0))  # (D/2,) rho-weighted circular mean
        off = np.angle(np.exp(1j * (phi - mean)))  # (n, D/2) in (-pi, pi]
        lo, hi = off.min(0), off.max(0)
        theta0 = np.where(na > 1, mean + lo, mean + (lo + hi) / 2)
        gamma = np.where(na > 1, (hi - lo) / np.maximum(na - 1, 1), 0.0)
        rlo, rhi = rho.min(0), rho.max(0)
        rho0 = np.where(nr > 1, rlo, rho.mean(0))
        drho = np.where(nr > 1, (rhi - rlo) / np.maximum(nr - 1, 1), 0.0)
        return np.stack([np.angle(np.exp(1j * theta0)), gamma, rho0, drho], axis=-1).astype(np.float16)

    @staticmethod
    def _encode(rho, phi, frame: np.ndarray, na, nr) -> tuple[np.ndarray, np.ndarray]:
        """Codes of tokens in a stored (rounded) frame: -> a, r (n, D/2) int64.

        The angle code counts steps of gamma past theta0 going counter-clockwise, from theta0 - gamma / 2
        (so spans past pi, for pairs that rotate fast, are never re-wrapped); clipped to the code range."""
        f32 = frame.astype(np.float64)
        th0, gam, r0, dr = f32[:, 0], f32[:, 1], f32[:, 2], f32[:, 3]
        safe_g = np.where(gam > 0, gam, 1.0)
        rel = np.mod(phi - th0 + gam / 2, 2 * np.pi)  # (n, D/2) in [0, 2 pi)
        a = np.where(gam > 0, np.floor(rel / safe_g), 0)
        r = np.where(dr > 0, np.rint((rho - r0) / np.where(dr > 0, dr, 1)), 0)
        return np.clip(a, 0, na - 1).astype(np.int64), np.clip(r, 0, nr - 1).astype(np.int64)

    @staticmethod
    def _polar(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h2 = k.shape[1] // 2
        x, y = k[:, :h2].astype(np.float64), k[:, h2:].astype(np.float64)  # (n, D/2) pair coordinates
        return np.hypot(x, y), np.arctan2(y, x)

    def _store(self, data, pid: int, a, r, frame, lh) -> None:
        ba, br = self.widths_at(lh)
        fields = [(c[:, i], int(w)) for i in range(len(ba)) for c, w in ((a, ba[i]), (r, br[i]))]
        data["codes"][pid, : len(a)] = pack_bits(fields, self.key_bits // 8)
        data["frame"][pid] = frame

    def write_page(self, data, pid: int, k: np.ndarray, v: np.ndarray, lh=(0, 0)) -> None:
        """Encode n <= P tokens (k, v (n, D) float32) of (layer, head) = lh into an empty page."""
        rho, phi = self._polar(k)
        ba, br = self.widths_at(lh)
        na, nr = 1 << ba, 1 << br
        frame = self._fit(rho, phi, na, nr)
        a, r = self._encode(rho, phi, frame, na, nr)  # codes from the stored (rounded) frame
        self._store(data, pid, a, r, frame, lh)
        vc, vmn, vsc = self.values.encode_values(v)
        data["v_codes"][pid, : len(k)], data["v_min"][pid, : len(k)], data["v_scale"][pid, : len(k)] = vc, vmn, vsc

    def append(self, data, pid: int, f: int, k: np.ndarray, v: np.ndarray, lh=(0, 0)) -> None:
        """Add n tokens at slots f .. f + n of a page holding f tokens. Per pair, when the new tokens fall
        inside the page's frame (within half a step of its angle arc and radius range), the old codes stay
        as they are and the new ones use that frame; otherwise that pair's frame is refitted over the old
        tokens' decoded values + the new tokens and the pair re-encoded (codes with 0 bits always refit)."""
        if f == 0:
            self.write_page(data, pid, k, v, lh)
            return
        rho_n, phi_n = self._polar(k)
        ba, br = self.widths_at(lh)
        na, nr = 1 << ba, 1 << br
        frame = data["frame"][pid].copy()  # (D/2, 4)
        f32 = frame.astype(np.float64)
        a_old, r_old = (x[0, :f] for x in self.codes(data, np.array([pid]), lh))  # (f, D/2)
        th0, gam, r0, dr = f32[:, 0], f32[:, 1], f32[:, 2], f32[:, 3]
        rel = np.mod(phi_n - th0 + gam / 2, 2 * np.pi)
        a_fits = (gam > 0) & (na > 1) & (rel < na * gam).all(0)  # (D/2,)
        r_fits = (dr > 0) & (nr > 1) & ((rho_n >= r0 - dr / 2) & (rho_n <= r0 + (nr - 0.5) * dr)).all(0)
        rho_o, phi_o = r0 + r_old * dr, th0 + a_old * gam  # old tokens as their codes decode
        rho = np.concatenate([rho_o, rho_n])
        phi = np.concatenate([phi_o, phi_n])
        refit = self._fit(rho, phi, na, nr)
        frame[~a_fits, :2] = refit[~a_fits, :2]
        frame[~r_fits, 2:] = refit[~r_fits, 2:]
        a, r = self._encode(rho, phi, frame, na, nr)
        a[:f] = np.where(a_fits, a_old, a[:f])  # kept pairs keep their exact old codes
        r[:f] = np.where(r_fits, r_old, r[:f])
        self._store(data, pid, a, r, frame, lh)
        vc, vmn, vsc = self.values.encode_values(v)
        n = len(k)
        data["v_codes"][pid, f : f + n], data["v_min"][pid, f : f + n], data["v_scale"][pid, f : f + n] = vc, vmn, vsc

    def read_tokens(self, data, pid: int, f: int, lh) -> tuple[np.ndarray, np.ndarray]:
        """Best copy of a page's first f tokens: keys as their codes decode, values dequantised (f, D)."""
        pids = np.array([pid])
        return self.decode_keys(data, pids, lh)[0, :f], self.read_values(data, pids)[0, :f]

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
        na = int((1 << self.widths_at(lh)[0]).max())
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
        with np.errstate(invalid="ignore", over="ignore"):  # slots past fill hold whatever the frame held before
            v = vc * data["v_scale"][pids][..., None].astype(np.float32) + data["v_min"][pids][..., None].astype(np.float32)
        return v.reshape(n, P, D)

    def decode_keys(self, data, pids: np.ndarray, lh) -> np.ndarray:
        """Test/report helper only (the attention path never calls it): keys (n, P, D) the codes stand for."""
        a, r = self.codes(data, pids, lh)
        fr = data["frame"][pids].astype(np.float32)
        ang = fr[:, None, :, 0] + a * fr[:, None, :, 1]
        rho = fr[:, None, :, 2] + r * fr[:, None, :, 3]
        return np.concatenate([rho * np.cos(ang), rho * np.sin(ang)], axis=-1)
