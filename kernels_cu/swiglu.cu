/* swiglu.cu: the MLP's gate: out = silu(gate) * up, reading the fused gate|up projection.
 *
 * Twin: skvrt/ops.py silu (x / (1 + exp(-x)) in float32) times up, as models/llama.py does; launched by
 * skvrt/cuda/ops.py swiglu; parity: tests/test_cuda_emu_ops.py (expf vs NumPy's exp: ~1e-7 relative).
 *
 * swiglu: grid (ceil(F / NT), min(T, 65535)), block (NT,) = (256,); block (b, y) handles columns
 * [b NT, (b + 1) NT) of rows y, y + gridDim.y, ...
 *   gu    (T, 2F)  float32   row t = [gate (F) | up (F)]
 *   out   (T, F)   float32   out[t, j] = gate / (1 + exp(-gate)) * up
 *   T, F  int
 */

extern "C" __global__ void __launch_bounds__(256)
swiglu(const float *__restrict__ gu, float *__restrict__ out, int T, int F)
{
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= F) return;
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
        const float g = gu[(long long)t * 2 * F + j], u = gu[(long long)t * 2 * F + F + j];
        out[(long long)t * F + j] = g / (1.f + expf(-g)) * u;
    }
}
