/* Helpers shared by the CPU kernels: float16 -> float32, 8-wide loads and a horizontal sum.
 * SKVRT_SIMD is defined when AVX2 + F16C + FMA are available (-march=native); scalar fallbacks otherwise. */
#ifndef SKVRT_SIMD_H
#define SKVRT_SIMD_H
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define SKVRT_SIMD 1
#endif

static inline float skvrt_h2f(uint16_t h)
{
#ifdef SKVRT_SIMD
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0) {
        if (m == 0) bits = sign;
        else { /* subnormal */
            int s = 0;
            while (!(m & 0x400)) { m <<= 1; s++; }
            bits = sign | ((uint32_t)(113 - s) << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) bits = sign | 0x7f800000u | (m << 13);
    else bits = sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

#ifdef SKVRT_SIMD
static inline __m256 skvrt_ld8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 skvrt_ld8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline float skvrt_hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}
#endif
#endif
