/*
 * Scalar primitives shared by the native quantizer's translation units (_native.c and the kernels
 * in native_*.c): float bit casts, ggml's nearest_int, the IEEE fp16/bf16 converters, byte helpers.
 * Upstream: ggml/src/ggml-quants.c nearest_int, ggml/src/ggml-impl.h fp16 conversion (same results).
 */
#ifndef GGUFORGE_NATIVE_PRIMS_H
#define GGUFORGE_NATIVE_PRIMS_H

#include <stdint.h>
#include <string.h>

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* ===================================================================== */
/* primitives                                                            */
/* ===================================================================== */

ALWAYS_INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
ALWAYS_INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Round to nearest, ties to even, via the 1.5*2^23 trick (literal formula, so
 * out-of-range arguments wrap exactly like ggml's). */
ALWAYS_INLINE int nearest_int(float f) {
    float v = f + 12582912.0f;
    return (int)(f2u(v) & 0x007FFFFF) - 0x00400000;
}

/* IEEE binary32 -> binary16, round to nearest even, subnormals kept,
 * overflow -> inf, NaN -> 0x7E00|sign (what ggml's portable converter does). */
ALWAYS_INLINE uint16_t fp32_to_fp16(float f) {
    uint32_t x = f2u(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);           /* NaN */
    if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);          /* >= 65520 rounds to inf */
    if (ax < 0x38800000u) {
        /* below 2^-14: result is subnormal (or zero). Adding 0.5f puts the value's
         * 2^-24 units in the low mantissa bits, and the FPU rounds them RNE. */
        float v = u2f(ax) + 0.5f;
        return (uint16_t)(sign | (f2u(v) - 0x3F000000u));
    }
    /* normal: rebias exponent (127 -> 15), round the 13 dropped bits RNE;
     * a carry into the exponent is the correct result. */
    uint32_t r = ax - (112u << 23);
    r += 0x0FFFu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

ALWAYS_INLINE float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {                      /* zero / subnormal: m * 2^-24, exact */
        float v = (float)m * 5.9604644775390625e-8f;
        return u2f(f2u(v) | sign);
    }
    if (e == 31) return u2f(sign | 0x7F800000u | (m << 13));
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

/* BF16: round to nearest even on the upper 16 bits; NaN forced quiet. */
ALWAYS_INLINE uint16_t fp32_to_bf16(float f) {
    uint32_t x = f2u(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

ALWAYS_INLINE void put_u16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
ALWAYS_INLINE uint16_t get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* C's MAX/MIN as ggml defines them (matters only for ordering of equal/NaN). */
#define MAXF(a, b) ((a) > (b) ? (a) : (b))
#define MINI(a, b) ((a) < (b) ? (a) : (b))
#define MAXI(a, b) ((a) > (b) ? (a) : (b))

#endif
