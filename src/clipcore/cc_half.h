/* 16-bit floats: float16 (IEEE binary16) and bfloat16 (the top half of a
 * float32), held as uint16_t bits. Both widen to float32 exactly; a float32
 * narrows to them rounded to nearest, ties to even (RNE), as F16C's
 * vcvtps2ph and torch's conversions do: overflow gives inf, results below the
 * smallest normal become subnormal or zero, and a NaN stays a quiet NaN
 * keeping its sign and the top of its payload. Plain C on the bits, written
 * without branches so that the generic loops still vectorize; the
 * hand-written AVX-512 loops use F16C and integer shifts for the same bits. */
#ifndef CLIPCORE_CC_HALF_H
#define CLIPCORE_CC_HALF_H

#include <stdint.h>
#include <string.h>

static inline float cc_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t cc_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float cc_bf16_to_f32(uint16_t h) { return cc_bits_f32((uint32_t)h << 16); }

static inline uint16_t cc_f32_to_bf16(float f) {
    const uint32_t u = cc_f32_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  /* the bias trick */
    const uint32_t quiet = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/* float16 -> float32: exponent rebiased; a subnormal (exponent 0) scaled
 * exactly by a float32 subtraction of the magic 2^-14; inf/NaN get the
 * float32 all-ones exponent. */
static inline float cc_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t em = (uint32_t)(h & 0x7fffu) << 13;     /* exponent and mantissa */
    const uint32_t exp = em & 0x0f800000u;
    const uint32_t normal = em + ((127u - 15u) << 23);
    const uint32_t special = normal + ((128u - 16u) << 23);
    const float sub = cc_bits_f32(em + (113u << 23)) - cc_bits_f32(113u << 23);
    const uint32_t mag = exp == 0x0f800000u ? special : exp == 0 ? cc_f32_bits(sub) : normal;
    return cc_bits_f32(mag | sign);
}

/* float32 -> float16, RNE. Small values: adding 0.5 (as float32) leaves the
 * float16 subnormal's bits, rounded by the float32 adder, in the low bits;
 * normal ones: rebias and round the 13 dropped bits to even. */
static inline uint16_t cc_f32_to_f16(float f) {
    const uint32_t u = cc_f32_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    const uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
    const uint32_t big = a > 0x7f800000u ? nan : 0x7c00u;
    const uint32_t sub = cc_f32_bits(cc_bits_f32(a) + cc_bits_f32(126u << 23)) - (126u << 23);
    const uint32_t norm = (a + ((uint32_t)(15 - 127) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    const uint32_t mag = a >= ((127u + 16u) << 23) ? big : a < (113u << 23) ? sub : norm;
    return (uint16_t)(mag | sign);
}

#endif
