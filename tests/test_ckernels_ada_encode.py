"""The ADA page encoders (kernels_c/ada_encode.c: ckernels.ada_write / ada_append) against their NumPy twins
AdaTier.write_page / AdaTier.append, for every ISA variant of the kernel library.

Two TierPools (own arenas, filled with the same random garbage) receive the same writes / append sequences,
one through NumPy, one through C; every step compares the whole arena byte for byte (so the kernel must also
leave other pages, positions and slots past the new tokens alone), then copies the NumPy arena into the C one
so each step starts from the same state.

Exactness. The kernel repeats NumPy's float64 / float32 operations one by one (no FMA contraction, the same
summation order, float64 -> float16 rounded once to nearest even) and calls the libm functions NumPy calls
(hypot, atan2, cexp = sincos). The one difference: on AVX-512 CPUs NumPy evaluates float64 arctan2 with SVML,
whose result differs from glibc's atan2 in the last ulp for ~7 % of arguments. That changes a byte only where a
value lies exactly on a float16 rounding tie or a branch cut, which happens in two places:
  * tie: a refitted frame's theta0 = mean + wrap(phi_lo - mean), where phi_lo is an old token's decoded angle
    theta0' + a gamma' (a sum of float16 values, often an exact float16 midpoint): one ulp of `mean` decides
    the rounding; theta0 moves by one float16 ulp, some codes by one step (`check_decode`);
  * branch cut: a token exactly opposite the circular mean (grid-like keys): one ulp of `mean` decides whether
    its offset is +pi or -pi, so the frame's arc starts elsewhere (`check_quality`; only test_grid_ties_parity
    allows it).
Measured (this machine, NumPy 2.4 with AVX-512): 99 of 3.09M key fields (3e-5) in 24 of 3489 steps differ
over this file's in-process tests (21 of the steps on grid keys); on random keys 32 of 13.8M fields over 3000
append-sequence pages (2e-6). With NumPy's AVX-512 dispatch switched off (NPY_DISABLE_CPU_FEATURES: arctan2 =
glibc's) every byte of every step matches, grid keys included; `test_exact_with_libm_arctan2` checks that in
a subprocess. The in-process tests therefore assert: value fields (v_codes, v_min, v_scale) and every byte
outside the written key fields identical; at most MAX_DIFF_RATE of key fields (code bytes + frame entries)
different; each differing step a tie (frame entries within one float16 ulp, every key decoded from the C page
within one quantisation step -- angle step gamma, radius step drho, plus the frames' one-ulp difference -- of
the NumPy page's decode) or, on grid keys, a branch cut reconstructing the keys as well (squared error within
one step per pair and token of NumPy's).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from skvrt import ckernels
from skvrt.kv.ada import AdaTier, allocate_bits, split_bits
from skvrt.kv.pool import TierPool

pytestmark = pytest.mark.skipif(ckernels.lib() is None, reason=f"C kernels unavailable: {ckernels.build_error}")

ISAS = list(ckernels.VARIANTS)
MAX_DIFF_RATE = 1e-4  # of key fields (code bytes + frame entries); measured ~2e-6 with SVML arctan2, 0 without
MAX_GRID_DIFF_STEPS = 0.1  # of append steps on grid keys; measured 7 of 161 with SVML arctan2, 0 without
KEY_MODES = ("drift", "rotate", "circle", "degenerate")  # + "grid": test_grid_ties_parity


def pair_bits(rng, D, key_bits, skew):
    """(D/2,) bits per pair from allocate_bits; skew: lognormal weights over decades (0-bit and 12-bit pairs)."""
    w = rng.lognormal(0, 2.5, D // 2) if skew else rng.uniform(0.1, 2, D // 2)
    return allocate_bits(w, key_bits)


def make_keys(rng, n, D, mode):
    """(n, D) float32 post-RoPE-like keys. rotate / circle: a pair's angles span more than pi. grid: pairs on
    axes with radii on a grid of 1/4 (exact radii, angles 0, +-pi/2, pi: rounding ties in codes and frames)."""
    h2 = D // 2
    if mode == "grid":
        x = rng.integers(-8, 9, (n, h2)) * 0.25
        y = rng.integers(-4, 5, (n, h2)) * 0.5
        on_axis = rng.random(h2) < 0.6
        y[:, on_axis] = 0
        x[:, ~on_axis & (rng.random(h2) < 0.5)] = 0
        return np.concatenate([x, y], axis=1).astype(np.float32)
    base = rng.uniform(-np.pi, np.pi, h2)
    rad = rng.uniform(0.2, 4, h2) * rng.lognormal(0, 0.3, (n, h2))
    if mode == "drift":
        ang = base + rng.normal(0, 0.6, (n, h2))
    elif mode == "rotate":  # RoPE-like: angle grows with the position, up to 1.5 rad per token
        ang = base + rng.uniform(0.05, 1.5, h2) * np.arange(n)[:, None] + rng.normal(0, 0.05, (n, h2))
    elif mode == "circle":
        ang = base + rng.uniform(-np.pi, np.pi, (n, h2))
    else:  # repeated tokens, a zero pair, axis-aligned pairs, tiny and large radii
        ang = base + rng.normal(0, 0.3, (n, h2))
        rad = rad * 10.0 ** rng.integers(-3, 3, h2)
        rep = rng.integers(0, max(1, n // 2), n)
        ang, rad = ang[rep], rad[rep]
    k = np.concatenate([rad * np.cos(ang), rad * np.sin(ang)], axis=1).astype(np.float32)
    if mode == "degenerate":
        k[:, 0] = k[:, h2] = 0
        k[:, 1 % h2] = 0
        k[:, h2 + 2 % h2] = 0
    return k


def make_values(rng, n, D):
    v = rng.normal(size=(n, D)) * rng.uniform(0.01, 10)
    v[:, : D // 8] = rng.choice([0.0, 1.0], size=(n, D // 8))  # flat groups: scale 0 -> 1.0
    return v.astype(np.float32)


class Pair:
    """One tier, two pools with identical garbage: [0] for NumPy, [1] for C. strict: every differing step must
    be a float16 tie (frames within one ulp, decodes within one step); otherwise a step may also be a branch
    cut (a token exactly opposite the circular mean: see `check`)."""

    def __init__(self, rng, D, P, bits, vb, vg, n_pages=3, strict=True, angle=None):
        self.tier = AdaTier(bits[None, None], vb, vg, None if angle is None else angle[None, None])
        self.ab, self.rb = (x[0, 0].astype(np.uint8) for x in self.tier.widths)
        self.pools = [TierPool(self.tier, n_pages, P, D) for _ in range(2)]
        garbage = rng.integers(0, 256, self.pools[0].arena.buf.size, dtype=np.uint8)
        for p in self.pools:
            p.arena.buf[:] = garbage
        self.D, self.P, self.strict = D, P, strict
        self.keys: dict[int, np.ndarray] = {}  # the keys each page holds (for the branch-cut check)
        self.key_fields = self.key_diff = self.steps = self.diff_steps = 0

    def write(self, pid, k, v, L):
        self.tier.write_page(self.pools[0].data, pid, k, v)
        ckernels.ada_write(self.pools[1], pid, k, v, self.ab, self.rb, L=L)
        self.keys[pid] = k
        self.check(pid, len(k))
        self.pools[1].arena.buf[:] = self.pools[0].arena.buf

    def step(self, pid, f, k, v, L):
        self.tier.append(self.pools[0].data, pid, f, k, v)
        ckernels.ada_append(self.pools[1], pid, f, k, v, self.ab, self.rb, L=L)
        self.keys[pid] = np.concatenate([self.keys[pid][:f], k]) if f else k
        self.check(pid, f + len(k))
        self.pools[1].arena.buf[:] = self.pools[0].arena.buf  # next step from the same state

    def check(self, pid, fill):
        (a, b), d = (p.arena.buf for p in self.pools), [p.data for p in self.pools]
        self.key_fields += d[0]["codes"][pid, :fill].size + d[0]["frame"][pid].size
        self.steps += 1
        if np.array_equal(a, b):
            return
        self.diff_steps += 1
        # what differs must be key fields of page pid only: values and everything else byte-identical
        masked = [buf.copy() for buf in (a, b)]
        for buf, p in zip(masked, self.pools):
            for name in ("codes", "frame"):
                arr = p.data[name]
                lo = arr[pid].ctypes.data - p.arena.buf.ctypes.data
                hi = lo + (arr[pid, :fill].nbytes if name == "codes" else arr[pid].nbytes)
                buf[lo:hi] = 0
        assert np.array_equal(*masked), "the kernel changed bytes outside the page's key fields (or values)"
        c0, c1 = d[0]["codes"][pid, :fill], d[1]["codes"][pid, :fill]
        f0, f1 = (x["frame"][pid].view(np.int16).astype(np.int64) for x in d)
        self.key_diff += int((c0 != c1).sum()) + int((f0 != f1).sum())
        if np.abs(f0 - f1).max() <= 1 and ((f0 < 0) == (f1 < 0)).all():
            self.check_decode(pid, fill)  # a float16 tie decided by one ulp of arctan2
        else:
            # A token exactly opposite the pair's circular mean: one ulp of the mean decides whether its
            # offset is +pi or -pi, so the arc (theta0, gamma) starts elsewhere. Both frames fit the same
            # tokens: the C page must reconstruct the keys about as well as the NumPy page.
            assert not self.strict, f"frames differ by more than one float16 ulp: {np.abs(f0 - f1).max()}"
            self.check_quality(pid, fill)

    def decode(self, pid, fill):
        pids = np.array([pid])
        return [self.tier.decode_keys(p.data, pids, (0, 0))[0, :fill].astype(np.float64) for p in self.pools]

    def check_decode(self, pid, fill):
        """Every pair of every token decodes within one step (+ the frames' 1-ulp difference) of NumPy's."""
        keys = self.decode(pid, fill)
        fr = [p.data["frame"][pid].astype(np.float64) for p in self.pools]  # (h2, 4)
        h2 = self.D // 2
        na, nr = 1 << self.ab.astype(np.int64), 1 << self.rb.astype(np.int64)
        rho = [np.hypot(k[:, :h2], k[:, h2:]) for k in keys]
        ang = [np.arctan2(k[:, h2:], k[:, :h2]) for k in keys]
        d_ang = np.abs(np.angle(np.exp(1j * (ang[1] - ang[0]))))
        d_rho = np.abs(rho[1] - rho[0])
        d_fr = np.abs(fr[1] - fr[0])
        tol_a = np.maximum(fr[0][:, 1], fr[1][:, 1]) + d_fr[:, 0] + (na - 1) * d_fr[:, 1] + 1e-5
        tol_r = np.maximum(fr[0][:, 3], fr[1][:, 3]) + d_fr[:, 2] + (nr - 1) * d_fr[:, 3] + 1e-5
        small = np.maximum(rho[0], rho[1]) < 1e-6  # angle of a zero vector: meaningless
        assert ((d_ang <= tol_a) | small).all(), f"decoded angles off by more than a step: {d_ang.max()}"
        assert (d_rho <= tol_r * (1 + 1e-6)).all(), f"decoded radii off by more than a step: {d_rho.max()}"

    def check_quality(self, pid, fill):
        """Branch cut: the C page's squared key reconstruction error <= NumPy's + one step per pair and token."""
        k = self.keys[pid].astype(np.float64)
        err = [float(((dec - k) ** 2).sum()) for dec in self.decode(pid, fill)]
        fr = np.maximum(*(p.data["frame"][pid].astype(np.float64) for p in self.pools))  # (h2, 4)
        nr = 1 << self.rb.astype(np.int64)
        step = fr[:, 1] * (fr[:, 2] + (nr - 1) * fr[:, 3]) + fr[:, 3]  # (h2,) angle + radius step
        assert err[1] <= err[0] + fill * float((step**2).sum()), err

    def assert_rate(self):
        assert self.key_diff <= MAX_DIFF_RATE * self.key_fields, (self.key_diff, self.key_fields)


def random_config(rng, D=None, key_bits=None, skew=None):
    D = D or int(rng.choice([64, 128]))
    key_bits = key_bits or int(rng.choice([40, 64, 128, 192, 256]))
    skew = bool(rng.random() < 0.5) if skew is None else skew
    vb = int(rng.choice([2, 4, 8]))
    vg = int(rng.choice([g for g in (8, 16, 32, 64) if D % g == 0]))
    P = int(rng.choice([16, 19, 64, 80]))
    return D, P, pair_bits(rng, D, key_bits, skew), vb, vg


@pytest.mark.parametrize("D", [64, 128])
def test_write_page_parity(klib, D):
    rng = np.random.default_rng(D)
    totals = [0, 0]
    for key_bits in (40, 64, 128, 192, 256):
        for skew in (False, True):
            for rep in range(6):
                _, P, bits, vb, vg = random_config(rng, D, key_bits, skew)
                pair = Pair(rng, D, P, bits, vb, vg)
                n = (1, P, int(rng.integers(2, P)))[rep % 3]
                mode = KEY_MODES[rep % len(KEY_MODES)]
                pid = int(rng.integers(0, 3))
                pair.write(pid, make_keys(rng, n, D, mode), make_values(rng, n, D), klib)
                pair.assert_rate()
                totals[0] += pair.key_diff
                totals[1] += pair.key_fields
    assert totals[0] <= MAX_DIFF_RATE * totals[1]


@pytest.mark.parametrize("seed", [0, 1])
def test_append_sequences_parity(klib, seed):
    """Several appends into one page until it is full (chunks of 1 .. P tokens, the first through f = 0)."""
    rng = np.random.default_rng(100 + seed)
    diff = fields = 0
    for it in range(60):
        D, P, bits, vb, vg = random_config(rng)
        pair = Pair(rng, D, P, bits, vb, vg)
        pid = int(rng.integers(0, 3))
        mode = KEY_MODES[it % len(KEY_MODES)]
        K, V = make_keys(rng, P, D, mode), make_values(rng, P, D)
        if mode == "drift" and it % 8 == 0:  # later tokens drift away: most pairs refit
            K[P // 2 :] *= 3
        f = 0
        while f < P:
            n = 1 if rng.random() < 0.25 else int(rng.integers(1, P - f + 1))
            pair.step(pid, f, K[f : f + n], V[f : f + n], klib)
            f += n
        diff += pair.key_diff
        fields += pair.key_fields
    assert diff <= MAX_DIFF_RATE * fields, (diff, fields)


def polar_widths(rng, D, key_bits):
    """(pair bits, angle bits) (D/2,) split unevenly, as allocate_polar_bits does: angle-only pairs, radius-only
    pairs, 6-bit angle codes beside 0-bit radii."""
    h2 = D // 2
    bits = np.zeros(h2, np.int64)
    for i in rng.integers(0, h2, 10 * key_bits):
        if bits.sum() == key_bits:
            break
        bits[i] += bits[i] < 12
    angle = np.array([rng.integers(max(0, b - 6), min(6, b) + 1) for b in bits])
    return bits, angle


@pytest.mark.parametrize("seed", [0, 1])
def test_polar_widths_parity(klib, seed):
    """Tiers with separate angle / radius widths (the sidecar's measured allocation): whole pages and appends."""
    rng = np.random.default_rng(300 + seed)
    diff = fields = 0
    for it in range(24):
        D = (64, 128)[it % 2]
        bits, angle = polar_widths(rng, D, int(rng.choice([64, 128, 192, 256])))
        assert bits.sum() % 8 == 0 and (split_bits(bits)[0] != angle).any()
        P, vb, vg = int(rng.choice([16, 64])), int(rng.choice([2, 4])), 16
        pair = Pair(rng, D, P, bits, vb, vg, angle=angle)
        assert (pair.ab == angle).all() and (pair.rb == bits - angle).all()
        pid = int(rng.integers(0, 3))
        mode = KEY_MODES[it % len(KEY_MODES)]
        K, V = make_keys(rng, P, D, mode), make_values(rng, P, D)
        f = 0
        while f < P:
            n = P if it % 3 == 0 else int(rng.integers(1, P - f + 1))
            pair.step(pid, f, K[f : f + n], V[f : f + n], klib)
            f += n
        diff += pair.key_diff
        fields += pair.key_fields
    assert diff <= MAX_DIFF_RATE * fields, (diff, fields)


def test_extreme_bit_tables(klib):
    """Hand-made tables: all bits in a few 12-bit pairs, 1-bit pairs (angle only), 0-bit pairs, fields
    crossing 64-bit words; each page written, then appended to in three steps."""
    rng = np.random.default_rng(7)
    for D, bits in [
        (64, np.r_[[12] * 16, [0] * 16]),  # 192 bits: 6 + 6 bit fields, half the pairs empty
        (64, np.r_[[1] * 24, [2] * 8]),  # 40 bits: 1-bit pairs (angle only, no radius field)
        (64, np.r_[[12] * 3, [11] * 2, [6] * 2, [0] * 25]),  # 70 bits, rounded up to 72 below
        (128, np.r_[[12] * 10, [5] * 4, [3] * 4, [0] * 46]),  # 152 bits
        (128, np.r_[[4] * 64]),  # 256 bits
    ]:
        extra = (-int(bits.sum())) % 8
        bits = bits.copy()
        bits[np.argmin(bits)] += extra  # key bits a multiple of 8
        assert bits.max() <= 12 and bits.sum() % 8 == 0
        for vb, vg in ((2, 8), (4, 64), (8, 32)):
            P = 64
            pair = Pair(rng, D, P, bits.astype(np.int64), vb, vg)
            for mode in KEY_MODES:
                K, V = make_keys(rng, P, D, mode), make_values(rng, P, D)
                pair.step(1, 0, K[:30], V[:30], klib)
                pair.step(1, 30, K[30:31], V[30:31], klib)
                pair.step(1, 31, K[31:50], V[31:50], klib)
                pair.step(1, 50, K[50:], V[50:], klib)
            pair.assert_rate()


def test_values_exact_and_flat_groups(klib):
    """The value codec alone: groups with equal values (scale 0 -> 1.0), float16 ties, huge and tiny ranges."""
    rng = np.random.default_rng(11)
    D, P = 64, 32
    for vb in (2, 4, 8):
        for vg in (8, 16, 32, 64):
            pair = Pair(rng, D, P, pair_bits(rng, D, 64, False), vb, vg)
            v = make_values(rng, P, D)
            v[1] = 3.0
            v[2, :vg] = np.float32(1 + 2 ** -11)  # a float16 tie (rounds to even: 1.0)
            v[3] = rng.normal(size=D) * 1e4
            v[4] = rng.normal(size=D) * 1e-6  # subnormal float16 ranges
            v[5, :vg] = np.linspace(-1, 1, vg) * (1 + 2 ** -12)
            v[6:12] = rng.integers(-12, 13, (6, D)) * 0.25  # codes on rint ties (half to even)
            k = make_keys(rng, P, D, "drift")
            pair.step(0, 0, k[:20], v[:20], klib)
            pair.step(0, 20, k[20:], v[20:], klib)  # check(): value bytes always identical


def test_grid_ties_parity(klib):
    """Keys on a grid (exact radii, axis angles): float16 and rint ties everywhere, tokens exactly opposite
    each other. Exact where NumPy's arctan2 is libm's (test_exact_with_libm_arctan2); with SVML's, a few
    steps differ (ties, branch cuts), each checked for quality."""
    rng = np.random.default_rng(21)
    steps = diff = 0
    for it in range(40):
        D, P, bits, vb, vg = random_config(rng)
        pair = Pair(rng, D, P, bits, vb, vg, strict=False)
        K, V = make_keys(rng, P, D, "grid"), make_values(rng, P, D)
        f = 0
        while f < P:
            n = int(rng.integers(1, P - f + 1))
            pair.step(2, f, K[f : f + n], V[f : f + n], klib)
            f += n
        steps += pair.steps
        diff += pair.diff_steps
    assert diff <= MAX_GRID_DIFF_STEPS * steps, (diff, steps)


def test_rejects_bad_inputs():
    rng = np.random.default_rng(3)
    pair = Pair(rng, 64, 16, pair_bits(rng, 64, 128, False), 4, 32)
    k, v = make_keys(rng, 17, 64, "drift"), make_values(rng, 17, 64)
    with pytest.raises(ValueError):
        ckernels.ada_write(pair.pools[1], 0, k, v, pair.ab, pair.rb)  # n > P
    with pytest.raises(ValueError):
        ckernels.ada_append(pair.pools[1], 0, 10, k[:7], v[:7], pair.ab, pair.rb)  # f + n > P
    wide = pair.ab.copy()
    wide[0] = 17
    with pytest.raises(ValueError):
        ckernels.ada_write(pair.pools[1], 0, k[:4], v[:4], wide, pair.rb)  # a field wider than 16 bits
    over = pair.ab + 4
    with pytest.raises(ValueError):
        ckernels.ada_write(pair.pools[1], 0, k[:4], v[:4], over, pair.rb)  # more bits than KB bytes hold


def _run_exact(seed: int, n_pages: int) -> tuple[int, int, int]:
    """Append sequences on random pages (native kernel): -> (steps, steps with any byte different, bytes)."""
    rng = np.random.default_rng(seed)
    steps = bad = nbytes = 0
    for it in range(n_pages):
        L = ckernels.variant_lib(ISAS[it % len(ISAS)])
        D, P, bits, vb, vg = random_config(rng)
        pair = Pair(rng, D, P, bits, vb, vg)
        mode = (*KEY_MODES, "grid")[it % (len(KEY_MODES) + 1)]
        K, V = make_keys(rng, P, D, mode), make_values(rng, P, D)
        f = 0
        while f < P:
            n = int(rng.integers(1, P - f + 1))
            pair.tier.append(pair.pools[0].data, 1, f, K[f : f + n], V[f : f + n])
            ckernels.ada_append(pair.pools[1], 1, f, K[f : f + n], V[f : f + n], pair.ab, pair.rb, L=L)
            a, b = (p.arena.buf for p in pair.pools)
            steps += 1
            nbytes += a.size
            bad += int(not np.array_equal(a, b))
            b[:] = a
            f += n
    return steps, bad, nbytes


def _avx512_dispatch() -> list[str]:
    try:
        from numpy._core import _multiarray_umath as mu
    except ImportError:  # NumPy 1.x
        from numpy.core import _multiarray_umath as mu
    feats = getattr(mu, "__cpu_features__", {})
    return [f for f in getattr(mu, "__cpu_dispatch__", []) if feats.get(f) and ("AVX512" in f or f == "X86_V4")]


def test_exact_with_libm_arctan2():
    """With NumPy's AVX-512 loops off (float64 arctan2 = glibc's atan2, as the kernel calls it), every byte of
    every page matches: the in-process tolerance is SVML's last-ulp arctan2 and nothing else."""
    disable = _avx512_dispatch()
    if not disable:
        pytest.skip("NumPy dispatches no AVX-512 loops here: the in-process tests already compare against libm")
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=" ".join(disable))
    r = subprocess.run([sys.executable, __file__, "--exact", "5", "150"], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    steps, bad, _ = map(int, r.stdout.split()[-3:])
    assert steps > 300 and bad == 0, r.stdout


if __name__ == "__main__" and sys.argv[1:2] == ["--exact"]:
    print(*_run_exact(int(sys.argv[2]), int(sys.argv[3])))
