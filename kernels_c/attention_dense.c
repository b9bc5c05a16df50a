/* Decode-step attention over dense-tier KV pages (CPU), read through the page table.
 *
 * Twin: skvrt/kv/attention.py (gather_dense + attend_dense), parity-tested in tests/test_ckernels.py.
 * One call = one layer, one decode step (T = 1). OpenMP over KV heads; the G query heads of a GQA group are
 * processed together so each key / value row is read once. Online softmax across pages: no (context,)
 * buffer beyond one page, and slots at or past `fill` are never touched.
 *
 * Shapes (page-table contract: skvrt/kv/pages.py):
 *   q          (nq, D)          float32   post-RoPE queries; query head j reads KV head j / G
 *   k_pool     (N, P, D)        KV_T      dense-tier page storage (float16 bits or float32); page pid's rows
 *   v_pool     (N, P, D)        KV_T      start pid * stride bytes past k_pool / v_pool (arena frames)
 *   fill       (N,)             int32     valid slots per page
 *   page_ids   (H, max_pages)   int32     this layer's page ids per KV head (dense pages only)
 *   n_pages    (H,)             int32
 *   out        (nq, D)          float32
 *   mass       (N, P)           float16   or NULL, page pid's at pid * stride bytes: += the softmax weight
 *                                         of each slot summed over the G query heads (RDR utility), rounded
 *                                         stochastically with seed `mass_seed` (slot_mass.h)
 * Limits: D % 8 == 0, D <= 256, P <= 256, G <= 16.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "simd.h"
#include "slot_mass.h"

#define MAX_D 256
#define MAX_P 256
#define MAX_G 16

#define load8_f16 skvrt_ld8_f16
#define load8_f32 skvrt_ld8_f32
#define hsum8 skvrt_hsum8
#define f16_to_f32 skvrt_h2f

/* dot(q, row) and acc += p * row, for one storage type */
#ifdef SKVRT_SIMD
#define DEF_ROW_OPS(SUF, KV_T, LOAD8)                                                                      \
static inline float dot_##SUF(const float *q, const KV_T *r, int D)                                       \
{                                                                                                           \
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();                                              \
    int d = 0;                                                                                              \
    for (; d + 16 <= D; d += 16) {                                                                          \
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), LOAD8(r + d), s0);                                     \
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), LOAD8(r + d + 8), s1);                             \
    }                                                                                                       \
    for (; d < D; d += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), LOAD8(r + d), s0);                   \
    return hsum8(_mm256_add_ps(s0, s1));                                                                    \
}                                                                                                           \
static inline void axpy_##SUF(float *acc, float p, const KV_T *r, int D)                                   \
{                                                                                                           \
    const __m256 pv = _mm256_set1_ps(p);                                                                    \
    for (int d = 0; d < D; d += 8)                                                                          \
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, LOAD8(r + d), _mm256_loadu_ps(acc + d)));            \
}
DEF_ROW_OPS(f16, uint16_t, load8_f16)
DEF_ROW_OPS(f32, float, load8_f32)
#else
#define DEF_ROW_OPS(SUF, KV_T, CONV)                                                                       \
static inline float dot_##SUF(const float *q, const KV_T *r, int D)                                       \
{                                                                                                           \
    float s = 0.f;                                                                                          \
    for (int d = 0; d < D; d++) s += q[d] * CONV(r[d]);                                                     \
    return s;                                                                                               \
}                                                                                                           \
static inline void axpy_##SUF(float *acc, float p, const KV_T *r, int D)                                   \
{                                                                                                           \
    for (int d = 0; d < D; d++) acc[d] += p * CONV(r[d]);                                                   \
}
#define CONV_F32(x) (x)
DEF_ROW_OPS(f16, uint16_t, f16_to_f32)
DEF_ROW_OPS(f32, float, CONV_F32)
#endif

#define DEFINE_DENSE_DECODE(SUF, KV_T)                                                                     \
int skvrt_dense_decode_##SUF(const float *q, const KV_T *k_pool, const KV_T *v_pool, const int32_t *fill, \
                             const int32_t *page_ids, const int32_t *n_pages, int nq, int H, int P, int D, \
                             int max_pages, int64_t stride, float scale, float *out, uint16_t *mass,      \
                             uint32_t mass_seed)                                                           \
{                                                                                                           \
    if (D > MAX_D || D % 8 || P > MAX_P || nq % H || nq / H > MAX_G) return -1;                             \
    const int G = nq / H;                                                                                   \
    _Pragma("omp parallel for schedule(dynamic, 1)")                                                        \
    for (int h = 0; h < H; h++) {                                                                           \
        float acc[MAX_G][MAX_D], s[MAX_G][MAX_P], m[MAX_G], l[MAX_G];                                       \
        const float *qh = q + (int64_t)h * G * D;                                                           \
        for (int g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.f; memset(acc[g], 0, sizeof(float) * D); } \
        for (int pi = 0; pi < n_pages[h]; pi++) {                                                           \
            const int32_t pid = page_ids[(int64_t)h * max_pages + pi];                                      \
            const int f = fill[pid];                                                                        \
            if (f == 0) continue;                                                                           \
            const KV_T *kp = (const KV_T *)((const char *)k_pool + (int64_t)pid * stride);                  \
            const KV_T *vp = (const KV_T *)((const char *)v_pool + (int64_t)pid * stride);                  \
            float pm[MAX_G];                                                                                \
            for (int g = 0; g < G; g++) pm[g] = -INFINITY;                                                  \
            for (int t = 0; t < f; t++)                                                                     \
                for (int g = 0; g < G; g++) {                                                               \
                    const float x = dot_##SUF(qh + g * D, kp + (int64_t)t * D, D) * scale;                  \
                    s[g][t] = x;                                                                            \
                    pm[g] = x > pm[g] ? x : pm[g];                                                          \
                }                                                                                           \
            for (int g = 0; g < G; g++) {                                                                   \
                const float m_new = pm[g] > m[g] ? pm[g] : m[g];                                            \
                const float corr = expf(m[g] - m_new);                                                      \
                l[g] *= corr;                                                                               \
                for (int d = 0; d < D; d++) acc[g][d] *= corr;                                              \
                for (int t = 0; t < f; t++) { s[g][t] = expf(s[g][t] - m_new); l[g] += s[g][t]; }           \
                m[g] = m_new;                                                                               \
            }                                                                                               \
            for (int t = 0; t < f; t++)                                                                     \
                for (int g = 0; g < G; g++) axpy_##SUF(acc[g], s[g][t], vp + (int64_t)t * D, D);            \
        }                                                                                                   \
        for (int g = 0; g < G; g++) {                                                                       \
            float *oj = out + ((int64_t)h * G + g) * D;                                                     \
            const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;                                                \
            for (int d = 0; d < D; d++) oj[d] = acc[g][d] * inv;                                            \
        }                                                                                                   \
        if (!mass) continue;                                                                                \
        /* exact normalised weights (only when asked): recompute logits with the final max */               \
        for (int pi = 0; pi < n_pages[h]; pi++) {                                                           \
            const int32_t pid = page_ids[(int64_t)h * max_pages + pi];                                      \
            const KV_T *kp = (const KV_T *)((const char *)k_pool + (int64_t)pid * stride);                  \
            uint16_t *ms = (uint16_t *)((char *)mass + (int64_t)pid * stride);                              \
            for (int t = 0; t < fill[pid]; t++) {                                                           \
                float x = 0.f;                                                                              \
                for (int g = 0; g < G; g++)                                                                 \
                    x += expf(dot_##SUF(qh + g * D, kp + (int64_t)t * D, D) * scale - m[g]) / l[g];         \
                ms[t] = skvrt_mass_add(ms[t], x, skvrt_mass_key(pid, t, mass_seed));                        \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    return 0;                                                                                               \
}

DEFINE_DENSE_DECODE(f16, uint16_t)
DEFINE_DENSE_DECODE(f32, float)

int skvrt_abi_version(void) { return 1; }

void skvrt_set_threads(int n)
{
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#else
    (void)n;
#endif
}
