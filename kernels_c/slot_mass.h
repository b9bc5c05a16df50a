/* Slot attention mass: float16 sums updated with stochastic rounding.
 *
 * Twin: skvrt/kv/slot_mass.py (`accumulate`, `slot_keys`; the module docstring has the why and the rule),
 * parity-tested through the decode kernels in tests/test_ckernels.py and tests/test_ckernels_ada.py.
 * y = old + x in float32; y >= 2^-14: clear y's low 13 mantissa bits and round up by one float16 step iff those
 * bits > r; below 2^-14 the same on y * 2^24 (float16 subnormal steps); r = top 13 bits of a hash of
 * pid * 256 + slot + seed * 0x9E3779B9 (mod 2^32); saturates at 65504. x >= 0. */
#ifndef SKVRT_SLOT_MASS_H
#define SKVRT_SLOT_MASS_H
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "simd.h"

static inline uint32_t skvrt_mass_hash(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    return x ^ (x >> 16);
}

static inline uint32_t skvrt_mass_key(int32_t pid, int slot, uint32_t seed)
{
    return (uint32_t)pid * 256U + (uint32_t)slot + seed * 0x9E3779B9U;
}

/* old: float16 bits of the slot's sum; x >= 0 the increment -> the new sum's float16 bits */
static inline uint16_t skvrt_mass_add(uint16_t old, float x, uint32_t key)
{
    const float y = skvrt_h2f(old) + x;
    if (!(y < 65504.f)) return 0x7bff;
    const uint32_t r = skvrt_mass_hash(key) >> 19;
    if (y >= 0x1p-14f) {
        uint32_t b;
        memcpy(&b, &y, 4);
        b = (b & ~0x1fffU) + ((b & 0x1fffU) > r ? 0x2000U : 0U);
        float z;
        memcpy(&z, &b, 4);
        if (!(z < 65504.f)) return 0x7bff;
        return (uint16_t)(((((b >> 23) & 0xffU) - 112U) << 10) | ((b >> 13) & 0x3ffU)); /* 127 - 15 = 112 */
    }
    const float q = y * 0x1p24f, n = floorf(q);
    const uint32_t frac = (uint32_t)floorf((q - n) * 8192.f);
    return (uint16_t)((uint32_t)n + (frac > r ? 1U : 0U));
}
#endif
