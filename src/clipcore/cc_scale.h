/* The scaling loops of the norm clips: x *= s in place over contiguous or
 * strided runs of float32, float64, float16 and bfloat16, with hand-written
 * AVX-512 forms of the contiguous cases (the same bits as the plain loops).
 * The packed in-place loop here also serves cc_elementwise.h's in-place
 * twins.
 */
#ifndef CLIPCORE_CC_SCALE_H
#define CLIPCORE_CC_SCALE_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <float.h>

#include "cc_platform.h"
#include "cc_half.h"

#ifdef CC_AVX512_PATHS
/* x[i] = OPV(x[i]) in place over a contiguous run, four AVX-512 vectors per
 * block after a prefetch; OPS is the same for one element (the tail). The
 * operation sees the scalars a and b (va, vb as vectors). Hand-written:
 * the compiler's vectorized form of the same loop reached memory speed or
 * not depending on where the linker placed it. */
#define CC_DEFINE_PACKED_IN_PLACE(NAME, T, VT, W, SET1, LOADU, STOREU, OPS, OPV) \
CC_AVX512 CC_UNUSED static void NAME(T *x, T a, T b, ptrdiff_t n) {            \
    const VT va = SET1(a), vb = SET1(b);                                        \
    ptrdiff_t i = 0;                                                            \
    (void)va; (void)vb;                                                         \
    for (; i + 4 * W <= n; i += 4 * W) {                                        \
        CC_PREFETCH_AHEAD(x + i, 4 * W * sizeof(T))                             \
        STOREU(x + i, OPV(LOADU(x + i)));                                       \
        STOREU(x + i + W, OPV(LOADU(x + i + W)));                               \
        STOREU(x + i + 2 * W, OPV(LOADU(x + i + 2 * W)));                       \
        STOREU(x + i + 3 * W, OPV(LOADU(x + i + 3 * W)));                       \
    }                                                                           \
    for (; i < n; i++) x[i] = OPS(x[i]);                                        \
}
#define CC_MUL_S(v) ((v) * b)
#define CC_MUL_V32(v) _mm512_mul_ps(v, vb)
#define CC_MUL_V64(v) _mm512_mul_pd(v, vb)
CC_DEFINE_PACKED_IN_PLACE(cc_mul_f32_in, float, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps,
                          _mm512_storeu_ps, CC_MUL_S, CC_MUL_V32)
CC_DEFINE_PACKED_IN_PLACE(cc_mul_f64_in, double, __m512d, 8, _mm512_set1_pd, _mm512_loadu_pd,
                          _mm512_storeu_pd, CC_MUL_S, CC_MUL_V64)
#endif

/* float32 buffers are multiplied by the float32 scale (as TensorFlow does),
 * except when that scale would be subnormal and lose digits (clipping a huge
 * norm to a small one): then in float64, rounded once. */
CC_CLONES CC_UNUSED static void cc_scale_f32(float *x, ptrdiff_t n, ptrdiff_t stride, double s) {
    const float sf = (float)s;
    if (!(fabs(s) < FLT_MIN) || s == 0.0) {
#ifdef CC_AVX512_PATHS
        if (stride == 1 && cc_avx512_usable()) { cc_mul_f32_in(x, 0, sf, n); return; }
#endif
        if (stride == 1) CC_FOR_PREFETCHED(float, x, n, x[i] *= sf)
        else { for (ptrdiff_t i = 0; i < n; i++) x[i * stride] *= sf; }
    } else {
        for (ptrdiff_t i = 0; i < n; i++) x[i * stride] = (float)((double)x[i * stride] * s);
    }
}

CC_CLONES CC_UNUSED static void cc_scale_f64(double *x, ptrdiff_t n, ptrdiff_t stride, double s) {
#ifdef CC_AVX512_PATHS
    if (stride == 1 && cc_avx512_usable()) { cc_mul_f64_in(x, 0, s, n); return; }
#endif
    if (stride == 1) CC_FOR_PREFETCHED(double, x, n, x[i] *= s)
    else { for (ptrdiff_t i = 0; i < n; i++) x[i * stride] *= s; }
}

/* The 16-bit types are multiplied as torch multiplies them (and NumPy, a
 * float16 array by a float32 scalar): widened to float32, times the float32
 * scale, rounded once to the type (RNE). */
#ifdef CC_AVX512_PATHS
#define CC_WIDEN16_F16(v) _mm512_cvtph_ps(v)
#define CC_NARROW16_F16(v) _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define CC_WIDEN16_BF16(v) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))
/* cc_f32_to_bf16 on 16 lanes. (Not AVX512-BF16's vcvtneps2bf16: it flushes
 * subnormals to zero.) */
CC_AVX512 static inline __m256i cc_narrow16_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v), hi = _mm512_srli_epi32(u, 16);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                          _mm512_and_si512(hi, _mm512_set1_epi32(1)));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    const __m512i quiet = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                                         rounded, quiet));
}
#define CC_NARROW16_BF16(v) cc_narrow16_bf16(v)
/* Four vectors of 16 per block after a prefetch; the tail with masked loads
 * and stores (the same conversions, so the same bits). */
#define CC_DEFINE_SCALE16_AVX512(NAME, WIDEN, NARROW)                          \
CC_AVX512 CC_UNUSED static void NAME(uint16_t *x, ptrdiff_t n, float s) {      \
    const __m512 vs = _mm512_set1_ps(s);                                       \
    ptrdiff_t i = 0;                                                           \
    for (; i + 64 <= n; i += 64) {                                             \
        CC_PREFETCH_AHEAD(x + i, 128)                                          \
        for (int q = 0; q < 64; q += 16) {                                     \
            __m256i *p = (__m256i *)(x + i + q);                               \
            _mm256_storeu_si256(p, NARROW(_mm512_mul_ps(WIDEN(_mm256_loadu_si256(p)), vs))); } } \
    for (; i < n; i += 16) {                                                   \
        const __mmask16 m = cc_mask16(n - i);                                  \
        _mm256_mask_storeu_epi16(x + i, m, NARROW(_mm512_mul_ps(               \
            WIDEN(_mm256_maskz_loadu_epi16(m, x + i)), vs))); }                \
}
CC_DEFINE_SCALE16_AVX512(cc_scale_f16_avx512, CC_WIDEN16_F16, CC_NARROW16_F16)
/* bfloat16, 32 at a time without moving any across lanes: the even elements
 * are the low halves of the 32-bit lanes (shifted up: their float32 values),
 * the odd ones the high halves (masked: theirs); each product is rounded in
 * its lane by the bias trick, and the two results are merged back by 16-bit
 * blend. A NaN needs no quieting here: a NaN product of a bfloat16 element
 * is that element's NaN, quieted (x86 keeps the NaN operand's payload when
 * the other is a number), with its low 16 bits zero, so the bias carries
 * nothing out of them. Only a NaN scale could bring other low bits: it takes
 * the 16-wide loop, which quiets. The tail is the 16-wide loop's. */
CC_AVX512 static inline __m512i cc_round16_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
}
CC_DEFINE_SCALE16_AVX512(cc_scale_bf16_avx512_16, CC_WIDEN16_BF16, CC_NARROW16_BF16)
CC_AVX512 CC_UNUSED static void cc_scale_bf16_avx512(uint16_t *x, ptrdiff_t n, float s) {
    const __m512 vs = _mm512_set1_ps(s);
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    ptrdiff_t i = 0;
    if (s != s) { cc_scale_bf16_avx512_16(x, n, s); return; }
    for (; i + 64 <= n; i += 64) {
        CC_PREFETCH_AHEAD(x + i, 128)
        for (int q = 0; q < 64; q += 32) {
            const __m512i w = _mm512_loadu_si512(x + i + q);
            const __m512i even = cc_round16_bf16(_mm512_mul_ps(
                _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), vs));
            const __m512i odd = cc_round16_bf16(_mm512_mul_ps(
                _mm512_castsi512_ps(_mm512_and_si512(w, high)), vs));
            _mm512_storeu_si512(x + i + q, _mm512_mask_blend_epi16(
                (__mmask32)0xaaaaaaaau, _mm512_srli_epi32(even, 16), odd)); } }
    if (i < n) cc_scale_bf16_avx512_16(x + i, n - i, s);
}
#endif

#define CC_DEFINE_SCALE16(NAME, WIDEN, NARROW, TWIN)                           \
CC_CLONES CC_UNUSED static void NAME(uint16_t *x, ptrdiff_t n, ptrdiff_t stride, double s) { \
    const float sf = (float)s;                                                 \
    CC_TWIN(stride == 1, TWIN(x, n, sf))                                       \
    if (stride == 1) CC_FOR_PREFETCHED(uint16_t, x, n, x[i] = NARROW(WIDEN(x[i]) * sf)) \
    else { for (ptrdiff_t i = 0; i < n; i++)                                   \
               x[i * stride] = NARROW(WIDEN(x[i * stride]) * sf); }             \
}
CC_DEFINE_SCALE16(cc_scale_f16, cc_f16_to_f32, cc_f32_to_f16, cc_scale_f16_avx512)
CC_DEFINE_SCALE16(cc_scale_bf16, cc_bf16_to_f32, cc_f32_to_bf16, cc_scale_bf16_avx512)

#endif
