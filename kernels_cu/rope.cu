/* rope.cu: rotary position embedding in place, rotate_half convention (pairs (i, i + D/2)), on rows of the
 * fused q|k|v projection, so q and k are rotated where the projection wrote them (no transpose, no copy).
 *
 * Twin: skvrt/ops.py rope_tables + apply_rope (cos / sin of float32(position) * inv_freq in float32,
 * x * cos + rotate_half(x) * sin); launched by skvrt/cuda/ops.py rope; parity: tests/test_cuda_emu_ops.py.
 * The angle pos * inv_freq is rounded to float32 as in the twin; its sine and cosine are computed without
 * CUDA's sincosf (whose Payne-Hanek path for large angles uses local memory): the angle (< 2^24) is reduced
 * by pi/2 in double precision (two-part pi/2, exact to ~1e-16 |k|), then a float Taylor series on
 * |r| <= pi/4 (error < 2e-9). Differences from the twin (NumPy's float32 cos / sin, ~1 ulp; summation of
 * x cos + rot sin with a possible fused multiply-add): |error| ~1e-6 |x|, also at positions ~1e5.
 *
 * rope: grid (T, n_heads), block (NT,) = (64,); block (t, j) rotates head `head0 + j` of token t.
 *   x          float32   element (t, head, d) at x[t * row_stride + head * head_dim + d]; rotated in place
 *   positions  (T,)      int32     the token's position
 *   inv_freq   (D/2,)    float32   inverse frequencies (rope scaling already applied: models/llama.py)
 *   row_stride int       floats between tokens (the projection's width, (nq + 2 nkv) D for q|k|v)
 *   head0      int       first head to rotate (0: q heads then k heads, which follow them)
 *   head_dim   int       D, even
 */

namespace rope_ns {
// sin and cos of a float angle |x| < 2^24: k = rint(x 2/pi), r = x - k pi/2 in double, Taylor in float
__device__ __forceinline__ void sincos_reduced(float x, float &s, float &c)
{
    const double xd = (double)x;
    const double k = rint(xd * 0.63661977236758134308);
    const float r = (float)((xd - k * 1.5707963267948966192) - k * 6.123233995736766036e-17);
    const float z = r * r;
    const float sr = r + r * z * (-1.f / 6 + z * (1.f / 120 + z * (-1.f / 5040 + z * (1.f / 362880))));
    const float cr = 1.f + z * (-0.5f + z * (1.f / 24 + z * (-1.f / 720 + z * (1.f / 40320 + z * (-1.f / 3628800)))));
    const int qd = (int)((long long)k & 3);
    s = qd == 0 ? sr : qd == 1 ? cr : qd == 2 ? -sr : -cr;
    c = qd == 0 ? cr : qd == 1 ? -sr : qd == 2 ? -cr : sr;
}
}  // namespace rope_ns

extern "C" __global__ void __launch_bounds__(64)
rope(float *__restrict__ x, const int *__restrict__ positions, const float *__restrict__ inv_freq, int row_stride,
     int head0, int head_dim)
{
    const int t = blockIdx.x, head = head0 + blockIdx.y, h2 = head_dim / 2;
    float *row = x + (long long)t * row_stride + (long long)head * head_dim;
    const float pos = (float)positions[t];
    for (int i = threadIdx.x; i < h2; i += blockDim.x) {
        float s, c;
        rope_ns::sincos_reduced(pos * inv_freq[i], s, c);
        const float x0 = row[i], x1 = row[i + h2];
        row[i] = x0 * c - x1 * s;
        row[i + h2] = x1 * c + x0 * s;
    }
}
