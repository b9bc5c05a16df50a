/* dense_append.cu: write T new tokens' keys and values (float32 -> float16) and positions into the dense
 * pages of the frame arena, at page ids / slots the host allocated (skvrt/cuda/kv_write.py
 * plan_dense_append, which mirrors PagedKVCache.append's page allocation), and raise each page's fill.
 *
 * Twin: skvrt/kv/cache.py PagedKVCache.append (DenseTier.write + positions + fill); launched by
 * skvrt/cuda/kv_write.py dense_append; parity: tests/test_cuda_emu_ops.py, byte for byte (float16
 * conversion rounds to nearest even on both sides).
 *
 * dense_append: grid (T, H), block (NT,) = (128,); block (t, h) writes token t of KV head h.
 *   k, v       float32   element (h, t, d) at k[h * h_stride + t * t_stride + d] (post-RoPE keys; the model's
 *                        (H, T, D) arrays or views of the q|k|v projection)
 *   h_stride, t_stride   long long, in elements
 *   page_ids   (H, T)    int32     page (= frame) of each new token
 *   slots      (H, T)    int32     its slot in that page, < P
 *   k_pages, v_pages     float16   the dense pool's k, v fields: (N, P, D), page pid at + pid * stride bytes
 *   pos_pages  int32     the pool's positions field (N, P), same page stride
 *   fill       (N,)      int32     the arena's fill: fill[pid] = max(fill[pid], slot + 1)
 *   stride     long long bytes between pages (the arena's frame size)
 *   positions  (T,)      int32     position of each token, or null: token t is at pos0 + t (a device array lets
 *                                  a captured CUDA graph take a new position at every replay)
 *   pos0       int       position of token 0 when `positions` is null
 *   head_dim   int       D
 *   T          int       tokens (the (H, T) tables' row length)
 */
#include <cuda_fp16.h>

extern "C" __global__ void __launch_bounds__(128)
dense_append(const float *__restrict__ k, const float *__restrict__ v, long long h_stride, long long t_stride,
             const int *__restrict__ page_ids, const int *__restrict__ slots, __half *__restrict__ k_pages,
             __half *__restrict__ v_pages, int *__restrict__ pos_pages, int *__restrict__ fill, long long stride,
             const int *__restrict__ positions, int pos0, int head_dim, int T)
{
    const int t = blockIdx.x, h = blockIdx.y;
    const int pid = page_ids[h * T + t], slot = slots[h * T + t];
    const long long src = h * h_stride + t * t_stride;
    const long long dst = (long long)slot * head_dim;  // elements into the page
    __half *kp = reinterpret_cast<__half *>(reinterpret_cast<char *>(k_pages) + pid * stride) + dst;
    __half *vp = reinterpret_cast<__half *>(reinterpret_cast<char *>(v_pages) + pid * stride) + dst;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        kp[d] = __float2half(k[src + d]);
        vp[d] = __float2half(v[src + d]);
    }
    if (threadIdx.x == 0) {
        int *pp = reinterpret_cast<int *>(reinterpret_cast<char *>(pos_pages) + pid * stride);
        pp[slot] = positions ? positions[t] : pos0 + t;
        atomicMax(fill + pid, slot + 1);
    }
}
