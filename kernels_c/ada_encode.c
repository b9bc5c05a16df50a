/* ADA tier encoders, CPU: write a page, append tokens to a partly filled page.
 *
 * Twin: skvrt/kv/ada.py AdaTier.write_page / AdaTier.append (with _polar, _fit, _encode, _store, pack_bits)
 * and the value codec QuantTier.encode_values / quantize (skvrt/kv/tiers.py); parity-tested byte for byte in
 * tests/test_ckernels_ada_encode.py. One call = one page of one (layer, kv head); single-threaded.
 *
 * Per RoPE pair i (x = k[:, i], y = k[:, i + D/2]) in float64, as NumPy computes it:
 *   rho = hypot(x, y), phi = atan2(y, x)
 *   frame (fit):  mean  = atan2(S_im, S_re), S = sum_t rho_t (cos, sin)(phi_t)  (summed from +0 in token order)
 *                 off_t = atan2(sin, cos)(phi_t - mean); lo, hi = min, max off
 *                 theta0 = wrap(mean + lo) (na > 1) or wrap(mean + (lo + hi) / 2), wrap(x) = atan2(sin, cos)(x)
 *                 gamma  = (hi - lo) / (na - 1) (na > 1) or 0
 *                 rho0   = min rho (nr > 1) or mean rho; drho = (max - min) / (nr - 1) (nr > 1) or 0
 *                 each rounded float64 -> float16 directly (round to nearest even; no float32 step)
 *   codes (encode, from the stored float16 frame):
 *                 a = floor(mod(phi - theta0 + gamma / 2, 2 pi) / gamma) (gamma > 0, else 0), clipped [0, na)
 *                 r = rint((rho - rho0) / drho) (drho > 0, else 0), clipped [0, nr)
 *   na = 2^ba_i, nr = 2^br_i. A token's codes are a little-endian bit stream of (a_0, r_0, a_1, r_1, ...).
 * Append (f > 0 tokens already in the page): the old codes are decoded (rho0 + r drho, theta0 + a gamma); a
 * pair keeps its angle frame and old angle codes when every new token has mod(phi - theta0 + gamma/2, 2 pi)
 * < na gamma (gamma > 0, na > 1), its radius frame and old radius codes when every new rho lies in
 * [rho0 - drho/2, rho0 + (nr - 0.5) drho] (drho > 0, nr > 1); otherwise that part is refitted over the
 * decoded old tokens followed by the new ones, and every token re-encoded in it.
 * Values: per token, groups of vg dims, float32 arithmetic: mn = f16(min), scale = f16((max - mn) / levels)
 * (1.0 if not > 0), code = clip(rint((x - mn) / scale), 0, levels), packed little-endian within bytes.
 *
 * The arithmetic mirrors NumPy's operation by operation (no FMA contraction: see the pragma below). The
 * transcendental functions are libm's (glibc): hypot, atan2 and cexp (sincos) are the functions NumPy calls,
 * except that NumPy's float64 arctan2 on AVX-512 CPUs is SVML's, which differs from glibc's in the last ulp
 * for ~7 % of arguments. Against a NumPy whose arctan2 is glibc's the bytes are identical; against SVML a
 * last-ulp difference shows where a value sits exactly on a float16 tie (a refit's theta0 = mean +
 * wrap(phi_lo - mean) of an old token decoded to a float16 midpoint) or a branch cut (a token exactly opposite
 * the mean: offset +pi or -pi): ~2e-6 of key fields on random keys (see the test's docstring).
 * Speed: the libm calls dominate (hypot + atan2 per new token and pair, sincos per token of a refitted pair);
 * wrap(phi - mean) is evaluated only for tokens that can hold lo or hi (see enc_fit), fmod only for |x| >= 4 pi.
 *
 * Shapes (every field of page pid at field + pid * stride bytes; pages are arena frames):
 *   codes       (N, P, KB)       uint8     KB = key_bits / 8
 *   frame       (N, D/2, 4)      float16   theta0, gamma, rho0, drho per pair
 *   v_codes     (N, P, D*vb/8)   uint8
 *   v_min, v_scale (N, P, D/vg)  float16
 *   k, v        (n, D)           float32   the new tokens, C-contiguous
 *   angle_bits, radius_bits (D/2,) uint8   this (layer, head)'s widths (ada.split_bits(pair_bits[layer, head]))
 * Writes codes slots 0 .. f + n, the frame entries it (re)fits, value slots f .. f + n of page pid; nothing else.
 * Limits (rc -1 when violated): D even, 2 <= D <= 512, D vb % 8 == 0, 1 <= n, f >= 0, f + n <= P,
 * widths <= 16, sum of widths <= 8 KB, KB <= 512, vb in {2, 4, 8}, vg > 0, D % vg == 0; rc -2: out of memory.
 */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include <complex.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ENC_MAX_D 512
#define ENC_MAX_W 16
#define ENC_MAX_KB 512
#define ENC_2PI (2 * 3.141592653589793) /* 2 * np.pi */

/* float16 bits -> double (exact) */
static double enc_h2d(uint16_t h)
{
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    double x;
    if (e == 0) x = ldexp((double)m, -24);
    else if (e == 31) x = m ? NAN : INFINITY;
    else x = ldexp((double)(m | 0x400), e - 25);
    return (h & 0x8000) ? -x : x;
}

/* double -> float16 bits, round to nearest even (as NumPy's astype(float16) from float64 or float32: float32
 * inputs convert to double exactly, so one rounding either way). */
static uint16_t enc_d2h(double x)
{
    const uint16_t sign = signbit(x) ? 0x8000 : 0;
    const double a = fabs(x);
    if (isnan(x)) return sign | 0x7e00;
    if (a >= 65520.0) return sign | 0x7c00; /* 65520 = midpoint of 65504 and 2^16: ties to even = inf */
    if (a == 0.0) return sign;
    int e2;
    frexp(a, &e2);
    int e = e2 - 1; /* a in [2^e, 2^(e+1)) */
    if (e < -14) e = -14; /* subnormal halves: ulp 2^-24 */
    double m = rint(ldexp(a, 10 - e)); /* exact scaling, one rounding (current mode: to nearest even) */
    if (m >= 2048.0) { m = 1024.0; e++; }
    const unsigned mi = (unsigned)m;
    if (mi < 1024) return sign | (uint16_t)mi; /* subnormal (or zero) */
    return sign | (uint16_t)(((unsigned)(e + 15) << 10) | (mi - 1024));
}

/* NumPy's float64 remainder (npy_divmod): fmod, then the sign of the divisor; b > 0 finite. fmod is exact:
 * |a| < b gives a, b <= |a| < 2b gives a -+ b (exact by Sterbenz's lemma), so only larger |a| call it. */
static inline double enc_mod(double a, double b)
{
    const double aa = fabs(a);
    double m = aa < b ? a : aa < 2 * b ? (a > 0 ? a - b : a + b) : fmod(a, b);
    if (m != 0.0) {
        if ((b < 0) != (m < 0)) m += b;
    } else {
        m = copysign(0.0, b);
    }
    return m;
}

/* np.angle(np.exp(1j * x)) */
static inline double enc_wrap(double x)
{
    const double complex z = cexp(CMPLX(0.0, x));
    return atan2(cimag(z), creal(z));
}

/* AdaTier._fit for one pair over m tokens: the angle part (theta0, gamma) into fr[0..1] when do_a, the radius
 * part (rho0, drho) into fr[2..3] when do_r. work: m doubles.
 * lo, hi = min, max of off_t = wrap(phi_t - mean), wrap = atan2(sin, cos) (exact libm values needed: they
 * reach the float16 rounding). wrap is evaluated only where it can decide lo or hi: approx_t = d - 2 pi
 * round(d / 2 pi) is within 1e-14 of off_t, so a token whose approx lies more than ENC_EPS above the smallest
 * approx (resp. below the largest) cannot hold the min (max); tokens within ENC_EPS of +-pi, where the wrap
 * may land on either side, are always evaluated and kept out of the approximate extremes. */
#define ENC_EPS 1e-9
static void enc_fit(const double *rho, const double *phi, int m, int na, int nr, int do_a, int do_r,
                    uint16_t *fr, double *work)
{
    if (do_a) {
        double sr = 0.0, si = 0.0;
        for (int t = 0; t < m; t++) {
            const double complex z = cexp(CMPLX(0.0, phi[t]));
            const double pr = rho[t] * creal(z), pi = rho[t] * cimag(z);
            sr = sr + pr;
            si = si + pi;
        }
        const double mean = atan2(si, sr);
        double alo = INFINITY, ahi = -INFINITY;
        for (int t = 0; t < m; t++) {
            const double d = phi[t] - mean;
            const double x = d - ENC_2PI * nearbyint(d / ENC_2PI);
            work[t] = x;
            if (fabs(x) < 3.141592653589793 - ENC_EPS) {
                if (x < alo) alo = x;
                if (x > ahi) ahi = x;
            }
        }
        double lo = INFINITY, hi = -INFINITY;
        for (int t = 0; t < m; t++) {
            const double x = work[t];
            if (!(x > alo + ENC_EPS && x < ahi - ENC_EPS && fabs(x) < 3.141592653589793 - ENC_EPS)) {
                const double off = enc_wrap(phi[t] - mean);
                if (off < lo) lo = off;
                if (off > hi) hi = off;
            }
        }
        const double theta0 = na > 1 ? mean + lo : mean + (lo + hi) / 2;
        const double gamma = na > 1 ? (hi - lo) / (double)(na - 1) : 0.0;
        fr[0] = enc_d2h(enc_wrap(theta0));
        fr[1] = enc_d2h(gamma);
    }
    if (do_r) {
        double lo = rho[0], hi = rho[0], s = 0.0;
        for (int t = 0; t < m; t++) {
            if (rho[t] < lo) lo = rho[t];
            if (rho[t] > hi) hi = rho[t];
            s = s + rho[t];
        }
        fr[2] = enc_d2h(nr > 1 ? lo : s / (double)m);
        fr[3] = enc_d2h(nr > 1 ? (hi - lo) / (double)(nr - 1) : 0.0);
    }
}

static inline int32_t enc_acode(double phi, double th0, double gam, int na)
{
    if (!(gam > 0)) return 0;
    const double rel = enc_mod(phi - th0 + gam / 2, ENC_2PI);
    double a = floor(rel / gam);
    if (a < 0) a = 0;
    if (a > na - 1) a = na - 1;
    return (int32_t)a;
}

static inline int32_t enc_rcode(double rho, double r0, double dr, int nr)
{
    if (!(dr > 0)) return 0;
    double r = rint((rho - r0) / dr);
    if (r < 0) r = 0;
    if (r > nr - 1) r = nr - 1;
    return (int32_t)r;
}

/* one token's KB bytes <-> 64-bit words (little-endian stream, one spare word) */
static inline void enc_load_words(const uint8_t *row, int KB, uint64_t *w)
{
    const int nw = (KB + 15) / 8;
    memset(w, 0, sizeof(uint64_t) * (size_t)nw);
    for (int b = 0; b < KB; b++) w[b >> 3] |= (uint64_t)row[b] << (8 * (b & 7));
}

static inline uint32_t enc_get(const uint64_t *w, int o, int width)
{
    if (!width) return 0;
    const int i = o >> 6, s = o & 63;
    uint64_t v = w[i] >> s;
    if (s + width > 64) v |= w[i + 1] << (64 - s);
    return (uint32_t)(v & ((1ull << width) - 1));
}

static inline void enc_put(uint64_t *w, int o, int width, uint32_t c)
{
    if (!width) return;
    const uint64_t v = (uint64_t)c & ((1ull << width) - 1);
    const int i = o >> 6, s = o & 63;
    w[i] |= v << s;
    if (s + width > 64) w[i + 1] |= v >> (64 - s);
}

/* QuantTier.encode_values for tokens v (n, D) into value slots s0 .. s0 + n of one page */
static void enc_values(const float *v, int n, int D, int vb, int vg, uint8_t *vc, uint16_t *vmn, uint16_t *vsc,
                       int s0)
{
    const int ng = D / vg, levels = (1 << vb) - 1, vrow = D * vb / 8, per = 8 / vb;
    uint8_t q[ENC_MAX_D];
    for (int t = 0; t < n; t++) {
        const float *x = v + (int64_t)t * D;
        for (int g = 0; g < ng; g++) {
            const float *xg = x + g * vg;
            float lo = xg[0], hi = xg[0];
            for (int j = 1; j < vg; j++) {
                if (xg[j] < lo) lo = xg[j];
                if (xg[j] > hi) hi = xg[j];
            }
            const uint16_t mn16 = enc_d2h(lo);
            const float mn = (float)enc_h2d(mn16);
            const float sc32 = (hi - mn) / (float)levels;
            uint16_t sc16 = enc_d2h(sc32);
            float sc = (float)enc_h2d(sc16);
            if (!(sc > 0)) {
                sc16 = 0x3c00;
                sc = 1.0f;
            }
            for (int j = 0; j < vg; j++) {
                float c = rintf((xg[j] - mn) / sc);
                if (c < 0) c = 0;
                if (c > levels) c = (float)levels;
                q[g * vg + j] = (uint8_t)c;
            }
            vmn[(int64_t)(s0 + t) * ng + g] = mn16;
            vsc[(int64_t)(s0 + t) * ng + g] = sc16;
        }
        uint8_t *row = vc + (int64_t)(s0 + t) * vrow;
        for (int b = 0; b < vrow; b++) {
            uint8_t o = 0;
            for (int j = 0; j < per; j++) o |= (uint8_t)(q[b * per + j] << (vb * j));
            row[b] = o;
        }
    }
}

static int enc_page(uint8_t *codes, uint16_t *frame, uint8_t *v_codes, uint16_t *v_min, uint16_t *v_scale,
                    int64_t stride, int64_t pid, int f, int n, const float *k, const float *v,
                    const uint8_t *angle_bits, const uint8_t *radius_bits, int P, int D, int KB, int vb, int vg)
{
    if (D <= 0 || D % 2 || D > ENC_MAX_D || P <= 0 || n < 1 || f < 0 || f + n > P) return -1;
    if (KB <= 0 || KB > ENC_MAX_KB || pid < 0) return -1;
    if (!(vb == 2 || vb == 4 || vb == 8) || vg <= 0 || D % vg || D * vb % 8) return -1;
    const int h2 = D / 2, m = f + n;
    int o = 0;
    for (int i = 0; i < h2; i++) {
        if (angle_bits[i] > ENC_MAX_W || radius_bits[i] > ENC_MAX_W) return -1;
        o += angle_bits[i] + radius_bits[i];
    }
    if (o > 8 * KB) return -1;

    uint8_t *cp = codes + pid * stride;
    uint16_t *fr = (uint16_t *)((char *)frame + pid * stride);
    /* pair-major work arrays: rho, phi (h2, m) float64; a, r (h2, m) int32; m float64 for enc_fit */
    char *mem = (char *)malloc((size_t)h2 * m * (2 * sizeof(double) + 2 * sizeof(int32_t)) + sizeof(double) * m);
    if (!mem) return -2;
    double *rho = (double *)mem, *phi = rho + (size_t)h2 * m, *work = phi + (size_t)h2 * m;
    int32_t *ac = (int32_t *)(work + m), *rc = ac + (size_t)h2 * m;
    uint64_t w[ENC_MAX_KB / 8 + 2];

    /* new tokens: polar coordinates */
    for (int t = 0; t < n; t++) {
        const float *kr = k + (int64_t)t * D;
        for (int i = 0; i < h2; i++) {
            const double x = kr[i], y = kr[i + h2];
            rho[(size_t)i * m + f + t] = hypot(x, y);
            phi[(size_t)i * m + f + t] = atan2(y, x);
        }
    }
    /* old tokens: their codes */
    for (int t = 0; t < f; t++) {
        enc_load_words(cp + (int64_t)t * KB, KB, w);
        int b = 0;
        for (int i = 0; i < h2; i++) {
            ac[(size_t)i * m + t] = (int32_t)enc_get(w, b, angle_bits[i]);
            b += angle_bits[i];
            rc[(size_t)i * m + t] = (int32_t)enc_get(w, b, radius_bits[i]);
            b += radius_bits[i];
        }
    }
    for (int i = 0; i < h2; i++) {
        const int na = 1 << angle_bits[i], nr = 1 << radius_bits[i];
        double *ri = rho + (size_t)i * m, *pi = phi + (size_t)i * m;
        int32_t *ai = ac + (size_t)i * m, *qi = rc + (size_t)i * m;
        uint16_t *fri = fr + 4 * i;
        int a_fits = 0, r_fits = 0;
        if (f > 0) {
            const double th0 = enc_h2d(fri[0]), gam = enc_h2d(fri[1]), r0 = enc_h2d(fri[2]), dr = enc_h2d(fri[3]);
            a_fits = gam > 0 && na > 1;
            const double arc = (double)na * gam;
            for (int t = f; t < m && a_fits; t++)
                a_fits = enc_mod(pi[t] - th0 + gam / 2, ENC_2PI) < arc;
            r_fits = dr > 0 && nr > 1;
            const double rlo = r0 - dr / 2, rhi = r0 + ((double)nr - 0.5) * dr;
            for (int t = f; t < m && r_fits; t++)
                r_fits = ri[t] >= rlo && ri[t] <= rhi;
            for (int t = 0; t < f; t++) { /* old tokens as their codes decode */
                ri[t] = r0 + (double)qi[t] * dr;
                pi[t] = th0 + (double)ai[t] * gam;
            }
        }
        enc_fit(ri, pi, m, na, nr, !a_fits, !r_fits, fri, work);
        const double th0 = enc_h2d(fri[0]), gam = enc_h2d(fri[1]), r0 = enc_h2d(fri[2]), dr = enc_h2d(fri[3]);
        for (int t = a_fits ? f : 0; t < m; t++) ai[t] = enc_acode(pi[t], th0, gam, na);
        for (int t = r_fits ? f : 0; t < m; t++) qi[t] = enc_rcode(ri[t], r0, dr, nr);
    }
    /* pack every token's codes */
    const int nw = (KB + 15) / 8;
    for (int t = 0; t < m; t++) {
        memset(w, 0, sizeof(uint64_t) * (size_t)nw);
        int b = 0;
        for (int i = 0; i < h2; i++) {
            enc_put(w, b, angle_bits[i], (uint32_t)ac[(size_t)i * m + t]);
            b += angle_bits[i];
            enc_put(w, b, radius_bits[i], (uint32_t)rc[(size_t)i * m + t]);
            b += radius_bits[i];
        }
        uint8_t *row = cp + (int64_t)t * KB;
        for (int j = 0; j < KB; j++) row[j] = (uint8_t)(w[j >> 3] >> (8 * (j & 7)));
    }
    free(mem);
    enc_values(v, n, D, vb, vg, v_codes + pid * stride, (uint16_t *)((char *)v_min + pid * stride),
               (uint16_t *)((char *)v_scale + pid * stride), f);
    return 0;
}

/* AdaTier.write_page: encode n tokens into the empty page pid (codes / value slots 0 .. n, the frame). */
int skvrt_ada_write(uint8_t *codes, uint16_t *frame, uint8_t *v_codes, uint16_t *v_min, uint16_t *v_scale,
                    int64_t stride, int pid, int n, const float *k, const float *v, const uint8_t *angle_bits,
                    const uint8_t *radius_bits, int P, int D, int KB, int vb, int vg)
{
    return enc_page(codes, frame, v_codes, v_min, v_scale, stride, pid, 0, n, k, v, angle_bits, radius_bits,
                    P, D, KB, vb, vg);
}

/* AdaTier.append: add n tokens at slots f .. f + n of page pid, which holds f tokens (f == 0: write_page). */
int skvrt_ada_append(uint8_t *codes, uint16_t *frame, uint8_t *v_codes, uint16_t *v_min, uint16_t *v_scale,
                     int64_t stride, int pid, int f, int n, const float *k, const float *v,
                     const uint8_t *angle_bits, const uint8_t *radius_bits, int P, int D, int KB, int vb, int vg)
{
    return enc_page(codes, frame, v_codes, v_min, v_scale, stride, pid, f, n, k, v, angle_bits, radius_bits,
                    P, D, KB, vb, vg);
}
