/* ada_encode.cu: ADA encode-and-write of whole pages: the keys and values of n <= P tokens of one
 * (layer, kv head) -> the page-local frame, the key codes and the value codes, written straight into the
 * page's strided fields in the frame arena (format: docs/FORMAT.md, skvrt/kv/ada.py).
 *
 * Twin: skvrt/kv/ada.py AdaTier.write_page (frame fit, codes from the float16-rounded frame, bit packing)
 * and QuantTier.encode_values; launched by skvrt/cuda/kv_write.py ada_encode_pages; parity:
 * tests/test_cuda_emu_ops.py. Per RoPE pair i (dims i, i + D/2) with ba_i angle bits, br_i radius bits
 * (na = 2^ba, nr = 2^br), over the page's tokens (rho, phi = polar(k_i, k_{i+D/2})):
 *   mean   = atan2(sum y, sum x)                  the rho-weighted circular mean (sum of rho e^{i phi})
 *   off    = wrap(phi - mean) in (-pi, pi];  lo, hi = min, max
 *   theta0 = mean + lo (na > 1) or mean + (lo + hi) / 2;  gamma = (hi - lo) / (na - 1) or 0
 *   rho0   = min rho (nr > 1) or mean rho;  drho = (max - min) / (nr - 1) or 0
 *   stored as float16 (theta0 wrapped to (-pi, pi]); the codes use the stored (rounded) frame:
 *   a = clip(floor(mod(phi - theta0 + gamma / 2, 2 pi) / gamma), 0, na - 1) (0 if gamma = 0)
 *   r = clip(rint((rho - rho0) / drho), 0, nr - 1) (0 if drho = 0)
 * and a token's code row is the little-endian bit stream (a_0, r_0, a_1, r_1, ...), zero-padded to key_bytes.
 * Values: per token, groups of v_group dims: min -> float16, scale = (max - min) / (2^vb - 1) -> float16
 * (1 if not > 0), code = clip(rint((x - min) / scale), 0, 2^vb - 1), vb-bit codes packed little-endian
 * within bytes.
 * Numerics: the twin computes the key frame and codes in float64, this kernel in float32, so a frame value
 * can differ by one float16 step and a code by one where the twin sits on a boundary (the kernel also
 * multiplies by 1 / gamma and 1 / drho instead of dividing); the tests bound the
 * decoded keys (tests/test_cuda_emu_ops.py). The value codec is float32 in both and matches exactly.
 *
 * Two kernels (one would spill on sm_80), both grid (n_jobs,), block (NT,) = (128,); block j encodes job j:
 *   ada_encode_keys (k, jobs, angle_bits, radius_bits, codes, frame, stride, job_stride, head_dim, key_bytes)
 *   ada_encode_values (v, jobs, v_codes, v_min, v_scale, stride, job_stride, head_dim, v_bits, v_group)
 *   k, v        (n_jobs, P_src, D) float32   job j's tokens at rows 0..n_j of its slab; job_stride = P_src D
 *   jobs        (n_jobs, 3) int32            (page id, n tokens (1..P), kv head h)
 *   angle_bits, radius_bits (H, D/2) uint8   this layer's ba, br (ada.split_bits(pair_bits[layer]))
 *   codes       (N, P, key_bytes) uint8      the ADA pool's fields, page pid at + pid * stride bytes
 *   frame       (N, D/2, 4) float16          theta0, gamma, rho0, drho per pair
 *   v_codes     (N, P, D vb / 8) uint8
 *   v_min, v_scale (N, P, D / vg) float16
 *   stride      long long   bytes between pages
 *   job_stride  long long   elements between jobs in k, v
 *   head_dim    int         D <= 256;  key_bytes, v_bits (2, 4, 8), v_group (multiple of 8 dividing D) int
 * Shared memory: static, 6 (D/2) floats + D bytes (< 3.5 KiB). Only slots 0..n-1 of the page are written.
 */
#include <cuda_fp16.h>

namespace adae {
constexpr int NT = 128, H2MAX = 128;
constexpr float PI = 3.14159265358979323846f, TWO_PI = 6.28318530717958647692f;

__device__ __forceinline__ float wrap_pi(float d)  // d in (-3 pi, 3 pi) -> (-pi, pi]
{
    if (d > PI) d -= TWO_PI;
    else if (d <= -PI) d += TWO_PI;
    return d;
}

template <typename T> __device__ __forceinline__ T *page(T *field, int pid, long long stride)
{
    return reinterpret_cast<T *>(reinterpret_cast<char *>(field) + pid * stride);
}
}  // namespace adae

extern "C" __global__ void __launch_bounds__(adae::NT)
ada_encode_keys(const float *__restrict__ k, const int *__restrict__ jobs, const unsigned char *__restrict__ angle_bits,
                const unsigned char *__restrict__ radius_bits, unsigned char *__restrict__ codes,
                __half *__restrict__ frame, long long stride, long long job_stride, int head_dim, int key_bytes)
{
    using namespace adae;
    __shared__ float th0[H2MAX], gam[H2MAX], r0[H2MAX], dr[H2MAX], igam[H2MAX], idr[H2MAX];
    __shared__ unsigned char ba[H2MAX], br[H2MAX];
    const int j = blockIdx.x, tid = threadIdx.x, D = head_dim, h2 = D / 2;
    const int pid = jobs[3 * j], n = jobs[3 * j + 1], h = jobs[3 * j + 2];
    const float *kj = k + j * job_stride;

    // 1. the frame, one thread per pair, two passes over the page's tokens
    for (int i = tid; i < h2; i += NT) {
        const int a_bits = angle_bits[h * h2 + i], r_bits = radius_bits[h * h2 + i];
        ba[i] = (unsigned char)a_bits;
        br[i] = (unsigned char)r_bits;
        float sx = 0.f, sy = 0.f;
        for (int t = 0; t < n; t++) {
            sx += kj[t * D + i];
            sy += kj[t * D + i + h2];
        }
        const float mean = atan2f(sy, sx);
        float lo = 4.f, hi = -4.f, rlo = 3.4e38f, rhi = 0.f, rsum = 0.f;
        for (int t = 0; t < n; t++) {
            const float x = kj[t * D + i], y = kj[t * D + i + h2];
            const float off = wrap_pi(atan2f(y, x) - mean), rho = hypotf(x, y);
            lo = fminf(lo, off);
            hi = fmaxf(hi, off);
            rlo = fminf(rlo, rho);
            rhi = fmaxf(rhi, rho);
            rsum += rho;
        }
        const int na = 1 << a_bits, nr = 1 << r_bits;
        const float t0 = na > 1 ? mean + lo : mean + (lo + hi) / 2;
        const float g = na > 1 ? (hi - lo) / (float)(na - 1) : 0.f;
        const float q0 = nr > 1 ? rlo : rsum / (float)n;
        const float dq = nr > 1 ? (rhi - rlo) / (float)(nr - 1) : 0.f;
        const __half f4[4] = {__float2half(wrap_pi(t0)), __float2half(g), __float2half(q0), __float2half(dq)};
        __half *fr = page(frame, pid, stride) + 4 * i;
#pragma unroll
        for (int c = 0; c < 4; c++) fr[c] = f4[c];
        th0[i] = __half2float(f4[0]);  // the codes use the stored (rounded) frame
        gam[i] = __half2float(f4[1]);
        r0[i] = __half2float(f4[2]);
        dr[i] = __half2float(f4[3]);
        igam[i] = gam[i] > 0.f ? 1.f / gam[i] : 0.f;  // reciprocals: one division per pair, not per token
        idr[i] = dr[i] > 0.f ? 1.f / dr[i] : 0.f;
    }
    __syncthreads();

    // 2. key codes, one thread per token: (a_0, r_0, a_1, r_1, ...) as a little-endian bit stream
    for (int t = tid; t < n; t += NT) {
        unsigned char *row = page(codes, pid, stride) + t * key_bytes;
        unsigned long long acc = 0ull;
        int nacc = 0, nb = 0;
        for (int i = 0; i < h2; i++) {
            const float x = kj[t * D + i], y = kj[t * D + i + h2];
            const float rho = hypotf(x, y), phi = atan2f(y, x);
            const int a_bits = ba[i], r_bits = br[i];
            unsigned a = 0u, r = 0u;
            if (gam[i] > 0.f) {
                float rel = phi - th0[i] + gam[i] / 2;  // in (-2 pi, 3 pi): mod 2 pi in at most two steps
                if (rel < 0.f) rel += TWO_PI;
                if (rel >= TWO_PI) rel -= TWO_PI;
                if (rel >= TWO_PI) rel -= TWO_PI;
                const float q = floorf(rel * igam[i]);
                a = (unsigned)fminf(fmaxf(q, 0.f), (float)((1 << a_bits) - 1));
            }
            if (dr[i] > 0.f) {
                const float q = rintf((rho - r0[i]) * idr[i]);
                r = (unsigned)fminf(fmaxf(q, 0.f), (float)((1 << r_bits) - 1));
            }
            acc |= (unsigned long long)a << nacc;
            nacc += a_bits;
            acc |= (unsigned long long)r << nacc;
            nacc += r_bits;
            while (nacc >= 8) {
                if (nb < key_bytes) row[nb] = (unsigned char)(acc & 0xffu);
                nb++;
                acc >>= 8;
                nacc -= 8;
            }
        }
        for (; nb < key_bytes; nb++) {  // the last partial byte, then zero padding
            row[nb] = (unsigned char)(acc & 0xffu);
            acc >>= 8;
        }
    }
}

extern "C" __global__ void __launch_bounds__(adae::NT)
ada_encode_values(const float *__restrict__ v, const int *__restrict__ jobs, unsigned char *__restrict__ v_codes,
                  __half *__restrict__ v_min, __half *__restrict__ v_scale, long long stride, long long job_stride,
                  int head_dim, int v_bits, int v_group)
{
    using namespace adae;
    const int j = blockIdx.x, tid = threadIdx.x, D = head_dim;
    const int pid = jobs[3 * j], n = jobs[3 * j + 1];
    const float *vj = v + j * job_stride;
    const int ng = D / v_group, levels = (1 << v_bits) - 1, row_bytes = D * v_bits / 8;
    for (int w = tid; w < n * ng; w += NT) {
        const int t = w / ng, gi = w % ng;
        const float *x = vj + t * D + gi * v_group;
        float mn = x[0], mx = x[0];
        for (int c = 1; c < v_group; c++) {
            mn = fminf(mn, x[c]);
            mx = fmaxf(mx, x[c]);
        }
        const __half mnh = __float2half(mn);
        const float mnf = __half2float(mnh);
        __half sch = __float2half((mx - mnf) / (float)levels);
        if (!(__half2float(sch) > 0.f)) sch = __float2half(1.f);
        const float scf = __half2float(sch);
        page(v_min, pid, stride)[t * ng + gi] = mnh;
        page(v_scale, pid, stride)[t * ng + gi] = sch;
        unsigned char *out = page(v_codes, pid, stride) + t * row_bytes + gi * v_group * v_bits / 8;
        const int per = 8 / v_bits;  // codes per byte
        for (int b = 0; b < v_group / per; b++) {
            unsigned byte = 0u;
            for (int e = 0; e < per; e++) {
                const float q = rintf((x[b * per + e] - mnf) / scf);
                const unsigned c = (unsigned)fminf(fmaxf(q, 0.f), (float)levels);
                byte |= c << (v_bits * e);
            }
            out[b] = (unsigned char)byte;
        }
    }
}
