/* Small kernels that exercise the CUDA emulator itself (tests/test_cuda_emulator.py). Valid CUDA: the same
 * file compiles with NVRTC. grid (n_blocks,), block (NT,) unless said otherwise; x, out float32.
 *
 * block_sum                   out[b] = sum of x[b NT, (b + 1) NT): shared-memory tree reduction
 * block_sum_missing_barrier   the same with the barrier between the stores and the reduction left out: a
 *                             deliberate race that only some thread orders get away with
 * warp_shuffles               out (NT, 4): per thread, shfl_xor(x, 5), shfl_down(x, 3), shfl_up(x, 2),
 *                             shfl(x, 7) of x[tid] within its warp
 * atomic_total                out[0] += every x (one atomicAdd per thread)
 * dyn_smem_reverse            out[i] = x[NT - 1 - i] through dynamic shared memory (NT floats)
 * shared_uninitialised        out[i] = s[i] where only s[0, NT/2) was written (the emulator poisons the rest)
 * divergent_barrier           a barrier only half the block reaches
 */
#define NT 128

extern "C" __global__ void block_sum(const float *x, float *out)
{
    __shared__ float s[NT];
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * NT + t];
    __syncthreads();
    for (int stride = NT / 2; stride > 0; stride >>= 1) {
        if (t < stride) s[t] += s[t + stride];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

extern "C" __global__ void block_sum_missing_barrier(const float *x, float *out)
{
    __shared__ float s[NT];
    const int t = threadIdx.x;
    s[t] = x[blockIdx.x * NT + t];
    for (int stride = NT / 2; stride > 0; stride >>= 1) {
        if (t < stride) s[t] += s[t + stride];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

extern "C" __global__ void warp_shuffles(const float *x, float *out)
{
    const int t = threadIdx.x;
    const float v = x[t];
    out[4 * t + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[4 * t + 1] = __shfl_down_sync(0xffffffffu, v, 3);
    out[4 * t + 2] = __shfl_up_sync(0xffffffffu, v, 2);
    out[4 * t + 3] = __shfl_sync(0xffffffffu, v, 7);
}

extern "C" __global__ void atomic_total(const float *x, float *out)
{
    atomicAdd(out, x[blockIdx.x * NT + threadIdx.x]);
}

extern "C" __global__ void dyn_smem_reverse(const float *x, float *out)
{
    extern __shared__ float buf[];
    const int t = threadIdx.x;
    buf[t] = x[t];
    __syncthreads();
    out[t] = buf[NT - 1 - t];
}

extern "C" __global__ void shared_uninitialised(const float *x, float *out)
{
    __shared__ float s[NT];
    const int t = threadIdx.x;
    if (t < NT / 2) s[t] = x[t];
    __syncthreads();
    out[t] = s[t];
}

extern "C" __global__ void divergent_barrier(const float *x, float *out)
{
    if (threadIdx.x < NT / 2) __syncthreads();
    out[threadIdx.x] = x[threadIdx.x];
}
