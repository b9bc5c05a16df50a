/* Decode-step attention over a page list mixing dense pages (tier 0) and ADA pages (tier 1), CPU.
 *
 * Twin: skvrt/kv/cache.py `_scores` + skvrt/kv/attention.py `softmax_attend` (dense pages: dot products;
 * ADA pages: skvrt/kv/ada.py AdaTier.scores / read_values), parity-tested in tests/test_ckernels_ada.py.
 * One call = one layer, one decode step (T = 1). OpenMP over KV heads; the G query heads of a group are
 * processed together, so every key / code / value row is decoded once. Online softmax across the pages of
 * both tiers, in table order; slots at or past a page's fill are never touched.
 *
 * ADA logits never rebuild keys. Per page and query head, for each RoPE pair i (i, i + D/2) with angle width
 * ba_i and radius width br_i:   LUT_i[a] = q_i cos(theta0_i + a gamma_i) + q_{i+D/2} sin(theta0_i + a gamma_i)
 * (a < 2^ba_i; cos / sin by a vectorised Cody-Waite + Taylor sincos on the float32 angle, |err| < 2e-7),
 *   logit(t) = scale * sum_i (rho0_i + r_i(t) drho_i) * LUT_i[a_i(t)].
 * A token's codes are a little-endian bit stream of fields (a_0, r_0, a_1, r_1, ...). The SIMD path decodes
 * 8 tokens at a time: when KB % 4 == 0 the rows' dwords are read by masked loads + 8x8 transposes (a pair's
 * two fields, <= 24 bits, may straddle two dwords); otherwise by 32-bit gathers of words at byte offsets
 * <= KB - 4. LUT lookups are in-register permutes for ba <= 6 (vpermps, or vpermt2ps with AVX-512VL),
 * gathers beyond. LUT entries past the first 8 of a pair come from rotating by 8 gamma (complex multiply).
 * Values: v = code * v_scale + v_min per group of vg dims, dequantised in the loop once per token and
 * shared by the G heads; softmax exp by a vectorised range-reduced Taylor series (~1e-7 relative).
 *
 * Shapes (page-table contract: skvrt/kv/pages.py):
 *   q           (nq, D)          float32   post-RoPE queries; query head j reads KV head j / G
 *   k0, v0      (N0, P, D)       KV_T      dense-tier pages (float16 bits or float32)
 *   fill0       (N0,)            int32
 *   codes       (N1, P, KB)      uint8     ADA key codes (KB = key_bits / 8)
 *   frame       (N1, D/2, 4)     float16   theta0, gamma, rho0, drho per pair
 *   v_codes     (N1, P, D*vb/8)  uint8     value codes, packed little-endian within bytes
 *   v_min, v_scale (N1, P, D/vg) float16
 *   fill1       (N1,)            int32
 *   page_ids    (H, max_pages)   int32     this layer's table; page_tiers (H, max_pages) int8: 0 dense, 1 ADA
 *   n_pages     (H,)             int32
 *   angle_bits, radius_bits (H, D/2) uint8  this layer's field widths (ada.split_bits(pair_bits[layer]))
 *   out         (nq, D)          float32
 * Limits (rc -1 when violated): D % 8 == 0, D <= 256, P <= 256, nq % H == 0, G <= 16, widths <= 12,
 * sum of widths <= 8 KB, vb in {2, 4, 8}, vg % 8 == 0 and D % vg == 0; rc -2: out of memory.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "simd.h"
#include "slot_mass.h"
#ifdef SKVRT_SIMD
#define ADA_SIMD 1
#endif

#define ADA_MAX_D 256
#define ADA_MAX_P 256
#define ADA_MAX_G 16
#define ADA_MAX_W 12

#define ada_h2f skvrt_h2f

/* ---- sin / cos ------------------------------------------------------------------------------------------
 * x = k * pi/2 + r, |r| <= pi/4 (pi/2 split in three parts, exact for |k| < 2^11), then Taylor series to
 * r^9 (sin) and r^10 (cos): truncation < 2e-9, so the error is float32 rounding (~1e-7). */
#define ADA_PIO2_1 1.5703125f
#define ADA_PIO2_2 4.837512969970703125e-4f
#define ADA_PIO2_3 7.54978995489188216e-8f
#define ADA_2OPI 0.63661977236758134f

static inline void ada_sincos1(float x, float *s, float *c)
{
    const float k = nearbyintf(x * ADA_2OPI);
    float r = x - k * ADA_PIO2_1;
    r -= k * ADA_PIO2_2;
    r -= k * ADA_PIO2_3;
    const float z = r * r;
    const float sr = r + r * z * (-1.f / 6 + z * (1.f / 120 + z * (-1.f / 5040 + z * (1.f / 362880))));
    const float cr = 1.f + z * (-0.5f + z * (1.f / 24 + z * (-1.f / 720 + z * (1.f / 40320 + z * (-1.f / 3628800)))));
    const int q = (int)k & 3;
    *s = q == 0 ? sr : q == 1 ? cr : q == 2 ? -sr : -cr;
    *c = q == 0 ? cr : q == 1 ? -sr : q == 2 ? -cr : sr;
}

#ifdef ADA_SIMD
static inline void ada_sincos8(__m256 x, __m256 *s, __m256 *c)
{
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(ADA_2OPI)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(ADA_PIO2_1), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(ADA_PIO2_2), r);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(ADA_PIO2_3), r);
    const __m256 z = _mm256_mul_ps(r, r);
    __m256 ps = _mm256_set1_ps(1.f / 362880);
    ps = _mm256_fmadd_ps(ps, z, _mm256_set1_ps(-1.f / 5040));
    ps = _mm256_fmadd_ps(ps, z, _mm256_set1_ps(1.f / 120));
    ps = _mm256_fmadd_ps(ps, z, _mm256_set1_ps(-1.f / 6));
    const __m256 sr = _mm256_fmadd_ps(_mm256_mul_ps(ps, z), r, r);
    __m256 pc = _mm256_set1_ps(-1.f / 3628800);
    pc = _mm256_fmadd_ps(pc, z, _mm256_set1_ps(1.f / 40320));
    pc = _mm256_fmadd_ps(pc, z, _mm256_set1_ps(-1.f / 720));
    pc = _mm256_fmadd_ps(pc, z, _mm256_set1_ps(1.f / 24));
    pc = _mm256_fmadd_ps(pc, z, _mm256_set1_ps(-0.5f));
    const __m256 cr = _mm256_fmadd_ps(pc, z, _mm256_set1_ps(1.f));
    const __m256i q = _mm256_cvtps_epi32(k);
    /* quadrant: bit 0 swaps sin / cos; sin negated for q in {2, 3}, cos for q in {1, 2} */
    const __m256 swap = _mm256_castsi256_ps(_mm256_slli_epi32(q, 31));
    const __m256 sv = _mm256_blendv_ps(sr, cr, swap), cv = _mm256_blendv_ps(cr, sr, swap);
    const __m256 sneg = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(q, 1), 31));
    const __m256 cneg = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_xor_si256(q, _mm256_srli_epi32(q, 1)), 31));
    *s = _mm256_xor_ps(sv, sneg);
    *c = _mm256_xor_ps(cv, cneg);
}

#define ada_hsum8 skvrt_hsum8
#endif

/* ---- per-head plan for the ADA code stream ---------------------------------------------------------- */
typedef struct {
    int h2, E, n_words;
    int16_t word[ADA_MAX_D / 2];   /* word holding pair i's fields */
    uint8_t sa[ADA_MAX_D / 2];     /* shift of a_i inside its word */
    uint8_t ba[ADA_MAX_D / 2], br[ADA_MAX_D / 2];
    int32_t off[ADA_MAX_D / 2];    /* LUT offset of pair i; pair i has 2^ba_i entries */
    int32_t bit[ADA_MAX_D / 2];    /* bit offset of a_i in the token's stream */
    uint8_t nxt[ADA_MAX_D / 2];    /* the fields run into the next word (dword mode) */
    int32_t word_byte[ADA_MAX_D / 2];
    int dword_mode;                /* KB % 4 == 0: words are the row's dwords, read by a transpose */
} ada_plan;

static void ada_make_plan(ada_plan *pl, const uint8_t *abits, const uint8_t *rbits, int h2, int KB)
{
    int o = 0, E = 0, nw = 0, wb = -1000;
    pl->h2 = h2;
    for (int i = 0; i < h2; i++) {
        const int ba = abits[i], br = rbits[i], b = ba + br;
        pl->ba[i] = (uint8_t)ba;
        pl->br[i] = (uint8_t)br;
        pl->bit[i] = o;
        pl->off[i] = E;
        E += 1 << ba;
        pl->nxt[i] = 0;
        if (KB % 4 == 0) {
            pl->word[i] = (int16_t)(o / 32);
            pl->sa[i] = (uint8_t)(o % 32);
            pl->nxt[i] = (uint8_t)(o % 32 + b > 32);
            o += b;
            continue;
        }
        if (!(o >= 8 * wb && o + b <= 8 * wb + 32)) { /* open a new 32-bit word, never past the row */
            wb = o / 8;
            if (KB >= 4 && wb > KB - 4) wb = KB - 4;
            pl->word_byte[nw++] = wb;
        }
        pl->word[i] = (int16_t)(nw - 1);
        pl->sa[i] = (uint8_t)(o - 8 * wb);
        o += b;
    }
    pl->E = E;
    pl->dword_mode = KB % 4 == 0;
    pl->n_words = pl->dword_mode ? KB / 4 : nw;
}

/* field of `w` bits at bit offset `o` of a token's code row (bytes read stay inside the row) */
static inline uint32_t ada_field(const uint8_t *row, int o, int w)
{
    uint32_t v = 0;
    const int b0 = o >> 3, b1 = (o + w + 7) >> 3;
    for (int b = b1 - 1; b >= b0; b--) v = (v << 8) | row[b];
    return (v >> (o & 7)) & ((1u << w) - 1u);
}

/* LUT[g][off_i + a] for one page; fr = the page's frame (D/2, 4) float16 */
static void ada_build_lut(const ada_plan *pl, const uint16_t *fr, const float *qh, int G, int D, float *lut,
                          int lut_stride, float *rho0, float *drho)
{
    const int h2 = pl->h2;
    for (int i = 0; i < h2; i++) {
        const float th0 = ada_h2f(fr[4 * i]), gam = ada_h2f(fr[4 * i + 1]);
        rho0[i] = ada_h2f(fr[4 * i + 2]);
        drho[i] = ada_h2f(fr[4 * i + 3]);
        const int na = 1 << pl->ba[i];
        float *L0 = lut + pl->off[i];
        int a = 0;
#ifdef ADA_SIMD
        const __m256 ang = _mm256_add_ps(_mm256_set1_ps(th0),
                                          _mm256_mul_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(gam)));
        __m256 sv, cv, s8 = _mm256_setzero_ps(), c8 = _mm256_setzero_ps();
        ada_sincos8(ang, &sv, &cv);
        if (na > 8) { /* blocks past the first: rotate by 8 gamma (complex multiply; ~1e-7 per step) */
            float ss, cc;
            ada_sincos1(8.f * gam, &ss, &cc);
            s8 = _mm256_set1_ps(ss);
            c8 = _mm256_set1_ps(cc);
        }
        for (; a < na; a += 8) { /* na < 8: the extra lanes land in the next pair's slots / the padding,
                                    which are written after (pairs go in order) or never read */
            if (a) {
                const __m256 cn = _mm256_fmsub_ps(cv, c8, _mm256_mul_ps(sv, s8));
                sv = _mm256_fmadd_ps(sv, c8, _mm256_mul_ps(cv, s8));
                cv = cn;
            }
            for (int g = 0; g < G; g++) {
                const float *qg = qh + g * D;
                const __m256 x = _mm256_fmadd_ps(_mm256_set1_ps(qg[i]), cv, _mm256_mul_ps(_mm256_set1_ps(qg[i + h2]), sv));
                _mm256_storeu_ps(L0 + (int64_t)g * lut_stride + a, x);
            }
        }
#else
        for (; a < na; a++) {
            float s, c;
            ada_sincos1(th0 + (float)a * gam, &s, &c);
            for (int g = 0; g < G; g++)
                L0[(int64_t)g * lut_stride + a] = qh[g * D + i] * c + qh[g * D + i + h2] * s;
        }
#endif
    }
}

#ifdef ADA_SIMD
#define ADA_INLINE static inline __attribute__((always_inline))

/* LUT lookup of 8 angle codes a < 2^BA from one pair's table li (in-register permutes up to BA = 6) */
ADA_INLINE __m256 ada_look(const float *li, __m256i a, const int BA)
{
    if (BA <= 3) return _mm256_permutevar8x32_ps(_mm256_loadu_ps(li), a);
#ifdef __AVX512VL__
    if (BA == 4) return _mm256_permutex2var_ps(_mm256_loadu_ps(li), a, _mm256_loadu_ps(li + 8));
    if (BA == 5)
        return _mm256_blendv_ps(_mm256_permutex2var_ps(_mm256_loadu_ps(li), a, _mm256_loadu_ps(li + 8)),
                                _mm256_permutex2var_ps(_mm256_loadu_ps(li + 16), a, _mm256_loadu_ps(li + 24)),
                                _mm256_castsi256_ps(_mm256_slli_epi32(a, 27)));
    if (BA == 6) {
        const __m256 b4 = _mm256_castsi256_ps(_mm256_slli_epi32(a, 27));
        const __m256 lo = _mm256_blendv_ps(_mm256_permutex2var_ps(_mm256_loadu_ps(li), a, _mm256_loadu_ps(li + 8)),
                                           _mm256_permutex2var_ps(_mm256_loadu_ps(li + 16), a, _mm256_loadu_ps(li + 24)), b4);
        const __m256 hi = _mm256_blendv_ps(_mm256_permutex2var_ps(_mm256_loadu_ps(li + 32), a, _mm256_loadu_ps(li + 40)),
                                           _mm256_permutex2var_ps(_mm256_loadu_ps(li + 48), a, _mm256_loadu_ps(li + 56)), b4);
        return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(a, 26)));
    }
#else
    if (BA <= 6) {
        const __m256 b3 = _mm256_castsi256_ps(_mm256_slli_epi32(a, 28));
        __m256 t[8];
        for (int j = 0; j < (1 << (BA - 3)); j += 2)
            t[j / 2] = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(li + 8 * j), a),
                                        _mm256_permutevar8x32_ps(_mm256_loadu_ps(li + 8 * j + 8), a), b3);
        if (BA == 4) return t[0];
        const __m256 b4 = _mm256_castsi256_ps(_mm256_slli_epi32(a, 27));
        const __m256 u0 = _mm256_blendv_ps(t[0], t[1], b4);
        if (BA == 5) return u0;
        const __m256 u1 = _mm256_blendv_ps(t[2], t[3], b4);
        return _mm256_blendv_ps(u0, u1, _mm256_castsi256_ps(_mm256_slli_epi32(a, 26)));
    }
#endif
    return _mm256_i32gather_ps(li, a, 4);
}

/* logits (unscaled) of one block of 8 tokens for GC <= 8 query heads: lut = the first head's LUT row;
 * words[w] = word w of the 8 tokens. Two accumulators per head (even / odd pairs) halve the FMA chain. */
ADA_INLINE void ada_scores_blk(const ada_plan *pl, const __m256i *words, const float *lut, int lut_stride,
                               const float *rho0, const float *drho, const int GC, __m256 *out)
{
    __m256 acc0[8], acc1[8];
    for (int g = 0; g < GC; g++) acc0[g] = acc1[g] = _mm256_setzero_ps();
    for (int i = 0; i < pl->h2; i++) {
        const int ba = pl->ba[i];
        __m256i x = _mm256_srl_epi32(words[pl->word[i]], _mm_cvtsi32_si128(pl->sa[i]));
        if (pl->nxt[i]) x = _mm256_or_si256(x, _mm256_sll_epi32(words[pl->word[i] + 1], _mm_cvtsi32_si128(32 - pl->sa[i])));
        const __m256i a = _mm256_and_si256(x, _mm256_set1_epi32((1 << ba) - 1));
        const __m256i r = _mm256_and_si256(_mm256_srl_epi32(x, _mm_cvtsi32_si128(ba)),
                                           _mm256_set1_epi32((1 << pl->br[i]) - 1));
        const __m256 rho = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r), _mm256_set1_ps(drho[i]), _mm256_set1_ps(rho0[i]));
        const float *li = lut + pl->off[i];
        __m256 v[8];
        switch (ba) {
        case 0: case 1: case 2: case 3:
            for (int g = 0; g < GC; g++) v[g] = ada_look(li + g * lut_stride, a, 3);
            break;
        case 4:
            for (int g = 0; g < GC; g++) v[g] = ada_look(li + g * lut_stride, a, 4);
            break;
        case 5:
            for (int g = 0; g < GC; g++) v[g] = ada_look(li + g * lut_stride, a, 5);
            break;
        case 6:
            for (int g = 0; g < GC; g++) v[g] = ada_look(li + g * lut_stride, a, 6);
            break;
        default:
            for (int g = 0; g < GC; g++) v[g] = ada_look(li + g * lut_stride, a, 12);
        }
        if (i & 1)
            for (int g = 0; g < GC; g++) acc1[g] = _mm256_fmadd_ps(rho, v[g], acc1[g]);
        else
            for (int g = 0; g < GC; g++) acc0[g] = _mm256_fmadd_ps(rho, v[g], acc0[g]);
    }
    for (int g = 0; g < GC; g++) out[g] = _mm256_add_ps(acc0[g], acc1[g]);
}

/* words[k] = dword k of rows cp + tt[j] * KB, j < 8 (k < nd): masked loads + 8x8 transposes */
static inline void ada_load_dwords(const uint8_t *cp, const int *tt, int KB, int nd, __m256i *words)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int k0 = 0; k0 < nd; k0 += 8) {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(nd - k0), lane);
        __m256 r[8];
        for (int j = 0; j < 8; j++)
            r[j] = _mm256_castsi256_ps(_mm256_maskload_epi32((const int *)(cp + (int64_t)tt[j] * KB + 4 * k0), mask));
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        __m256i *w = words + k0;
        w[0] = _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x20));
        w[1] = _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x20));
        w[2] = _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x20));
        w[3] = _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x20));
        w[4] = _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x31));
        w[5] = _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x31));
        w[6] = _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x31));
        w[7] = _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x31));
    }
}
#endif

#if defined(ADA_SIMD) && defined(__AVX512F__)
#define ADA_AVX512 1
/* LUT lookup of 16 angle codes a < 2^BA (one in-register permute up to BA = 5, two + a blend for BA = 6) */
ADA_INLINE __m512 ada_look16(const float *li, __m512i a, const int BA)
{
    if (BA <= 4) return _mm512_permutexvar_ps(a, _mm512_loadu_ps(li));
    if (BA == 5) return _mm512_permutex2var_ps(_mm512_loadu_ps(li), a, _mm512_loadu_ps(li + 16));
    if (BA == 6)
        return _mm512_mask_blend_ps(_mm512_test_epi32_mask(a, _mm512_set1_epi32(32)),
                                    _mm512_permutex2var_ps(_mm512_loadu_ps(li), a, _mm512_loadu_ps(li + 16)),
                                    _mm512_permutex2var_ps(_mm512_loadu_ps(li + 32), a, _mm512_loadu_ps(li + 48)));
    return _mm512_i32gather_ps(a, li, 4);
}

/* ada_scores_blk for 16 tokens (words[w] = word w of the 16 tokens) */
ADA_INLINE void ada_scores_blk16(const ada_plan *pl, const __m512i *words, const float *lut, int lut_stride,
                                 const float *rho0, const float *drho, const int GC, __m512 *out)
{
    __m512 acc0[8], acc1[8];
    for (int g = 0; g < GC; g++) acc0[g] = acc1[g] = _mm512_setzero_ps();
    for (int i = 0; i < pl->h2; i++) {
        const int ba = pl->ba[i];
        __m512i x = _mm512_srl_epi32(words[pl->word[i]], _mm_cvtsi32_si128(pl->sa[i]));
        if (pl->nxt[i]) x = _mm512_or_si512(x, _mm512_sll_epi32(words[pl->word[i] + 1], _mm_cvtsi32_si128(32 - pl->sa[i])));
        const __m512i a = _mm512_and_si512(x, _mm512_set1_epi32((1 << ba) - 1));
        const __m512i r = _mm512_and_si512(_mm512_srl_epi32(x, _mm_cvtsi32_si128(ba)),
                                           _mm512_set1_epi32((1 << pl->br[i]) - 1));
        const __m512 rho = _mm512_fmadd_ps(_mm512_cvtepi32_ps(r), _mm512_set1_ps(drho[i]), _mm512_set1_ps(rho0[i]));
        const float *li = lut + pl->off[i];
        __m512 v[8];
        switch (ba) {
        case 0: case 1: case 2: case 3: case 4:
            for (int g = 0; g < GC; g++) v[g] = ada_look16(li + g * lut_stride, a, 4);
            break;
        case 5:
            for (int g = 0; g < GC; g++) v[g] = ada_look16(li + g * lut_stride, a, 5);
            break;
        case 6:
            for (int g = 0; g < GC; g++) v[g] = ada_look16(li + g * lut_stride, a, 6);
            break;
        default:
            for (int g = 0; g < GC; g++) v[g] = ada_look16(li + g * lut_stride, a, 12);
        }
        if (i & 1)
            for (int g = 0; g < GC; g++) acc1[g] = _mm512_fmadd_ps(rho, v[g], acc1[g]);
        else
            for (int g = 0; g < GC; g++) acc0[g] = _mm512_fmadd_ps(rho, v[g], acc0[g]);
    }
    for (int g = 0; g < GC; g++) out[g] = _mm512_add_ps(acc0[g], acc1[g]);
}

/* logits of one page, 16 tokens per block; lanes past fill re-read token f - 1 and are not stored */
static void ada_page_scores16(const ada_plan *pl, const uint8_t *cp, int KB, int f, const float *lut,
                              int lut_stride, const float *rho0, const float *drho, int G, float scale,
                              float (*s)[ADA_MAX_P])
{
    __m512i words[ADA_MAX_D / 2 + 8];
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 vs = _mm512_set1_ps(scale);
    for (int t = 0; t < f; t += 16) {
        if (pl->dword_mode) {
            __m256i lo[ADA_MAX_D / 2 + 8], hi[ADA_MAX_D / 2 + 8];
            int ti[16];
            for (int j = 0; j < 16; j++) ti[j] = t + j < f ? t + j : f - 1;
            ada_load_dwords(cp, ti, KB, pl->n_words, lo);
            ada_load_dwords(cp, ti + 8, KB, pl->n_words, hi);
            for (int w = 0; w < pl->n_words; w++)
                words[w] = _mm512_inserti64x4(_mm512_castsi256_si512(lo[w]), hi[w], 1);
        } else {
            const __m512i tt = _mm512_min_epi32(_mm512_add_epi32(_mm512_set1_epi32(t), lane), _mm512_set1_epi32(f - 1));
            const __m512i rowoff = _mm512_mullo_epi32(tt, _mm512_set1_epi32(KB));
            for (int w = 0; w < pl->n_words; w++)
                words[w] = _mm512_i32gather_epi32(rowoff, (const int *)(cp + pl->word_byte[w]), 1);
        }
        const __mmask16 keep = f - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (f - t)) - 1u);
        for (int g0 = 0; g0 < G; g0 += 8) {
            const int gc = G - g0 < 8 ? G - g0 : 8;
            const float *lg = lut + (int64_t)g0 * lut_stride;
            __m512 o[8];
            switch (gc) {
            case 1: ada_scores_blk16(pl, words, lg, lut_stride, rho0, drho, 1, o); break;
            case 2: ada_scores_blk16(pl, words, lg, lut_stride, rho0, drho, 2, o); break;
            case 3: ada_scores_blk16(pl, words, lg, lut_stride, rho0, drho, 3, o); break;
            case 4: ada_scores_blk16(pl, words, lg, lut_stride, rho0, drho, 4, o); break;
            case 5: ada_scores_blk16(pl, words, lg, lut_stride, rho0, drho, 5, o); break;
            case 6: ada_scores_blk16(pl, words, lg, lut_stride, rho0, drho, 6, o); break;
            case 7: ada_scores_blk16(pl, words, lg, lut_stride, rho0, drho, 7, o); break;
            default: ada_scores_blk16(pl, words, lg, lut_stride, rho0, drho, 8, o); break;
            }
            for (int g = 0; g < gc; g++) _mm512_mask_storeu_ps(s[g0 + g] + t, keep, _mm512_mul_ps(o[g], vs));
        }
    }
}
#endif

/* logits s[g][t], t < f, of one ADA page */
static void ada_page_scores(const ada_plan *pl, const uint8_t *cp, int KB, int f, const float *lut, int lut_stride,
                            const float *rho0, const float *drho, int G, float scale, float (*s)[ADA_MAX_P])
{
    const int h2 = pl->h2;
    int t = 0;
#ifdef ADA_AVX512
    if (KB >= 4) {
        ada_page_scores16(pl, cp, KB, f, lut, lut_stride, rho0, drho, G, scale, s);
        return;
    }
#endif
#ifdef ADA_SIMD
    if (KB >= 4) {
        __m256i words[ADA_MAX_D / 2 + 8];
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256 vs = _mm256_set1_ps(scale);
        for (; t < f; t += 8) {
            /* lanes past fill re-read token f - 1 (never a slot past fill) */
            const __m256i tt = _mm256_min_epi32(_mm256_add_epi32(_mm256_set1_epi32(t), lane), _mm256_set1_epi32(f - 1));
            const __m256i rowoff = _mm256_mullo_epi32(tt, _mm256_set1_epi32(KB));
            if (pl->dword_mode) {
                int ti[8];
                for (int j = 0; j < 8; j++) ti[j] = t + j < f ? t + j : f - 1;
                ada_load_dwords(cp, ti, KB, pl->n_words, words);
            } else
                for (int w = 0; w < pl->n_words; w++)
                    words[w] = _mm256_i32gather_epi32((const int *)(cp + pl->word_byte[w]), rowoff, 1);
            for (int g0 = 0; g0 < G; g0 += 8) {
                const int gc = G - g0 < 8 ? G - g0 : 8;
                const float *lg = lut + (int64_t)g0 * lut_stride;
                __m256 o[8];
                switch (gc) {
                case 1: ada_scores_blk(pl, words, lg, lut_stride, rho0, drho, 1, o); break;
                case 2: ada_scores_blk(pl, words, lg, lut_stride, rho0, drho, 2, o); break;
                case 3: ada_scores_blk(pl, words, lg, lut_stride, rho0, drho, 3, o); break;
                case 4: ada_scores_blk(pl, words, lg, lut_stride, rho0, drho, 4, o); break;
                case 5: ada_scores_blk(pl, words, lg, lut_stride, rho0, drho, 5, o); break;
                case 6: ada_scores_blk(pl, words, lg, lut_stride, rho0, drho, 6, o); break;
                case 7: ada_scores_blk(pl, words, lg, lut_stride, rho0, drho, 7, o); break;
                default: ada_scores_blk(pl, words, lg, lut_stride, rho0, drho, 8, o); break;
                }
                for (int g = 0; g < gc; g++) {
                    const __m256 x = _mm256_mul_ps(o[g], vs);
                    if (t + 8 <= f) _mm256_storeu_ps(s[g0 + g] + t, x);
                    else {
                        float tmp[8];
                        _mm256_storeu_ps(tmp, x);
                        for (int j = 0; t + j < f; j++) s[g0 + g][t + j] = tmp[j];
                    }
                }
            }
        }
        return;
    }
#endif
    for (; t < f; t++) {
        const uint8_t *row = cp + (int64_t)t * KB;
        float acc[ADA_MAX_G];
        for (int g = 0; g < G; g++) acc[g] = 0.f;
        for (int i = 0; i < h2; i++) {
            const int a = (int)ada_field(row, pl->bit[i], pl->ba[i]);
            const int r = (int)ada_field(row, pl->bit[i] + pl->ba[i], pl->br[i]);
            const float rho = rho0[i] + (float)r * drho[i];
            for (int g = 0; g < G; g++) acc[g] += rho * lut[(int64_t)g * lut_stride + pl->off[i] + a];
        }
        for (int g = 0; g < G; g++) s[g][t] = acc[g] * scale;
    }
}

#ifdef ADA_SIMD
/* 8 value codes of dims d..d+7 of one row, as float32 */
ADA_INLINE __m256 ada_vcodes8(const uint8_t *row, int d, const int VB)
{
    if (VB == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(row + d))));
    if (VB == 4) {
        uint32_t x;
        memcpy(&x, row + d / 2, 4);
        return _mm256_cvtepi32_ps(_mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32((int)x), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
            _mm256_set1_epi32(15)));
    }
    uint16_t x;
    memcpy(&x, row + d / 4, 2);
    return _mm256_cvtepi32_ps(_mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32((int)x), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
        _mm256_set1_epi32(3)));
}

/* acc[g][d .. d + 8 CP) += sum_t p[g][t] * (code * v_scale + v_min), GC <= 8 heads, CP chunks of 8 dims
 * inside one value group (the dequantised chunk is built once per token and shared by the GC heads) */
ADA_INLINE void ada_values_run(const uint8_t *vc, const uint16_t *vmn, const uint16_t *vsc, int row_bytes, int f,
                               int d, int vg, int ng, float (*p)[ADA_MAX_P], float (*acc)[ADA_MAX_D], const int VB,
                               const int GC, const int CP)
{
    __m256 a[8][4];
    const int grp = d / vg;
    for (int g = 0; g < GC; g++)
        for (int c = 0; c < CP; c++) a[g][c] = _mm256_loadu_ps(acc[g] + d + 8 * c);
    for (int t = 0; t < f; t++) {
        const uint8_t *row = vc + (int64_t)t * row_bytes;
        const __m256 sc = _mm256_set1_ps(_cvtsh_ss(vsc[t * ng + grp])), mn = _mm256_set1_ps(_cvtsh_ss(vmn[t * ng + grp]));
        for (int c = 0; c < CP; c++) {
            const __m256 v = _mm256_fmadd_ps(ada_vcodes8(row, d + 8 * c, VB), sc, mn);
            for (int g = 0; g < GC; g++) a[g][c] = _mm256_fmadd_ps(_mm256_broadcast_ss(&p[g][t]), v, a[g][c]);
        }
    }
    for (int g = 0; g < GC; g++)
        for (int c = 0; c < CP; c++) _mm256_storeu_ps(acc[g] + d + 8 * c, a[g][c]);
}

#ifdef ADA_AVX512
/* 16 value codes of dims d..d+15 of one row, as float32 (loads stay inside the row: d + 16 <= D) */
ADA_INLINE __m512 ada_vcodes16(const uint8_t *row, int d, const int VB)
{
    if (VB == 8) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + d))));
    if (VB == 4) { /* 8 bytes = 16 nibbles, low nibble first */
        const __m128i b = _mm_loadl_epi64((const __m128i *)(row + d / 2)), m = _mm_set1_epi8(15);
        const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
    }
    uint32_t x; /* VB == 2: 4 bytes = 16 two-bit codes */
    memcpy(&x, row + d / 4, 4);
    return _mm512_cvtepi32_ps(_mm512_and_si512(
        _mm512_srlv_epi32(_mm512_set1_epi32((int)x),
                          _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)),
        _mm512_set1_epi32(3)));
}

/* ada_values_run with 16-dim chunks: acc[g][d .. d + 16 CP) over one value group */
ADA_INLINE void ada_values_run16(const uint8_t *vc, const uint16_t *vmn, const uint16_t *vsc, int row_bytes, int f,
                                 int d, int vg, int ng, float (*p)[ADA_MAX_P], float (*acc)[ADA_MAX_D], const int VB,
                                 const int GC, const int CP)
{
    __m512 a[8][4];
    const int grp = d / vg;
    for (int g = 0; g < GC; g++)
        for (int c = 0; c < CP; c++) a[g][c] = _mm512_loadu_ps(acc[g] + d + 16 * c);
    for (int t = 0; t < f; t++) {
        const uint8_t *row = vc + (int64_t)t * row_bytes;
        const __m512 sc = _mm512_set1_ps(_cvtsh_ss(vsc[t * ng + grp])), mn = _mm512_set1_ps(_cvtsh_ss(vmn[t * ng + grp]));
        __m512 pg[8];
        for (int g = 0; g < GC; g++) pg[g] = _mm512_set1_ps(p[g][t]);
        for (int c = 0; c < CP; c++) {
            const __m512 v = _mm512_fmadd_ps(ada_vcodes16(row, d + 16 * c, VB), sc, mn);
            for (int g = 0; g < GC; g++) a[g][c] = _mm512_fmadd_ps(pg[g], v, a[g][c]);
        }
    }
    for (int g = 0; g < GC; g++)
        for (int c = 0; c < CP; c++) _mm512_storeu_ps(acc[g] + d + 16 * c, a[g][c]);
}
#endif

ADA_INLINE void ada_values_gc(const uint8_t *vc, const uint16_t *vmn, const uint16_t *vsc, int row_bytes, int f,
                              int D, int vg, int ng, float (*p)[ADA_MAX_P], float (*acc)[ADA_MAX_D], const int VB,
                              const int GC)
{
#ifdef ADA_AVX512
    /* 16-dim chunks; accumulators GC * CP <= 16 */
    if (GC <= 4 && vg % 64 == 0) {
        for (int d = 0; d < D; d += 64) ada_values_run16(vc, vmn, vsc, row_bytes, f, d, vg, ng, p, acc, VB, GC, 4);
        return;
    }
    if (vg % 32 == 0) {
        for (int d = 0; d < D; d += 32) ada_values_run16(vc, vmn, vsc, row_bytes, f, d, vg, ng, p, acc, VB, GC, 2);
        return;
    }
    if (vg % 16 == 0) {
        for (int d = 0; d < D; d += 16) ada_values_run16(vc, vmn, vsc, row_bytes, f, d, vg, ng, p, acc, VB, GC, 1);
        return;
    }
#endif
    /* accumulators GC * CP <= 16; a run of CP chunks never straddles a value group */
    if (GC <= 4 && vg % 32 == 0)
        for (int d = 0; d < D; d += 32) ada_values_run(vc, vmn, vsc, row_bytes, f, d, vg, ng, p, acc, VB, GC, 4);
    else if (vg % 16 == 0)
        for (int d = 0; d < D; d += 16) ada_values_run(vc, vmn, vsc, row_bytes, f, d, vg, ng, p, acc, VB, GC, 2);
    else
        for (int d = 0; d < D; d += 8) ada_values_run(vc, vmn, vsc, row_bytes, f, d, vg, ng, p, acc, VB, GC, 1);
}

#define ADA_VALUES_VB(VB)                                                                                   \
    switch (gc) {                                                                                           \
    case 1: ada_values_gc(vc, vmn, vsc, row_bytes, f, D, vg, ng, pg, accg, VB, 1); break;                  \
    case 2: ada_values_gc(vc, vmn, vsc, row_bytes, f, D, vg, ng, pg, accg, VB, 2); break;                  \
    case 3: ada_values_gc(vc, vmn, vsc, row_bytes, f, D, vg, ng, pg, accg, VB, 3); break;                  \
    case 4: ada_values_gc(vc, vmn, vsc, row_bytes, f, D, vg, ng, pg, accg, VB, 4); break;                  \
    case 5: ada_values_gc(vc, vmn, vsc, row_bytes, f, D, vg, ng, pg, accg, VB, 5); break;                  \
    case 6: ada_values_gc(vc, vmn, vsc, row_bytes, f, D, vg, ng, pg, accg, VB, 6); break;                  \
    case 7: ada_values_gc(vc, vmn, vsc, row_bytes, f, D, vg, ng, pg, accg, VB, 7); break;                  \
    default: ada_values_gc(vc, vmn, vsc, row_bytes, f, D, vg, ng, pg, accg, VB, 8); break;                 \
    }
#endif

/* acc[g] += sum_t p[g][t] * (code * v_scale + v_min) over one ADA page's values */
static void ada_page_values(const uint8_t *vc, const uint16_t *vmn, const uint16_t *vsc, int f, int D, int vb,
                            int vg, int G, float (*p)[ADA_MAX_P], float (*acc)[ADA_MAX_D])
{
    const int ng = D / vg, row_bytes = D * vb / 8;
#ifdef ADA_SIMD
    for (int g0 = 0; g0 < G; g0 += 8) {
        const int gc = G - g0 < 8 ? G - g0 : 8;
        float (*pg)[ADA_MAX_P] = p + g0;
        float (*accg)[ADA_MAX_D] = acc + g0;
        if (vb == 4) { ADA_VALUES_VB(4) }
        else if (vb == 8) { ADA_VALUES_VB(8) }
        else { ADA_VALUES_VB(2) }
    }
#else
    const int per = 8 / vb;
    for (int t = 0; t < f; t++) {
        const uint8_t *row = vc + (int64_t)t * row_bytes;
        for (int d = 0; d < D; d++) {
            const int j = t * ng + d / vg;
            const float c = (float)((row[d / per] >> (vb * (d % per))) & ((1 << vb) - 1));
            const float v = c * ada_h2f(vsc[j]) + ada_h2f(vmn[j]);
            for (int g = 0; g < G; g++) acc[g][d] += p[g][t] * v;
        }
    }
#endif
}

/* ---- dense pages ------------------------------------------------------------------------------------- */
#ifdef ADA_SIMD
#define ada_ld8_f16 skvrt_ld8_f16
#define ada_ld8_f32 skvrt_ld8_f32
#define ADA_DENSE_OPS(SUF, KV_T, LD8)                                                                       \
static void ada_dense_scores_##SUF(const KV_T *kp, int f, int D, const float *qh, int G, float scale,       \
                                   float (*s)[ADA_MAX_P])                                                    \
{                                                                                                            \
    for (int t = 0; t < f; t++) {                                                                            \
        const KV_T *kr = kp + (int64_t)t * D;                                                                \
        for (int g = 0; g < G; g++) {                                                                        \
            const float *qg = qh + g * D;                                                                    \
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                       \
            int d = 0;                                                                                       \
            for (; d + 16 <= D; d += 16) {                                                                   \
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), LD8(kr + d), a0);                              \
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d + 8), LD8(kr + d + 8), a1);                      \
            }                                                                                                \
            for (; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), LD8(kr + d), a0);            \
            s[g][t] = ada_hsum8(_mm256_add_ps(a0, a1)) * scale;                                              \
        }                                                                                                    \
    }                                                                                                        \
}                                                                                                            \
static void ada_dense_values_##SUF(const KV_T *vp, int f, int D, int G, float (*p)[ADA_MAX_P],              \
                                   float (*acc)[ADA_MAX_D])                                                  \
{                                                                                                            \
    for (int t = 0; t < f; t++) {                                                                            \
        const KV_T *vr = vp + (int64_t)t * D;                                                                \
        for (int d = 0; d < D; d += 8) {                                                                     \
            const __m256 v = LD8(vr + d);                                                                    \
            for (int g = 0; g < G; g++)                                                                      \
                _mm256_storeu_ps(acc[g] + d, _mm256_fmadd_ps(_mm256_set1_ps(p[g][t]), v, _mm256_loadu_ps(acc[g] + d))); \
        }                                                                                                    \
    }                                                                                                        \
}
ADA_DENSE_OPS(f16, uint16_t, ada_ld8_f16)
ADA_DENSE_OPS(f32, float, ada_ld8_f32)
#else
#define ADA_DENSE_OPS(SUF, KV_T, CONV)                                                                      \
static void ada_dense_scores_##SUF(const KV_T *kp, int f, int D, const float *qh, int G, float scale,       \
                                   float (*s)[ADA_MAX_P])                                                    \
{                                                                                                            \
    for (int t = 0; t < f; t++)                                                                              \
        for (int g = 0; g < G; g++) {                                                                        \
            float x = 0.f;                                                                                   \
            for (int d = 0; d < D; d++) x += qh[g * D + d] * CONV(kp[(int64_t)t * D + d]);                   \
            s[g][t] = x * scale;                                                                             \
        }                                                                                                    \
}                                                                                                            \
static void ada_dense_values_##SUF(const KV_T *vp, int f, int D, int G, float (*p)[ADA_MAX_P],              \
                                   float (*acc)[ADA_MAX_D])                                                  \
{                                                                                                            \
    for (int t = 0; t < f; t++)                                                                              \
        for (int g = 0; g < G; g++)                                                                          \
            for (int d = 0; d < D; d++) acc[g][d] += p[g][t] * CONV(vp[(int64_t)t * D + d]);                 \
}
#define ADA_ID(x) (x)
ADA_DENSE_OPS(f16, uint16_t, ada_h2f)
ADA_DENSE_OPS(f32, float, ADA_ID)
#endif

#ifdef ADA_SIMD
/* exp(x) for x <= 0: x = k ln2 + r, |r| <= ln2 / 2, Taylor to r^7 (truncation < 1e-8 relative) */
static inline __m256 ada_exp8(__m256 x)
{
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 y = _mm256_set1_ps(1.f / 5040);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 720));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 120));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 24));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 6));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* online softmax: fold the page's logits s[g][t < f] into (m, l, acc); s becomes the unnormalised weights */
static void ada_softmax_page(int f, int G, int D, float (*s)[ADA_MAX_P], float *m, float *l, float (*acc)[ADA_MAX_D])
{
    for (int g = 0; g < G; g++) {
        float pm = -INFINITY;
        int t0 = 0;
#ifdef ADA_SIMD
        if (f >= 8) {
            __m256 mx = _mm256_loadu_ps(s[g]);
            for (t0 = 8; t0 + 8 <= f; t0 += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s[g] + t0));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
            pm = _mm_cvtss_f32(m4);
        }
#endif
        for (int t = t0; t < f; t++) pm = s[g][t] > pm ? s[g][t] : pm;
        const float m_new = pm > m[g] ? pm : m[g];
        const float corr = expf(m[g] - m_new);
        l[g] *= corr;
        if (corr != 1.f)
            for (int d = 0; d < D; d++) acc[g][d] *= corr;
        float sum = 0.f;
        int t = 0;
#ifdef ADA_SIMD
        const __m256 mv = _mm256_set1_ps(m_new);
        __m256 sv = _mm256_setzero_ps();
        for (; t + 8 <= f; t += 8) {
            const __m256 e = ada_exp8(_mm256_sub_ps(_mm256_loadu_ps(s[g] + t), mv));
            _mm256_storeu_ps(s[g] + t, e);
            sv = _mm256_add_ps(sv, e);
        }
        sum = ada_hsum8(sv);
#endif
        for (; t < f; t++) { s[g][t] = expf(s[g][t] - m_new); sum += s[g][t]; }
        l[g] += sum;
        m[g] = m_new;
    }
}

/* ---- one decode step over the pages of any tiers ----------------------------------------------------
 * A tier descriptor per pool (skvrt/ckernels.py `tier_desc` fills it): every field of a pool's pages lives at
 * `field + pid * stride` bytes (pages of all tiers are frames of one arena, skvrt/kv/pool.py). */
typedef struct {
    int32_t kind;                      /* 0 dense float16, 1 dense float32, 2 ADA */
    int32_t P;                         /* tokens per page, <= ADA_MAX_P */
    int64_t stride;                    /* bytes from page p to page p + 1, in every field below */
    const void *k, *v;                 /* dense: (P, D) KV_T per page */
    const uint8_t *codes;              /* ADA: (P, KB) uint8 */
    const uint16_t *frame;             /* ADA: (D/2, 4) float16 */
    const uint8_t *v_codes;            /* ADA: (P, D * vb / 8) uint8 */
    const uint16_t *v_min, *v_scale;   /* ADA: (P, D / vg) float16 */
    uint16_t *mass;                    /* (P,) float16 per page or NULL: += softmax weight summed over G heads,
                                          rounded stochastically (slot_mass.h) with seed mass_seed */
    int32_t KB, vb, vg;                /* ADA: key bytes per token, value bits, value group */
    uint32_t mass_seed;                /* the observing query's position (any tier with mass) */
    const uint8_t *angle_bits;         /* ADA: (H, D/2) this layer's field widths */
    const uint8_t *radius_bits;        /* ADA: (H, D/2) */
} skvrt_tier;

#define ADA_MAX_TIERS 8
#define PAGE_AT(T, F, PID, TYPE) ((TYPE)((const char *)(T)->F + (int64_t)(PID) * (T)->stride))

/* Shapes (page-table contract: skvrt/kv/pages.py):
 *   q (nq, D) float32; fill (N,) int32 (the arena's); page_ids (H, max_pages) int32; page_tiers (H, max_pages)
 *   int8 = index into tiers; n_pages (H,) int32; out (nq, D) float32.
 * Returns 0, -1 on bad shapes / descriptors, -2 out of memory. */
int skvrt_paged_decode(const float *q, const skvrt_tier *tiers, int n_tiers, const int32_t *fill,
                       const int32_t *page_ids, const int8_t *page_tiers, const int32_t *n_pages, int nq, int H,
                       int D, int max_pages, float scale, float *out)
{
    if (D > ADA_MAX_D || D % 8 || D <= 0 || H <= 0 || nq % H || nq / H > ADA_MAX_G) return -1;
    if (n_tiers <= 0 || n_tiers > ADA_MAX_TIERS) return -1;
    const int G = nq / H, h2 = D / 2;
    int any_mass = 0;
    for (int ti = 0; ti < n_tiers; ti++) {
        const skvrt_tier *T = &tiers[ti];
        if (T->P <= 0 || T->P > ADA_MAX_P || T->kind < 0 || T->kind > 2) return -1;
        any_mass |= T->mass != NULL;
        if (T->kind != 2) continue;
        if (!(T->vb == 2 || T->vb == 4 || T->vb == 8) || T->vg <= 0 || T->vg % 8 || D % T->vg || T->KB <= 0)
            return -1;
        for (int h = 0; h < H; h++) {
            int bits = 0;
            for (int i = 0; i < h2; i++) {
                const int a = T->angle_bits[h * h2 + i], r = T->radius_bits[h * h2 + i];
                if (a > ADA_MAX_W || r > ADA_MAX_W) return -1;
                bits += a + r;
            }
            if (bits > 8 * T->KB) return -1;
        }
    }
    int rc = 0;
    _Pragma("omp parallel for schedule(dynamic, 1)")
    for (int h = 0; h < H; h++) {
        float acc[ADA_MAX_G][ADA_MAX_D], s[ADA_MAX_G][ADA_MAX_P], m[ADA_MAX_G], l[ADA_MAX_G];
        float rho0[ADA_MAX_D / 2], drho[ADA_MAX_D / 2];
        ada_plan plans[ADA_MAX_TIERS];
        float *luts[ADA_MAX_TIERS] = {0};
        int lut_stride[ADA_MAX_TIERS];
        const float *qh = q + (int64_t)h * G * D;
        const int32_t *ids = page_ids + (int64_t)h * max_pages;
        const int8_t *tis = page_tiers + (int64_t)h * max_pages;
        /* attention mass: unnormalised weights of every slot, and each page's running max, kept until the
         * final (max, sum) are known */
        float *w = NULL, *wm = NULL;
        int n_tok = 0;
        for (int g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.f; memset(acc[g], 0, sizeof(float) * D); }
        for (int ti = 0; ti < n_tiers; ti++)
            if (tiers[ti].kind == 2) {
                ada_make_plan(&plans[ti], tiers[ti].angle_bits + h * h2, tiers[ti].radius_bits + h * h2, h2,
                              tiers[ti].KB);
                lut_stride[ti] = plans[ti].E + 16; /* 16-float loads past a pair's last entry stay inside */
            }
        if (any_mass) {
            for (int pi = 0; pi < n_pages[h]; pi++) n_tok += fill[ids[pi]];
            w = (float *)malloc(sizeof(float) * ((size_t)n_tok * G + (size_t)n_pages[h] * G + 1));
            if (!w) { rc = -2; continue; }
            wm = w + (size_t)n_tok * G;
        }
        int tok = 0;
        for (int pi = 0; pi < n_pages[h]; pi++) {
            const int32_t pid = ids[pi];
            const int ti = tis[pi];
            const int f = fill[pid];
            if (ti < 0 || ti >= n_tiers) { rc = -1; break; }
            const skvrt_tier *T = &tiers[ti];
            if (f <= 0) continue;
            if (T->kind == 0 || T->kind == 1) {
                if (T->kind == 0) ada_dense_scores_f16(PAGE_AT(T, k, pid, const uint16_t *), f, D, qh, G, scale, s);
                else ada_dense_scores_f32(PAGE_AT(T, k, pid, const float *), f, D, qh, G, scale, s);
                ada_softmax_page(f, G, D, s, m, l, acc);
                if (T->kind == 0) ada_dense_values_f16(PAGE_AT(T, v, pid, const uint16_t *), f, D, G, s, acc);
                else ada_dense_values_f32(PAGE_AT(T, v, pid, const float *), f, D, G, s, acc);
            } else {
                if (!luts[ti]) {
                    luts[ti] = (float *)malloc(sizeof(float) * (size_t)lut_stride[ti] * G);
                    if (!luts[ti]) { rc = -2; break; }
                }
                ada_build_lut(&plans[ti], PAGE_AT(T, frame, pid, const uint16_t *), qh, G, D, luts[ti],
                              lut_stride[ti], rho0, drho);
                ada_page_scores(&plans[ti], PAGE_AT(T, codes, pid, const uint8_t *), T->KB, f, luts[ti],
                                lut_stride[ti], rho0, drho, G, scale, s);
                ada_softmax_page(f, G, D, s, m, l, acc);
                ada_page_values(PAGE_AT(T, v_codes, pid, const uint8_t *), PAGE_AT(T, v_min, pid, const uint16_t *),
                                PAGE_AT(T, v_scale, pid, const uint16_t *), f, D, T->vb, T->vg, G, s, acc);
            }
            if (w) {
                for (int g = 0; g < G; g++) {
                    memcpy(w + (size_t)g * n_tok + tok, s[g], sizeof(float) * f);
                    wm[(size_t)pi * G + g] = m[g];
                }
                tok += f;
            }
        }
        for (int ti = 0; ti < n_tiers; ti++) free(luts[ti]);
        float inv[ADA_MAX_G];
        for (int g = 0; g < G; g++) {
            float *o = out + ((int64_t)h * G + g) * D;
            inv[g] = l[g] > 0.f ? 1.f / l[g] : 0.f;
            for (int d = 0; d < D; d++) o[d] = acc[g][d] * inv[g];
        }
        if (w) { /* mass[slot] += sum_g w * exp(m_page - m) / l */
            tok = 0;
            for (int pi = 0; pi < n_pages[h] && rc == 0; pi++) {
                const int32_t pid = ids[pi];
                const skvrt_tier *T = &tiers[tis[pi]];
                const int f = fill[pid];
                if (f <= 0) continue;
                float c[ADA_MAX_G];
                for (int g = 0; g < G; g++) c[g] = expf(wm[(size_t)pi * G + g] - m[g]) * inv[g];
                if (T->mass) {
                    uint16_t *ms = (uint16_t *)((char *)T->mass + (int64_t)pid * T->stride);
                    for (int t = 0; t < f; t++) {
                        float x = 0.f;
                        for (int g = 0; g < G; g++) x += w[(size_t)g * n_tok + tok + t] * c[g];
                        ms[t] = skvrt_mass_add(ms[t], x, skvrt_mass_key(pid, t, T->mass_seed));
                    }
                }
                tok += f;
            }
            free(w);
        }
    }
    return rc;
}

/* ---- ADA pages -> float32 keys and values (prefill chunks attend through one GEMM over these) -----------
 * Twin: AdaTier.decode_keys / read_values (skvrt/kv/ada.py). For the listed pages of one (layer, kv head):
 *   k_out, v_out (n, P, D) float32; slots at or past a page's fill are left untouched. Page pid's fields
 *   start `pid * stride` bytes past the field pointers (pages are arena frames).
 *   angle_bits, radius_bits (D/2,) uint8: this (layer, head)'s field widths. Other shapes as in the decode
 *   kernel above. Each pair's cos / sin table (2^ba entries) is built once per page.
 * rc -1 on bad shapes, -2 out of memory. */
int skvrt_ada_decode_pages(const uint8_t *codes, const uint16_t *frame, const uint8_t *v_codes,
                           const uint16_t *v_min, const uint16_t *v_scale, int64_t stride, const int32_t *fill,
                           const int32_t *pids, int n, const uint8_t *angle_bits, const uint8_t *radius_bits,
                           int P, int D, int KB, int vb, int vg, float *k_out, float *v_out)
{
    if (D <= 0 || D % 2 || D > ADA_MAX_D || P <= 0 || KB <= 0) return -1;
    if (!(vb == 2 || vb == 4 || vb == 8) || vg <= 0 || D % vg) return -1;
    const int h2 = D / 2, ng = D / vg, vrow = D * vb / 8;
    int32_t off[ADA_MAX_D / 2], bit[ADA_MAX_D / 2], E = 0, o = 0;
    for (int i = 0; i < h2; i++) {
        if (angle_bits[i] > ADA_MAX_W || radius_bits[i] > ADA_MAX_W) return -1;
        off[i] = E;
        bit[i] = o;
        E += 1 << angle_bits[i];
        o += angle_bits[i] + radius_bits[i];
    }
    if (o > 8 * KB) return -1;
    int rc = 0;
    _Pragma("omp parallel for schedule(dynamic, 4)")
    for (int j = 0; j < n; j++) {
        float *cs = (float *)malloc(sizeof(float) * 2 * (size_t)E); /* (cos, sin) of entry a of pair i */
        if (!cs) { rc = -2; continue; }
        const int64_t pid = pids[j];
        const int f = fill[pid];
        const uint16_t *fr = (const uint16_t *)((const char *)frame + pid * stride);
        float rho0[ADA_MAX_D / 2], drho[ADA_MAX_D / 2];
        for (int i = 0; i < h2; i++) {
            const float th0 = ada_h2f(fr[4 * i]), gam = ada_h2f(fr[4 * i + 1]);
            rho0[i] = ada_h2f(fr[4 * i + 2]);
            drho[i] = ada_h2f(fr[4 * i + 3]);
            for (int a = 0; a < 1 << angle_bits[i]; a++)
                ada_sincos1(th0 + (float)a * gam, &cs[2 * (off[i] + a) + 1], &cs[2 * (off[i] + a)]);
        }
        const uint8_t *cp = codes + pid * stride;
        const uint8_t *vc = v_codes + pid * stride;
        const uint16_t *vmn = (const uint16_t *)((const char *)v_min + pid * stride);
        const uint16_t *vsc = (const uint16_t *)((const char *)v_scale + pid * stride);
        float *ko = k_out + (int64_t)j * P * D, *vo = v_out + (int64_t)j * P * D;
        for (int t = 0; t < f; t++) {
            const uint8_t *row = cp + (int64_t)t * KB;
            float *kr = ko + (int64_t)t * D;
            for (int i = 0; i < h2; i++) {
                const int a = (int)ada_field(row, bit[i], angle_bits[i]);
                const int r = (int)ada_field(row, bit[i] + angle_bits[i], radius_bits[i]);
                const float rho = rho0[i] + (float)r * drho[i];
                kr[i] = rho * cs[2 * (off[i] + a)];
                kr[i + h2] = rho * cs[2 * (off[i] + a) + 1];
            }
            const uint8_t *vr = vc + (int64_t)t * vrow;
            const int per = 8 / vb;
            for (int d = 0; d < D; d++) {
                const int64_t gi = (int64_t)t * ng + d / vg;
                const float c = (float)((vr[d / per] >> (vb * (d % per))) & ((1 << vb) - 1));
                vo[(int64_t)t * D + d] = c * ada_h2f(vsc[gi]) + ada_h2f(vmn[gi]);
            }
        }
        free(cs);
    }
    return rc;
}
