/* decode_combine.cuh: kernel 2 of the split-K decode ops (dense_decode.cu, ada_decode.cu): merges the splits'
 * partials with a log-sum-exp reduce and turns the kept weights into attention mass. Shapes: decode_common.cuh,
 * which the including .cu includes first (the loader inlines every #include, so headers are included once).
 */
/* Kernel 2 of both decode ops. grid (H,), block (NT,).
 *   part_acc (H, S, G, D), part_ml (H, S, G, 2) float32   the splits' partials
 *   slot_w (H, max_pages, G, P), page_m (H, max_pages, G) float32, or both null   kept weights (mass only)
 *   tiers (n_tiers,) TierDesc; page_ids, page_tiers (H, max_pages) (page_tiers null: every page is tier 0);
 *   fill (N,) int32; n_pages (H,) int32                   to find each slot's mass field
 *   out        (H * G, D) float32                          softmax(logits) @ V per query head (0 if no tokens)
 *   page_mass  (H, max_pages) float32 or null              attention mass of table entry pi of KV head h: the
 *              softmax weights of its tokens summed over the G query heads; 0 for pi >= n_pages[h]
 * With slot_w, every slot's own mass (summed over the G query heads) is also added to its tier's mass field.
 */
extern "C" __global__ void __launch_bounds__(dec::NT, dec::MIN_BLOCKS)
decode_combine(const float *__restrict__ part_acc, const float *__restrict__ part_ml, const float *__restrict__ slot_w,
               const float *__restrict__ page_m, const dec::TierDesc *__restrict__ tiers,
               const int *__restrict__ page_ids, const signed char *__restrict__ page_tiers,
               const int *__restrict__ fill, const int *__restrict__ n_pages, int S, int max_pages,
               float *__restrict__ out, float *__restrict__ page_mass)
{
    using namespace dec;
    constexpr int IT = (G * D + NT - 1) / NT;
    __shared__ float mx[G], inv_l[G];
    __shared__ float w[COMBINE_CH][G];
    const int h = blockIdx.x, tid = threadIdx.x;
    const float *ml = part_ml + (long long)h * S * G * 2;
    if (tid < G) {
        float M = neg_inf(), L = 0.f;
        for (int s = 0; s < S; s++) M = fmaxf(M, ml[(s * G + tid) * 2]);
        for (int s = 0; s < S; s++) {
            const float l = ml[(s * G + tid) * 2 + 1];
            if (l > 0.f) L += __expf(ml[(s * G + tid) * 2] - M) * l;
        }
        mx[tid] = M;
        inv_l[tid] = L > 0.f ? 1.f / L : 0.f;
    }
    __syncthreads();
    float o[IT];
#pragma unroll
    for (int k = 0; k < IT; k++) o[k] = 0.f;
    for (int s0 = 0; s0 < S; s0 += COMBINE_CH) {
        for (int i = tid; i < COMBINE_CH * G; i += NT) {
            const int s = s0 + i / G, g = i % G;
            const float l = s < S ? ml[(s * G + g) * 2 + 1] : 0.f;
            w[i / G][g] = l > 0.f ? __expf(ml[(s * G + g) * 2] - mx[g]) * inv_l[g] : 0.f;
        }
        __syncthreads();
        const int n = min(COMBINE_CH, S - s0);
        for (int j = 0; j < n; j++) {
            const float *a = part_acc + ((long long)h * S + s0 + j) * G * D;
#pragma unroll
            for (int k = 0; k < IT; k++) {
                const int idx = tid + k * NT;
                if (idx < G * D) o[k] += w[j][idx / D] * a[idx];
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int k = 0; k < IT; k++) {
        const int idx = tid + k * NT;
        if (idx < G * D) out[(long long)h * G * D + idx] = o[k];
    }
    if (!slot_w) return;
    // mass: warp per table entry; slot t of entry pi gets sum_g w[g][t] * exp(m_page[g] - M[g]) / L[g]
    const int lane = tid & 31;
    for (int pi = tid >> 5; pi < max_pages; pi += NW) {
        float total = 0.f;
        if (pi < n_pages[h]) {
            const long long e = (long long)h * max_pages + pi;
            const int pid = page_ids[e], f = fill[pid];
            const TierDesc &T = tiers[page_tiers ? page_tiers[e] : 0];
            float c[G];
#pragma unroll
            for (int g = 0; g < G; g++) c[g] = inv_l[g] > 0.f ? __expf(page_m[e * G + g] - mx[g]) * inv_l[g] : 0.f;
            __half *slot_mass = T.mass ? page_at(T.mass, pid, T.stride) : nullptr;
            for (int t = lane; t < f; t += 32) {
                float x = 0.f;
#pragma unroll
                for (int g = 0; g < G; g++) x += slot_w[(e * G + g) * P + t] * c[g];
                if (slot_mass) slot_mass[t] = mass_add(slot_mass[t], x, pid, t, T.mass_seed);
                total += x;
            }
        }
        total = warp_sum(total);
        if (page_mass && lane == 0) page_mass[(long long)h * max_pages + pi] = total;
    }
}
