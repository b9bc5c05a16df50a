/* decode_common.cuh: what the decode-attention kernels share (dense_decode.cu, ada_decode.cu): compile-time
 * shapes, the tier descriptor, the block's softmax state, the dense-page fold, and the split-K scheme (its combine kernel: decode_combine.cuh).
 *
 * Compile-time shapes, passed by the loader as -D options (one module per combination):
 *   HEAD_DIM   D   64, 128 or 256
 *   GQA        G   query heads per KV head, 1..16 (query head j reads KV head j / G)
 *   MAX_PAGE   P   the most tokens a page of any tier holds, 16..256 (tiers differ: skvrt/kv/pool.py)
 * Page-table contract (skvrt/kv/pages.py), one layer, H KV heads:
 *   page_ids (H, max_pages) int32: page id (= frame id of the arena); page_tiers (H, max_pages) int8: index
 *   into the tier descriptors; n_pages (H,) int32: entries [0, n_pages) are valid; fill (N,) int32: the
 *   arena's fill per frame, slots at or past fill are never read.
 * Storage (skvrt/kv/pool.py): every field of a tier's page lives at `field + pid * stride` bytes.
 *
 * Split-K ("flash decoding"). Kernel 1, grid (S, H), block NT: block (s, h) folds the table entries
 * [s * pps, min((s + 1) * pps, n_pages[h])) of KV head h, page by page, into a partial (m, l, acc) per query
 * head of the group (online softmax: m running max logit, l = sum exp(logit - m), acc = sum exp(logit - m) v).
 * When attention mass is asked for, it also keeps every slot's weight exp(logit - m_page) and the running max
 * m_page after the page. Kernel 2 (decode_combine), grid (H,), block NT: merges the S partials with a
 * log-sum-exp reduce and turns the kept weights into softmax probabilities (attention mass).
 * Buffers between the two (float32):
 *   part_acc (H, S, G, D), part_ml (H, S, G, 2) (m, l), slot_w (H, max_pages, G, P), page_m (H, max_pages, G).
 *
 * Work split inside a block, per page of f <= P tokens:
 *   logits   PARTS adjacent threads per token, each takes 1/PARTS of the dot product (dense: a D / PARTS
 *            slice; ADA: (D/2) / PARTS RoPE pairs); partial sums meet through __shfl_xor_sync.
 *   softmax  warp w folds query heads g = w, w + NW, ...
 *   values   thread = (8-dim chunk c, query-head lane gsub, token slice ts): accumulates dims [8c, 8c + 8) of
 *            query heads gsub, gsub + GG, ... over tokens ts, ts + TS, ...; the TS slices meet at the end.
 */
#include <cuda_fp16.h>

#if !defined(HEAD_DIM) || !defined(GQA) || !defined(MAX_PAGE)
#error "define HEAD_DIM, GQA and MAX_PAGE (skvrt/cuda/attention.py passes them as -D options)"
#endif
#if HEAD_DIM != 64 && HEAD_DIM != 128 && HEAD_DIM != 256
#error "HEAD_DIM must be 64, 128 or 256"
#endif
#if GQA < 1 || GQA > 16
#error "GQA must be in 1..16"
#endif
#if MAX_PAGE < 16 || MAX_PAGE > 256
#error "MAX_PAGE must be in 16..256"
#endif

namespace dec {

constexpr int D = HEAD_DIM, G = GQA, P = MAX_PAGE, H2 = D / 2;
constexpr int NT = 128, NW = NT / 32;  // threads and warps per block
constexpr int MIN_BLOCKS = G > 8 ? 1 : 4;  // launch bounds: <= 128 registers, except for the largest groups
constexpr unsigned FULL = 0xffffffffu;
constexpr int PARTS = P > NT / 2 ? 1 : P > NT / 4 ? 2 : P > NT / 8 ? 4 : 8;  // threads per token for logits
constexpr int TPP = NT / PARTS;                                  // tokens per logit pass
constexpr int DS = D / PARTS;                                    // dense: dims per part (multiple of 8)
constexpr int VCH = D / 8, NGRP = NT / VCH;                      // value chunks per row, thread groups
constexpr int GG = G < NGRP ? G : NGRP, TS = NGRP / GG, GPT = (G + GG - 1) / GG;
constexpr int COMBINE_CH = 32;                                   // splits per combine round

/* One tier of the arena (mirrored by skvrt/cuda/attention.py TIER_DESC and kernels_c's skvrt_tier): kind,
 * tokens per page, the byte stride between pages, and per field the address of page 0's copy. */
struct TierDesc {
    int kind;                          // KIND_DENSE (float16 k, v) or KIND_ADA
    int page_size;                     // tokens per page of this tier, <= P
    long long stride;                  // bytes from page p to page p + 1 in every field
    const __half *k, *v;               // dense: (page_size, D) float16 per page
    const unsigned char *codes;        // ADA: (page_size, key_bytes) uint8
    const __half *frame;               // ADA: (D/2, 4) float16: theta0, gamma, rho0, drho per pair
    const unsigned char *v_codes;      // ADA: (page_size, D * v_bits / 8) uint8
    const __half *v_min, *v_scale;     // ADA: (page_size, D / v_group) float16
    __half *mass;                      // (page_size,) float16 per page or null: += the slot's attention mass,
                                       // rounded stochastically with seed mass_seed (mass_add below)
    const unsigned char *angle_bits;   // ADA: (H, D/2) uint8, this layer's ba
    const unsigned char *radius_bits;  // ADA: (H, D/2) uint8, this layer's br
    int key_bytes, v_bits, v_group;
    unsigned mass_seed;                // the observing query's position (slot mass rounding)
};

/* Slot mass: float16 sums updated with stochastic rounding -- twin skvrt/kv/slot_mass.py, C kernels_c/slot_mass.h
 * (the rule is written there). old + x in float32, rounded to one of its float16 neighbours by 13 hashed bits. */
__device__ __forceinline__ unsigned mass_hash(unsigned x)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    return x ^ (x >> 16);
}
__device__ __forceinline__ __half mass_add(__half old, float x, int pid, int slot, unsigned seed)
{
    const float y = __half2float(old) + x;
    if (!(y < 65504.f)) return __ushort_as_half(0x7bff);
    const unsigned r = mass_hash((unsigned)pid * 256U + (unsigned)slot + seed * 0x9E3779B9U) >> 19;
    if (y >= 6.103515625e-05f) {  // 2^-14: float16 normals
        unsigned b = __float_as_uint(y);
        b = (b & ~0x1fffU) + ((b & 0x1fffU) > r ? 0x2000U : 0U);
        if (!(__uint_as_float(b) < 65504.f)) return __ushort_as_half(0x7bff);
        return __ushort_as_half((unsigned short)(((((b >> 23) & 0xffU) - 112U) << 10) | ((b >> 13) & 0x3ffU)));
    }
    const float q = y * 16777216.f, n = floorf(q);  // 2^24: float16 subnormal steps
    const unsigned frac = (unsigned)floorf((q - n) * 8192.f);
    return __ushort_as_half((unsigned short)((unsigned)n + (frac > r ? 1U : 0U)));
}
constexpr int KIND_DENSE = 0, KIND_ADA = 2;  // kernels_c's kinds (1, dense float32, has no GPU kernel)

template <typename T> __device__ __forceinline__ const T *page_at(const T *field, int pid, long long stride)
{
    return reinterpret_cast<const T *>(reinterpret_cast<const char *>(field) + pid * stride);
}
template <typename T> __device__ __forceinline__ T *page_at(T *field, int pid, long long stride)
{
    return reinterpret_cast<T *>(reinterpret_cast<char *>(field) + pid * stride);
}

/* Shared with ada_decode.cu and prefill_attention.cu (ADA pages). */
// sin and cos of x: x = k pi/2 + r, |r| <= pi/4 (pi/2 in three parts), Taylor to r^9 / r^10
__device__ __forceinline__ void sincos_poly(float x, float &s, float &c)
{
    const float k = rintf(x * 0.63661977236758134f);
    float r = x - k * 1.5703125f;
    r -= k * 4.837512969970703125e-4f;
    r -= k * 7.54978995489188216e-8f;
    const float z = r * r;
    const float sr = r + r * z * (-1.f / 6 + z * (1.f / 120 + z * (-1.f / 5040 + z * (1.f / 362880))));
    const float cr = 1.f + z * (-0.5f + z * (1.f / 24 + z * (-1.f / 720 + z * (1.f / 40320 + z * (-1.f / 3628800)))));
    const int qd = (int)k & 3;
    s = qd == 0 ? sr : qd == 1 ? cr : qd == 2 ? -sr : -cr;
    c = qd == 0 ? cr : qd == 1 ? -sr : qd == 2 ? -cr : sr;
}

// w <= 24 bits at bit offset o of a code row (only the bytes holding the field are read)
__device__ __forceinline__ unsigned field(const unsigned char *row, int o, int w)
{
    if (w == 0) return 0u;
    const int b0 = o >> 3, b1 = (o + w - 1) >> 3;
    unsigned v = 0u;
    for (int b = b1; b >= b0; b--) v = (v << 8) | row[b];
    return (v >> (o & 7)) & ((1u << w) - 1u);
}

struct BlockState {
    float q[G][D];                      // the group's queries
    float s[G][P];                      // the page's logits, then exp(logit - m)
    float m[G], l[G], corr[G];          // running max, running sum, this page's rescale of acc
    float red[TS > 1 ? NGRP : 1][D];    // token-slice partials meeting at the end of a split
};

struct ValueRole {
    int chunk, gsub, ts;
    bool on;
};

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_max(float x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
    return x;
}

__device__ __forceinline__ float half_lo(unsigned w) { return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu))); }
__device__ __forceinline__ float half_hi(unsigned w) { return __half2float(__ushort_as_half((unsigned short)(w >> 16))); }

// 8 consecutive float16 at p (16-byte aligned) -> x[0..8)
__device__ __forceinline__ void load_half8(const __half *p, float (&x)[8])
{
    const uint4 r = *reinterpret_cast<const uint4 *>(p);
    x[0] = half_lo(r.x); x[1] = half_hi(r.x); x[2] = half_lo(r.y); x[3] = half_hi(r.y);
    x[4] = half_lo(r.z); x[5] = half_hi(r.z); x[6] = half_lo(r.w); x[7] = half_hi(r.w);
}

__device__ __forceinline__ ValueRole value_role()
{
    const int t = threadIdx.x, grp = t / VCH;
    return {t % VCH, grp % GG, grp / GG, grp / GG < TS};
}

// queries of KV head h into shared memory; empty softmax state. q (H * G, D) float32.
__device__ __forceinline__ void block_init(BlockState &st, const float *__restrict__ q, int h)
{
    for (int i = threadIdx.x; i < G * D; i += NT) st.q[i / D][i % D] = q[(long long)h * G * D + i];
    if (threadIdx.x < G) {
        st.m[threadIdx.x] = neg_inf();
        st.l[threadIdx.x] = 0.f;
    }
    __syncthreads();
}

// sum the PARTS partial logits of each token (adjacent lanes) and store scale * logit in st.s[g][t]
__device__ __forceinline__ void store_logits(BlockState &st, float (&a)[G], int t, int f, float scale)
{
#pragma unroll
    for (int o = PARTS / 2; o > 0; o >>= 1)
#pragma unroll
        for (int g = 0; g < G; g++) a[g] += __shfl_xor_sync(FULL, a[g], o);
    if (t < f && threadIdx.x % PARTS == 0)
#pragma unroll
        for (int g = 0; g < G; g++) st.s[g][t] = a[g] * scale;
}

// online softmax over st.s[g][0, f): st.s becomes exp(s - m_new)
__device__ __forceinline__ void softmax_fold(BlockState &st, int f)
{
    const int lane = threadIdx.x & 31;
    for (int g = threadIdx.x >> 5; g < G; g += NW) {
        float pm = neg_inf();
        for (int t = lane; t < f; t += 32) pm = fmaxf(pm, st.s[g][t]);
        pm = warp_max(pm);
        const float m_old = st.m[g], m_new = fmaxf(m_old, pm);
        float sum = 0.f;
        for (int t = lane; t < f; t += 32) {
            const float e = __expf(st.s[g][t] - m_new);
            st.s[g][t] = e;
            sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            const float c = __expf(m_old - m_new);
            st.corr[g] = c;
            st.l[g] = st.l[g] * c + sum;
            st.m[g] = m_new;
        }
    }
}

// after the fold: the page's weights exp(s - m_new) into w (G, P) and m_new into wm (G,), for the mass
__device__ __forceinline__ void save_weights(const BlockState &st, int f, float *__restrict__ w, float *__restrict__ wm)
{
    for (int i = threadIdx.x; i < G * f; i += NT) w[i / f * P + i % f] = st.s[i / f][i % f];
    if (threadIdx.x < G) wm[threadIdx.x] = st.m[threadIdx.x];
}

// acc *= this page's rescale, before adding the page's values
__device__ __forceinline__ void rescale(const BlockState &st, const ValueRole &vr, float (&acc)[GPT][8])
{
#pragma unroll
    for (int k = 0; k < GPT; k++) {
        const int g = vr.gsub + k * GG;
        const float c = g < G ? st.corr[g] : 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) acc[k][j] *= c;
    }
}

// acc[k] += st.s[g_k][t] * v for one token's 8-dim value chunk v
__device__ __forceinline__ void add_value(const BlockState &st, const ValueRole &vr, int t, const float (&v)[8],
                                          float (&acc)[GPT][8])
{
#pragma unroll
    for (int k = 0; k < GPT; k++) {
        const int g = vr.gsub + k * GG;
        if (g < G) {
            const float p = st.s[g][t];
#pragma unroll
            for (int j = 0; j < 8; j++) acc[k][j] += p * v[j];
        }
    }
}

// one dense page of f >= 1 tokens: kp, vp (f, D) float16 of the page; w (G, P), wm (G,) or null
__device__ __forceinline__ void dense_page(BlockState &st, const ValueRole &vr, const __half *__restrict__ kp,
                           const __half *__restrict__ vp, int f, float scale, float (&acc)[GPT][8],
                           float *__restrict__ w, float *__restrict__ wm)
{
    const int part = threadIdx.x % PARTS, d0 = part * DS;
    for (int t0 = 0; t0 < f; t0 += TPP) {
        const int t = t0 + threadIdx.x / PARTS;
        float a[G];
#pragma unroll
        for (int g = 0; g < G; g++) a[g] = 0.f;
        if (t < f) {
            const __half *kr = kp + (long long)t * D + d0;
#pragma unroll 4
            for (int c = 0; c < DS; c += 8) {
                float k8[8];
                load_half8(kr + c, k8);
#pragma unroll
                for (int j = 0; j < 8; j++)
#pragma unroll
                    for (int g = 0; g < G; g++) a[g] += st.q[g][d0 + c + j] * k8[j];
            }
        }
        store_logits(st, a, t, f, scale);
    }
    __syncthreads();
    softmax_fold(st, f);
    __syncthreads();
    if (w) save_weights(st, f, w, wm);
    if (vr.on) {
        rescale(st, vr, acc);
        for (int t = vr.ts; t < f; t += TS) {
            float v8[8];
            load_half8(vp + (long long)t * D + vr.chunk * 8, v8);
            add_value(st, vr, t, v8, acc);
        }
    }
    __syncthreads();
}

// the split's partial: acc_out (G, D), ml_out (G, 2) of part_acc / part_ml
__device__ __forceinline__ void write_partial(BlockState &st, const ValueRole &vr, float (&acc)[GPT][8], float *__restrict__ acc_out,
                              float *__restrict__ ml_out)
{
    if (TS > 1) {  // then GPT == 1: sum the token slices
        if (vr.on)
#pragma unroll
            for (int j = 0; j < 8; j++) st.red[vr.ts * GG + vr.gsub][vr.chunk * 8 + j] = acc[0][j];
        __syncthreads();
        if (vr.on && vr.ts == 0)
            for (int s = 1; s < TS; s++)
#pragma unroll
                for (int j = 0; j < 8; j++) acc[0][j] += st.red[s * GG + vr.gsub][vr.chunk * 8 + j];
    }
    if (vr.on && vr.ts == 0)
#pragma unroll
        for (int k = 0; k < GPT; k++) {
            const int g = vr.gsub + k * GG;
            if (g < G) {
                float4 *o = reinterpret_cast<float4 *>(acc_out + g * D + vr.chunk * 8);
                o[0] = make_float4(acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
                o[1] = make_float4(acc[k][4], acc[k][5], acc[k][6], acc[k][7]);
            }
        }
    if (threadIdx.x < G) {
        ml_out[2 * threadIdx.x] = st.m[threadIdx.x];
        ml_out[2 * threadIdx.x + 1] = st.l[threadIdx.x];
    }
}

}  // namespace dec
