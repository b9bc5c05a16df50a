/* rms_norm.cu: fused RMSNorm, optionally with the residual add in front of it (the model's
 * `x = x + o; h = rms_norm(x, w)`), one token row per block.
 *
 * Twin: skvrt/ops.py rms_norm (numerics of transformers' LlamaRMSNorm: float32 mean of squares, then
 * x * (1 / sqrt(var + eps)), then the weight multiply); launched by skvrt/cuda/ops.py rms_norm; parity:
 * tests/test_cuda_emu_ops.py. The only difference from the twin is the summation order of the mean (a
 * block tree instead of NumPy's pairwise sum): relative error ~1e-7.
 *
 * rms_norm: grid (T,), block (NT,) = (256,); block t normalises row t.
 *   x         (T, n)   float32   in; with `residual`, x += residual first and the sum is written back to x
 *   residual  (T, n)   float32   or null
 *   weight    (n,)     float32
 *   out       (T, n)   float32   out[t] = x[t] * (1 / sqrt(mean(x[t]^2) + eps)) * weight  (may alias nothing)
 *   n         int      hidden size (any; rows need no alignment)
 *   eps       float
 * Shared memory: static, NT / 32 floats.
 */

namespace rmsn {
constexpr int NT = 256, NW = NT / 32;
constexpr unsigned FULL = 0xffffffffu;
}  // namespace rmsn

extern "C" __global__ void __launch_bounds__(rmsn::NT)
rms_norm(float *__restrict__ x, const float *__restrict__ residual, const float *__restrict__ weight,
         float *__restrict__ out, int n, float eps)
{
    using namespace rmsn;
    __shared__ float part[NW];
    __shared__ float inv;
    const int tid = threadIdx.x;
    float *xr = x + (long long)blockIdx.x * n;
    float *orow = out + (long long)blockIdx.x * n;
    float ss = 0.f;
    if (residual) {
        const float *rr = residual + (long long)blockIdx.x * n;
        for (int i = tid; i < n; i += NT) {
            const float v = xr[i] + rr[i];
            xr[i] = v;  // each thread re-reads only its own elements below: no barrier needed
            ss += v * v;
        }
    } else {
        for (int i = tid; i < n; i += NT) ss += xr[i] * xr[i];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(FULL, ss, o);
    if ((tid & 31) == 0) part[tid >> 5] = ss;
    __syncthreads();
    if (tid == 0) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < NW; w++) s += part[w];
        inv = 1.f / sqrtf(s / (float)n + eps);
    }
    __syncthreads();
    const float r = inv;
    for (int i = tid; i < n; i += NT) orow[i] = (xr[i] * r) * weight[i];
}
