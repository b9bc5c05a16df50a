/* prefill_attention.cu: causal attention of a chunk of T query tokens (prefill, T > 1) over everything one
 * layer's page table holds -- the cached prefix and the chunk itself, which the cache appended before --
 * on pages of any tiers: dense float16 (tier kind KIND_DENSE) and ADA (keys decoded from their polar codes
 * per page tile, values dequantised). Causality by positions: key slot j is visible to query t iff
 * position(j) <= qpos[t] (pages need not be in position order; skvrt/kv/pages.py).
 *
 * Twin: skvrt/kv/cache.py PagedKVCache.attend for T > 1 (`_scores` + skvrt/kv/attention.py `softmax_attend`;
 * ADA pages: keys as AdaTier.decode_keys gives them, values AdaTier.read_values); launched by
 * skvrt/cuda/prefill.py prefill_attention; parity: tests/test_cuda_emu_prefill.py. Compile-time shapes
 * (HEAD_DIM, GQA, MAX_PAGE) and the tier descriptor: decode_common.cuh.
 *
 * Tiling. The T * G (query token, group head) rows of KV head h are cut into blocks of R rows; a block keeps its
 * rows' queries in shared memory and streams the head's pages through shared memory in tiles of KT tokens
 * (online softmax per row, flash-attention style), so memory per block is bounded (R D + 2 KT D + R KT floats,
 * 32-40 KiB) whatever the context, and no (T x context) score matrix is ever materialised:
 *   R = 4096 / D rows (64 / 32 / 16 for D = 64 / 128 / 256), KT = 2048 / D tokens per tile (32 / 16 / 8).
 * Row r of block b is row b R + r of the head: token t = row / G, group head g = row % G (query head h G + g).
 * Work split, NT = 128 threads: tile load, one element (dense) or one RoPE pair (ADA) per thread and step;
 * scores, one (row, key) pair per thread and step (dot product over D, start rotated by the key index so a
 * warp's reads of a key tile fall in distinct banks); softmax, one thread per row; accumulate, each thread
 * owns R D / NT = 32 (row, dim) accumulators in registers (element i = tid + k NT: row i / D, dim i % D).
 *
 * prefill_attention: grid (ceil(T G / R), H), block (NT,) = (128,).
 *   q           float32   query (t, j, d) at q[t * q_stride + j * D + d] (post-RoPE; j = query head; e.g. the
 *                         q|k|v projection rows, q_stride = its width)
 *   q_stride    long long floats between tokens
 *   qpos        (T,)            int32     query positions
 *   T           int
 *   tiers       (n_tiers,)      TierDesc  decode_common.cuh (the `mass` field is not used)
 *   pos_fields  (n_tiers,)      uint64    per tier, the address of page 0's positions field ((P_t,) int32 per
 *                                         page, pages `stride` bytes apart like the tier's other fields)
 *   fill        (N,)            int32     the arena's fill per frame
 *   page_ids    (H, max_pages)  int32
 *   page_tiers  (H, max_pages)  int8      or null: every page is tier 0
 *   n_pages     (H,)            int32
 *   max_pages   int
 *   scale       float           1 / sqrt(D)
 *   out         (T, H G, D)     float32   out[t, j] = softmax over visible keys of (scale q.k) @ V (0 if none)
 * Shared memory: static only (<= 42 KiB).
 */
#include "decode_common.cuh"

namespace pf {
using namespace dec;

constexpr int R = 4096 / D;   // query rows per block
constexpr int KT = 2048 / D;  // key tokens per tile
constexpr int PER = R * D / NT;  // accumulators per thread (32)

struct Smem {
    float q[R][D];
    float k[KT][D];
    float v[KT][D];
    float s[R][KT];
    float m[R], l[R], corr[R];
    int qp[R];
    int kp[KT];
    // ADA: field layout of the current (tier, head) and the current page's frame
    int bit[H2];
    unsigned char ba[H2], br[H2];
    float th0[H2], gam[H2], rho0[H2], drho[H2];
};

}  // namespace pf

extern "C" __global__ void __launch_bounds__(dec::NT)
prefill_attention(const float *__restrict__ q, long long q_stride, const int *__restrict__ qpos, int T,
                  const dec::TierDesc *__restrict__ tiers, const unsigned long long *__restrict__ pos_fields,
                  const int *__restrict__ fill, const int *__restrict__ page_ids,
                  const signed char *__restrict__ page_tiers, const int *__restrict__ n_pages, int max_pages,
                  float scale, float *__restrict__ out)
{
    using namespace pf;
    __shared__ Smem sm;
    const int tid = threadIdx.x, h = blockIdx.y, nq = gridDim.y * G;
    const long long row0 = (long long)blockIdx.x * R, rows = (long long)T * G;

    for (int i = tid; i < R * D; i += NT) {
        const int r = i / D, d = i % D;
        const long long row = row0 + r;
        float x = 0.f;
        if (row < rows) {
            const long long t = row / G;
            x = q[t * q_stride + (long long)(h * G + row % G) * D + d];
        }
        sm.q[r][d] = x;
    }
    if (tid < R) {
        const long long row = row0 + tid;
        sm.qp[tid] = row < rows ? qpos[row / G] : -1;  // padding rows see no key (positions are >= 0)
        sm.m[tid] = neg_inf();
        sm.l[tid] = 0.f;
    }
    float acc[PER];
#pragma unroll
    for (int k = 0; k < PER; k++) acc[k] = 0.f;
    __syncthreads();

    int plan_tier = -1;
    const int np = n_pages[h];
    for (int pi = 0; pi < np; pi++) {
        const long long e = (long long)h * max_pages + pi;
        const int pid = page_ids[e], tier = page_tiers ? page_tiers[e] : 0, f = fill[pid];
        if (f <= 0) continue;
        const TierDesc &TD = tiers[tier];
        const int *ppos = reinterpret_cast<const int *>(reinterpret_cast<const char *>(pos_fields[tier]) + pid * TD.stride);
        const bool ada = TD.kind == KIND_ADA;
        if (ada) {
            if (tier != plan_tier) {  // bit offset of each pair's (angle, radius) fields in a code row
                if (tid == 0) {
                    int o = 0;
                    for (int i = 0; i < H2; i++) {
                        const int a = TD.angle_bits[h * H2 + i], b = TD.radius_bits[h * H2 + i];
                        sm.bit[i] = o;
                        sm.ba[i] = (unsigned char)a;
                        sm.br[i] = (unsigned char)b;
                        o += a + b;
                    }
                }
                plan_tier = tier;
            }
            const uint2 *fr = reinterpret_cast<const uint2 *>(page_at(TD.frame, pid, TD.stride));
            for (int i = tid; i < H2; i += NT) {
                const uint2 w = fr[i];
                sm.th0[i] = half_lo(w.x);
                sm.gam[i] = half_hi(w.x);
                sm.rho0[i] = half_lo(w.y);
                sm.drho[i] = half_hi(w.y);
            }
            __syncthreads();
        }
        for (int t0 = 0; t0 < f; t0 += KT) {
            const int n = min(KT, f - t0);
            // ---- tile load: keys and values of slots [t0, t0 + n) as float32
            if (!ada) {
                const __half *kp = page_at(TD.k, pid, TD.stride) + (long long)t0 * D;
                const __half *vp = page_at(TD.v, pid, TD.stride) + (long long)t0 * D;
                for (int i = tid; i < n * D; i += NT) {
                    sm.k[i / D][i % D] = __half2float(kp[i]);
                    sm.v[i / D][i % D] = __half2float(vp[i]);
                }
            } else {
                const unsigned char *cp = page_at(TD.codes, pid, TD.stride) + (long long)t0 * TD.key_bytes;
                for (int i = tid; i < n * H2; i += NT) {
                    const int j = i / H2, p = i % H2, a = sm.ba[p];
                    const unsigned x = field(cp + j * TD.key_bytes, sm.bit[p], a + sm.br[p]);
                    const float rho = sm.rho0[p] + (float)(x >> a) * sm.drho[p];
                    float sn, cs;
                    sincos_poly(sm.th0[p] + (float)(x & ((1u << a) - 1u)) * sm.gam[p], sn, cs);
                    sm.k[j][p] = rho * cs;
                    sm.k[j][p + H2] = rho * sn;
                }
                const int vb = TD.v_bits, ng = D / TD.v_group, row_bytes = D * vb / 8;
                const unsigned char *vc = page_at(TD.v_codes, pid, TD.stride) + (long long)t0 * row_bytes;
                const __half *vmn = page_at(TD.v_min, pid, TD.stride) + (long long)t0 * ng;
                const __half *vsc = page_at(TD.v_scale, pid, TD.stride) + (long long)t0 * ng;
                for (int i = tid; i < n * D; i += NT) {
                    const int j = i / D, d = i % D, b = d * vb;
                    const unsigned code = (vc[j * row_bytes + (b >> 3)] >> (b & 7)) & ((1u << vb) - 1u);
                    const int gi = j * ng + d / TD.v_group;
                    sm.v[j][d] = (float)code * __half2float(vsc[gi]) + __half2float(vmn[gi]);
                }
            }
            if (tid < n) sm.kp[tid] = ppos[t0 + tid];
            __syncthreads();
            // ---- scores of the tile, causal by position
            for (int i = tid; i < R * KT; i += NT) {
                const int r = i / KT, j = i % KT;
                float x = neg_inf();
                if (j < n && sm.kp[j] <= sm.qp[r]) {
                    float a = 0.f;
#pragma unroll 8
                    for (int c = 0; c < D; c++) {
                        const int d = (c + j) & (D - 1);
                        a += sm.q[r][d] * sm.k[j][d];
                    }
                    x = a * scale;
                }
                sm.s[r][j] = x;
            }
            __syncthreads();
            // ---- online softmax, one thread per row: s <- exp(s - m_new), corr = exp(m_old - m_new)
            if (tid < R) {
                const int r = tid;
                float mx = neg_inf();
                for (int j = 0; j < n; j++) mx = fmaxf(mx, sm.s[r][j]);
                const float m_old = sm.m[r], m_new = fmaxf(m_old, mx);
                float c = 1.f, sum = 0.f;
                if (m_new == neg_inf()) {  // nothing visible yet
                    for (int j = 0; j < KT; j++) sm.s[r][j] = 0.f;
                } else {
                    c = m_old == neg_inf() ? 0.f : __expf(m_old - m_new);
                    for (int j = 0; j < KT; j++) {
                        const float p = j < n ? __expf(sm.s[r][j] - m_new) : 0.f;
                        sm.s[r][j] = p;
                        sum += p;
                    }
                }
                sm.corr[r] = c;
                sm.l[r] = sm.l[r] * c + sum;
                sm.m[r] = m_new;
            }
            __syncthreads();
            // ---- acc = acc * corr + P V
#pragma unroll
            for (int k = 0; k < PER; k++) {
                const int i = tid + k * NT, r = i / D, d = i % D;
                float a = acc[k] * sm.corr[r];
                for (int j = 0; j < n; j++) a += sm.s[r][j] * sm.v[j][d];
                acc[k] = a;
            }
            __syncthreads();
        }
    }
#pragma unroll
    for (int k = 0; k < PER; k++) {
        const int i = tid + k * NT, r = i / D, d = i % D;
        const long long row = row0 + r;
        if (row < rows) {
            const float l = sm.l[r];
            const long long t = row / G;
            out[(t * nq + h * G + row % G) * D + d] = l > 0.f ? acc[k] / l : 0.f;
        }
    }
}
