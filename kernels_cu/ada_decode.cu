/* ada_decode.cu: one decode step of paged attention over pages of mixed tiers, one layer: tier 0 dense float16
 * pages, tiers t >= 1 ADA pages (keys as page-local polar codes per RoPE pair, logits from the codes).
 *
 * Twin: skvrt/kv/cache.py `_scores` + skvrt/kv/attention.py `softmax_attend` (ADA pages: skvrt/kv/ada.py
 * AdaTier.scores / read_values; format: docs/FORMAT.md), the same math as kernels_c/attention_ada.c;
 * launched by skvrt/cuda/attention.py ada_decode; parity: tests/test_cuda_emu_attention.py.
 * Shapes, split-K scheme and work split: decode_common.cuh. Kernel 2 is decode_combine (decode_combine.cuh).
 *
 * ADA math, per page and query head, for RoPE pair i (dims i, i + D/2) with field widths (ba_i, br_i), frame
 * (theta0_i, gamma_i, rho0_i, drho_i) and a token's codes (a_i, r_i):
 *   LUT_i[a] = q_i cos(theta0_i + a gamma_i) + q_{i+D/2} sin(theta0_i + a gamma_i),   a < 2^ba_i
 *   logit    = scale * sum_i (rho0_i + r_i drho_i) LUT_i[a_i]
 * A token's codes are a little-endian bit stream of fields (a_0, r_0, a_1, r_1, ...); values are per-token
 * groups of vg dims, v = code * v_scale + v_min, codes of vb bits packed little-endian within bytes.
 * Pages are tier-homogeneous, so the tier switch is per page (uniform across the block). The field layout
 * (bit and LUT offsets of each pair) of the current (tier, head) is rebuilt in shared memory when the tier
 * changes; the page's LUT for the G query heads is built in shared memory, one sincos per entry shared by
 * the G heads (Cody-Waite reduction + Taylor series, |err| ~1e-7, no local memory).
 *
 * ada_decode_partial: grid (S, H), block (NT,) = (128,); block (s, h) folds table entries
 * [s * pages_per_split, min((s + 1) * pages_per_split, n_pages[h])) of KV head h.
 *   q          (H * G, D)        float32   post-RoPE queries; query head j reads KV head j / G
 *   tiers      (n_tiers,)        TierDesc  decode_common.cuh; dense float16 or ADA (its fields: FORMAT.md)
 *   fill       (N,)              int32     the arena's fill per frame
 *   page_ids   (H, max_pages)    int32     page id (frame) of each table entry
 *   page_tiers (H, max_pages)    int8      index into tiers
 *   n_pages    (H,)              int32
 *   lut_len    E                 max over ADA tiers and heads of sum_i 2^ba_i (LUT entries)
 *   kb_max     max key_bytes over the ADA tiers
 *   part_acc, part_ml, slot_w, page_m   as in dense_decode.cu
 * Dynamic shared memory: G E floats (LUT) + P kb_max bytes (the page's codes) + E bytes (pair of each LUT
 * entry), rounded up to 16 bytes (skvrt/cuda/attention.py ada_smem_bytes).
 */
#include "decode_common.cuh"
#include "decode_combine.cuh"

namespace ada {
using namespace dec;

struct Plan {                          // field layout of the current (tier, head), and the current page's frame
    int bit[H2];                       // bit offset of a_i in a token's code row
    int off[H2];                       // LUT offset of pair i (2^ba_i entries)
    unsigned char ba[H2], br[H2];
    float th0[H2], gam[H2], rho0[H2], drho[H2];
    int entries;                       // LUT entries of the head: sum_i 2^ba_i
};

// field layout of head h in tier T (warp 0 scans the widths), then the pair of every LUT entry
__device__ __forceinline__ void build_plan(Plan &pl, const TierDesc &T, int h, unsigned char *__restrict__ epair)
{
    constexpr int PPL = H2 / 32;  // pairs per lane
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        const unsigned char *ab = T.angle_bits + h * H2, *rb = T.radius_bits + h * H2;
        int nb = 0, ne = 0;
#pragma unroll
        for (int j = 0; j < PPL; j++) {
            nb += ab[lane * PPL + j] + rb[lane * PPL + j];
            ne += 1 << ab[lane * PPL + j];
        }
        int sb = nb, se = ne;  // inclusive scan over lanes
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int xb = __shfl_up_sync(FULL, sb, o), xe = __shfl_up_sync(FULL, se, o);
            if (lane >= o) {
                sb += xb;
                se += xe;
            }
        }
        if (lane == 31) pl.entries = se;
        sb -= nb;
        se -= ne;
#pragma unroll
        for (int j = 0; j < PPL; j++) {
            const int i = lane * PPL + j, a = ab[i], r = rb[i];
            pl.bit[i] = sb;
            pl.off[i] = se;
            pl.ba[i] = (unsigned char)a;
            pl.br[i] = (unsigned char)r;
            sb += a + r;
            se += 1 << a;
        }
    }
    __syncthreads();
    // read after the barrier that follows the page's frame and code loads (ada_page)
    for (int i = threadIdx.x; i < H2; i += NT)
        for (int e = 0; e < (1 << pl.ba[i]); e++) epair[pl.off[i] + e] = (unsigned char)i;
}

// one ADA page of f >= 1 tokens (page id pid of tier T); lut (G, lut_len) floats, codes_s (P * kb_max) bytes;
// w (G, P), wm (G,) or null
__device__ __forceinline__ void ada_page(BlockState &st, const ValueRole &vr, Plan &pl, const TierDesc &T, int pid,
                                         int f, float scale, float *__restrict__ lut, int lut_len,
                                         unsigned char *__restrict__ codes_s, const unsigned char *__restrict__ epair,
                                         float (&acc)[GPT][8], float *__restrict__ w, float *__restrict__ wm)
{
    const int KB = T.key_bytes;
    // the page's frame and the codes of its f tokens (bytes past f * KB are not read)
    const uint2 *fr = reinterpret_cast<const uint2 *>(page_at(T.frame, pid, T.stride));
    for (int i = threadIdx.x; i < H2; i += NT) {
        const uint2 w = fr[i];
        pl.th0[i] = half_lo(w.x);
        pl.gam[i] = half_hi(w.x);
        pl.rho0[i] = half_lo(w.y);
        pl.drho[i] = half_hi(w.y);
    }
    const unsigned char *cp = page_at(T.codes, pid, T.stride);
    const int nbytes = f * KB;
    for (int w = threadIdx.x; 4 * w < nbytes; w += NT) {
        if (4 * w + 4 <= nbytes)
            reinterpret_cast<unsigned *>(codes_s)[w] = reinterpret_cast<const unsigned *>(cp)[w];
        else
            for (int b = 4 * w; b < nbytes; b++) codes_s[b] = cp[b];
    }
    __syncthreads();
    // LUT: one entry per thread and step, all G heads
    for (int e = threadIdx.x; e < pl.entries; e += NT) {
        const int i = epair[e];
        float sn, cs;
        sincos_poly(pl.th0[i] + (float)(e - pl.off[i]) * pl.gam[i], sn, cs);
#pragma unroll
        for (int g = 0; g < G; g++) lut[g * lut_len + e] = st.q[g][i] * cs + st.q[g][i + H2] * sn;
    }
    __syncthreads();
    // logits: PARTS threads per token, (D/2) / PARTS pairs each
    constexpr int PPP = H2 / PARTS;
    const int i0 = (threadIdx.x % PARTS) * PPP;
    for (int t0 = 0; t0 < f; t0 += TPP) {
        const int t = t0 + threadIdx.x / PARTS;
        float a[G];
#pragma unroll
        for (int g = 0; g < G; g++) a[g] = 0.f;
        if (t < f) {
            const unsigned char *row = codes_s + t * KB;
            for (int i = i0; i < i0 + PPP; i++) {
                const int ba = pl.ba[i];
                const unsigned x = field(row, pl.bit[i], ba + pl.br[i]);
                const float rho = pl.rho0[i] + (float)(x >> ba) * pl.drho[i];
                const float *li = lut + pl.off[i] + (x & ((1u << ba) - 1u));
#pragma unroll
                for (int g = 0; g < G; g++) a[g] += rho * li[g * lut_len];
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
        const int vb = T.v_bits, ng = D / T.v_group, row_bytes = D * vb / 8, grp = vr.chunk * 8 / T.v_group;
        const unsigned char *vc = page_at(T.v_codes, pid, T.stride) + vr.chunk * vb;
        const __half *vmn = page_at(T.v_min, pid, T.stride) + grp, *vsc = page_at(T.v_scale, pid, T.stride) + grp;
        for (int t = vr.ts; t < f; t += TS) {
            const unsigned char *c = vc + t * row_bytes;  // 8 codes of vb bits: vb bytes
            unsigned lo, hi = 0u;
            if (vb == 8) {
                const uint2 w = *reinterpret_cast<const uint2 *>(c);
                lo = w.x;
                hi = w.y;
            } else if (vb == 4) {
                lo = *reinterpret_cast<const unsigned *>(c);
            } else {
                lo = *reinterpret_cast<const unsigned short *>(c);
            }
            const float sc = __half2float(vsc[t * ng]), mn = __half2float(vmn[t * ng]);
            const unsigned mask = (1u << vb) - 1u;
            float v8[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int b = j * vb;  // bit of code j in the 64-bit word (hi:lo)
                const unsigned code = (b < 32 ? lo >> b : hi >> (b - 32)) & mask;
                v8[j] = (float)code * sc + mn;
            }
            add_value(st, vr, t, v8, acc);
        }
    }
    __syncthreads();
}

}  // namespace ada

extern "C" __global__ void __launch_bounds__(dec::NT, dec::MIN_BLOCKS)
ada_decode_partial(const float *__restrict__ q, const dec::TierDesc *__restrict__ tiers, const int *__restrict__ fill,
                   const int *__restrict__ page_ids, const signed char *__restrict__ page_tiers,
                   const int *__restrict__ n_pages, int max_pages, int pages_per_split, float scale, int lut_len,
                   int kb_max, float *__restrict__ part_acc, float *__restrict__ part_ml, float *__restrict__ slot_w,
                   float *__restrict__ page_m)
{
    using namespace dec;
    __shared__ BlockState st;
    __shared__ ada::Plan pl;
    extern __shared__ float ada_smem[];
    float *lut = ada_smem;                                                               // (G, lut_len)
    unsigned char *codes_s = reinterpret_cast<unsigned char *>(ada_smem + G * lut_len);  // (P, kb_max)
    unsigned char *epair = codes_s + P * kb_max;                                         // (lut_len,)

    const int s = blockIdx.x, h = blockIdx.y, S = gridDim.x;
    const ValueRole vr = value_role();
    block_init(st, q, h);
    float acc[GPT][8];
#pragma unroll
    for (int i = 0; i < GPT; i++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[i][j] = 0.f;

    int plan_tier = -1;  // the ADA tier whose field layout `pl` holds
    const int p1 = min((s + 1) * pages_per_split, n_pages[h]);
    for (int pi = s * pages_per_split; pi < p1; pi++) {
        const long long e = (long long)h * max_pages + pi;
        const int pid = page_ids[e], tier = page_tiers[e], f = fill[pid];
        if (f <= 0) continue;
        const TierDesc &T = tiers[tier];
        float *w = slot_w ? slot_w + e * G * P : nullptr, *wm = page_m ? page_m + e * G : nullptr;
        if (T.kind == KIND_DENSE) {
            dense_page(st, vr, page_at(T.k, pid, T.stride), page_at(T.v, pid, T.stride), f, scale, acc, w, wm);
            continue;
        }
        if (tier != plan_tier) {
            ada::build_plan(pl, T, h, epair);
            plan_tier = tier;
        }
        ada::ada_page(st, vr, pl, T, pid, f, scale, lut, lut_len, codes_s, epair, acc, w, wm);
    }
    write_partial(st, vr, acc, part_acc + ((long long)h * S + s) * G * D, part_ml + ((long long)h * S + s) * G * 2);
}
