/* dense_decode.cu: one decode step (one query token) of paged attention over dense float16 pages, one layer.
 *
 * Twin: skvrt/kv/attention.py gather_dense + attend_dense (kernels_c/attention_dense.c on the CPU); launched
 * by skvrt/cuda/attention.py dense_decode; parity: tests/test_cuda_emu_attention.py. Shapes, the split-K scheme
 * and the work split: decode_common.cuh; kernel 2 is decode_combine (decode_combine.cuh).
 *
 * dense_decode_partial: grid (S, H), block (NT,) = (128,); block (s, h) folds table entries
 * [s * pages_per_split, min((s + 1) * pages_per_split, n_pages[h])) of KV head h.
 *   q         (H * G, D)          float32   post-RoPE queries; query head j reads KV head j / G
 *   k, v      (N, P, D)           float16   page pid at k + pid * stride bytes (rows contiguous, 16-byte aligned)
 *   stride    bytes between pages (a multiple of 16)
 *   fill      (N,)                int32     valid slots per page
 *   page_ids  (H, max_pages)      int32     this layer's table (dense pages only)
 *   n_pages   (H,)                int32
 *   part_acc  (H, S, G, D)        float32   out: unnormalised partial outputs
 *   part_ml   (H, S, G, 2)        float32   out: partial (max logit, sum of exp)
 *   slot_w    (H, max_pages, G, P) float32  out, or null (no mass): each slot's exp(logit - m_page)
 *   page_m    (H, max_pages, G)   float32   out, or null: the running max after each page
 * Shared memory: static only, (G D + G P + 3 G) floats (+ NGRP D when G < NGRP).
 */
#include "decode_common.cuh"
#include "decode_combine.cuh"

extern "C" __global__ void __launch_bounds__(dec::NT, dec::MIN_BLOCKS)
dense_decode_partial(const float *__restrict__ q, const __half *__restrict__ k, const __half *__restrict__ v,
                     long long stride, const int *__restrict__ fill, const int *__restrict__ page_ids,
                     const int *__restrict__ n_pages, int max_pages, int pages_per_split, float scale,
                     float *__restrict__ part_acc, float *__restrict__ part_ml, float *__restrict__ slot_w,
                     float *__restrict__ page_m)
{
    using namespace dec;
    __shared__ BlockState st;
    const int s = blockIdx.x, h = blockIdx.y, S = gridDim.x;
    const ValueRole vr = value_role();
    block_init(st, q, h);
    float acc[GPT][8];
#pragma unroll
    for (int i = 0; i < GPT; i++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[i][j] = 0.f;

    const int p1 = min((s + 1) * pages_per_split, n_pages[h]);
    for (int pi = s * pages_per_split; pi < p1; pi++) {
        const long long e = (long long)h * max_pages + pi;
        const int pid = page_ids[e], f = fill[pid];
        if (f <= 0) continue;
        dense_page(st, vr, page_at(k, pid, stride), page_at(v, pid, stride), f, scale, acc,
                   slot_w ? slot_w + e * G * P : nullptr, page_m ? page_m + e * G : nullptr);
    }
    write_partial(st, vr, acc, part_acc + ((long long)h * S + s) * G * D, part_ml + ((long long)h * S + s) * G * 2);
}
