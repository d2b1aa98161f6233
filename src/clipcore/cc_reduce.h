/* The reductions of the norms: sum of squares, sum of |x|, max |x| and the
 * sum of |x|^p over contiguous or strided runs of float32, float64, float16
 * and bfloat16, in plain C so the compiler can vectorize them, with
 * hand-written AVX-512 forms of the contiguous cases.
 *
 * Determinism: every reduction keeps CC_LANES independent float64 lanes that
 * are combined in a fixed order, so a given buffer piece always gives the same
 * bits whatever thread runs it. (The AVX2/AVX-512 copies fuse x*x+acc into an
 * FMA, the baseline copy does not: results may differ in the last bit between
 * machines, never between thread counts on one machine.) No -ffast-math: NaN
 * and inf must propagate.
 */
#ifndef CLIPCORE_CC_REDUCE_H
#define CLIPCORE_CC_REDUCE_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>

#include "cc_platform.h"
#include "cc_half.h"

#define CC_LANES 64

/* Reduction kinds; the chunk driver combines sums by addition, maxima by max. */
enum { CC_SUMSQ = 0, CC_SUMABS = 1, CC_MAXABS = 2, CC_SUMPOW = 3 };

/* NaN-propagating max of two non-negative values. */
static inline double cc_max_nan(double a, double b) {
    if (a != a || b != b) return NAN;
    return a > b ? a : b;
}

/* Combine a chunk's lanes, in a fixed (pairwise) order. */
static inline double cc_combine_lanes(double *acc, int is_max) {
    for (int width = CC_LANES / 2; width > 0; width /= 2)
        for (int k = 0; k < width; k++)
            acc[k] = is_max ? cc_max_nan(acc[k], acc[k + width]) : acc[k] + acc[k + width];
    return acc[0];
}

/* One loop body per (dtype, reduction), accumulating into the caller's
 * CC_LANES float64 lanes (a chunk's pieces share them, so small buffers pay
 * no per-buffer setup); stride is in elements. The contiguous case gets the
 * lane-parallel loop the compiler vectorizes; enough lanes to hide the add
 * latency. For the general power p, |x| is divided by scale (the max |x|
 * over all buffers, found in a first pass) so sum |x|^p cannot overflow;
 * divided, not multiplied by 1 / scale, which is inf for a subnormal scale.
 * NaN is sticky in a max lane: v > NaN is false. Elements of storage type T
 * are read as LOAD(element), of type V (float for float32 and the 16-bit
 * types, whose float32 values are exact: a 16-bit element adds exactly what
 * its float32 upcast adds, to the same lane). */
#define CC_DEFINE_REDUCE(NAME, T, V, LOAD)                                     \
CC_CLONES CC_UNUSED static void NAME(const T *x, ptrdiff_t n, ptrdiff_t stride,\
                                     int kind, double p, double scale,         \
                                     double *restrict acc) {                   \
    ptrdiff_t i = 0;                                                           \
    if (stride == 1) {                                                         \
        const ptrdiff_t nv = n - n % CC_LANES;                                 \
        switch (kind) {                                                        \
        case CC_SUMSQ:                                                         \
            for (; i < nv; i += CC_LANES) {                                    \
                CC_PREFETCH_AHEAD(x + i, sizeof *x * CC_LANES)                 \
                for (int k = 0; k < CC_LANES; k++) {                           \
                    double v = (double)LOAD(x[i + k]); acc[k] += v * v; } }    \
            break;                                                             \
        case CC_SUMABS:                                                        \
            for (; i < nv; i += CC_LANES)                                      \
                for (int k = 0; k < CC_LANES; k++)                             \
                    acc[k] += fabs((double)LOAD(x[i + k]));                    \
            break;                                                             \
        case CC_MAXABS: {                                                      \
            /* In V: max is exact in any type, and float32 gets twice the      \
             * lanes per instruction. A NaN is kept apart (nan[k]) so that    \
             * each lane is one packed max and one compare-and-blend.        */\
            V m[CC_LANES] = {0}, nan[CC_LANES] = {0};                          \
            for (; i < nv; i += CC_LANES)                                      \
                for (int k = 0; k < CC_LANES; k++) {                           \
                    V a = LOAD(x[i + k]);                                      \
                    V v = a < 0 ? -a : a;                                      \
                    m[k] = v > m[k] ? v : m[k];                                \
                    nan[k] = v != v ? v : nan[k]; }                            \
            for (int k = 0; k < CC_LANES; k++)                                 \
                acc[k] = nan[k] != nan[k] ? (double)NAN                        \
                                          : cc_max_nan(acc[k], (double)m[k]);  \
            break; }                                                           \
        default:                                                               \
            for (; i < nv; i += CC_LANES)                                      \
                for (int k = 0; k < CC_LANES; k++)                             \
                    acc[k] += pow(fabs((double)LOAD(x[i + k])) / scale, p);    \
        }                                                                      \
    }                                                                          \
    /* Tail (and strided buffers), lane by lane. */                            \
    for (; i < n; i++) {                                                       \
        double v = fabs((double)LOAD(x[i * stride]));                          \
        double *a = &acc[i % CC_LANES];                                        \
        switch (kind) {                                                        \
        case CC_SUMSQ: *a += v * v; break;                                     \
        case CC_SUMABS: *a += v; break;                                        \
        case CC_MAXABS: *a = cc_max_nan(*a, v); break;                         \
        default: *a += pow(v / scale, p);                                      \
        }                                                                      \
    }                                                                          \
}

#ifdef CC_AVX512_PATHS

/* Hand-written AVX-512 form of the contiguous sum-of-squares, sum-abs and
 * max-abs reductions. GCC's vectorized generic loop is slower (its converts
 * don't take memory operands) and its scalar tail makes each small buffer
 * cost more; here the tail is a masked load. In the sums every
 * element goes to the same lane (its index modulo CC_LANES) with the same
 * operations as in the generic loop, so the result does not depend on which
 * path ran; a maximum is exact in any order. Max-abs works on the bits: for
 * |x| (sign cleared) unsigned integer order is float order, and a NaN's bits
 * are above inf's, so a plain integer max keeps NaN. */

/* The 8 float64 accumulators are named variables, not an array: GCC keeps
 * them in registers only then. EACH(STEP) runs STEP(j) for each j (STEP(j)
 * handles elements i + 8j .. i + 8j + 7, or for bfloat16 i + 16j ..
 * i + 16j + 15), over whole blocks of CC_LANES, then once more over the last
 * partial block with masked loads (masked-off elements read as 0). */
#define CC_EACH8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define CC_AVX512_BLOCKS(EACH, STEP)                                           \
    for (; i + CC_LANES <= n; i += CC_LANES) {                                 \
        CC_PREFETCH_AHEAD(x + i, sizeof *x * CC_LANES)                         \
        const ptrdiff_t left = CC_LANES; EACH(STEP) }                          \
    if (i < n) { const ptrdiff_t left = n - i; EACH(STEP) }
#define CC_LOAD8(j) cc_mask8(left - 8 * j), x + i + 8 * j
/* Eight elements (the arguments: mask, address) as float32: loaded, or widened from
 * float16 (F16C's vcvtph2ps). */
#define CC_PS8_F32(...) _mm256_maskz_loadu_ps(__VA_ARGS__)
#define CC_PS8_F16(...) _mm256_cvtph_ps(_mm_maskz_loadu_epi16(__VA_ARGS__))
#define CC_SUMSQ_STEP(PS8, j) { const __m512d v = _mm512_cvtps_pd(PS8(CC_LOAD8(j))); \
                                a##j = _mm512_fmadd_pd(v, v, a##j); }
#define CC_SUMABS_STEP(PS8, j) { const __m512d v = _mm512_cvtps_pd(PS8(CC_LOAD8(j))); \
                                 a##j = _mm512_add_pd(a##j, _mm512_abs_pd(v)); }
#define CC_SUMSQ_F32(j) CC_SUMSQ_STEP(CC_PS8_F32, j)
#define CC_SUMABS_F32(j) CC_SUMABS_STEP(CC_PS8_F32, j)
#define CC_SUMSQ_F16(j) CC_SUMSQ_STEP(CC_PS8_F16, j)
#define CC_SUMABS_F16(j) CC_SUMABS_STEP(CC_PS8_F16, j)
/* Max-abs keeps 64 float lanes as 4 registers of 16 (m0 holds lanes 0-15);
 * the 16-bit types as 2 registers of 32 16-bit lanes (the same bit order). */
#define CC_MAXABS_STEP(q) m##q = _mm512_max_epu32(m##q, _mm512_and_si512(abs_bits, \
        _mm512_maskz_loadu_epi32(cc_mask16(left - 16 * q), x + i + 16 * q)));
#define CC_MAXABS16_STEP(q) m##q = _mm512_max_epu16(m##q, _mm512_and_si512(abs_bits, \
        _mm512_maskz_loadu_epi16(cc_mask32(left - 32 * q), x + i + 32 * q)));
#define CC_EACH4(M) M(0) M(1) M(2) M(3)
#define CC_EACH2(M) M(0) M(1)

/* A max does not depend on the order or lanes it is taken in: the piece's
 * maximum goes to lane 0. */
CC_AVX512 CC_UNUSED static void cc_maxabs_f32_avx512(const float *x, ptrdiff_t n,
                                                     double *restrict acc) {
    ptrdiff_t i = 0;
    const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff);
    __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
    for (; i + CC_LANES <= n; i += CC_LANES) {
        CC_PREFETCH_AHEAD(x + i, sizeof *x * CC_LANES)
        const ptrdiff_t left = CC_LANES; CC_EACH4(CC_MAXABS_STEP) }
    if (i < n) { const ptrdiff_t left = n - i; CC_EACH4(CC_MAXABS_STEP) }
    acc[0] = cc_max_nan(acc[0], (double)cc_bits_f32((uint32_t)_mm512_reduce_max_epu32(
        _mm512_max_epu32(_mm512_max_epu32(m0, m1), _mm512_max_epu32(m2, m3)))));
}

/* The same over 16-bit bits; TO_F32 widens the largest. */
#define CC_DEFINE_MAXABS16_AVX512(NAME, TO_F32)                                \
CC_AVX512 CC_UNUSED static void NAME(const uint16_t *x, ptrdiff_t n,           \
                                     double *restrict acc) {                   \
    ptrdiff_t i = 0;                                                           \
    const __m512i abs_bits = _mm512_set1_epi16(0x7fff);                        \
    __m512i m0 = _mm512_setzero_si512(), m1 = m0;                              \
    for (; i + CC_LANES <= n; i += CC_LANES) {                                 \
        CC_PREFETCH_AHEAD(x + i, sizeof *x * CC_LANES)                         \
        const ptrdiff_t left = CC_LANES; CC_EACH2(CC_MAXABS16_STEP) }          \
    if (i < n) { const ptrdiff_t left = n - i; CC_EACH2(CC_MAXABS16_STEP) }    \
    m0 = _mm512_max_epu16(m0, m1);                                             \
    const uint32_t top = (uint32_t)_mm512_reduce_max_epu32(_mm512_max_epu32(   \
        _mm512_cvtepu16_epi32(_mm512_castsi512_si256(m0)),                     \
        _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(m0, 1))));             \
    acc[0] = cc_max_nan(acc[0], (double)TO_F32((uint16_t)top));                \
}
CC_DEFINE_MAXABS16_AVX512(cc_maxabs_f16_avx512, cc_f16_to_f32)
CC_DEFINE_MAXABS16_AVX512(cc_maxabs_bf16_avx512, cc_bf16_to_f32)

/* The sums for elements of type T, read by SUMSQ(j) and SUMABS(j) steps,
 * over `count` contiguous pieces xs[q] of ns[q] elements: each piece's
 * elements go to lanes 0, 1, .. from its first, as one piece on its own
 * would, and the lanes stay in registers from one piece to the next (loaded
 * and stored around every small piece, the store-to-load wait costs more than
 * the piece's arithmetic). */
#define CC_DEFINE_REDUCE_AVX512(NAME, T, MAXABS, SUMSQ, SUMABS)                \
CC_AVX512 CC_UNUSED static void NAME(const T *const *xs, const ptrdiff_t *ns,  \
                                     ptrdiff_t count, int kind,                \
                                     double *restrict acc) {                   \
    if (kind == CC_MAXABS) {                                                   \
        for (ptrdiff_t q = 0; q < count; q++) MAXABS(xs[q], ns[q], acc);       \
        return;                                                                \
    }                                                                          \
    CC_EACH8(CC_LOAD_ACC)                                                      \
    for (ptrdiff_t q = 0; q < count; q++) {                                    \
        const T *x = xs[q];                                                    \
        const ptrdiff_t n = ns[q];                                             \
        ptrdiff_t i = 0;                                                       \
        if (kind == CC_SUMSQ) {                                                \
            CC_AVX512_BLOCKS(CC_EACH8, SUMSQ)                                  \
        } else {                                                               \
            CC_AVX512_BLOCKS(CC_EACH8, SUMABS)                                 \
        }                                                                      \
    }                                                                          \
    CC_EACH8(CC_STORE_ACC)                                                     \
}
#define CC_LOAD_ACC(j) __m512d a##j = _mm512_loadu_pd(acc + 8 * j);
#define CC_STORE_ACC(j) _mm512_storeu_pd(acc + 8 * j, a##j);
CC_DEFINE_REDUCE_AVX512(cc_reduce_f32_avx512, float, cc_maxabs_f32_avx512,
                        CC_SUMSQ_F32, CC_SUMABS_F32)
CC_DEFINE_REDUCE_AVX512(cc_reduce_f16_avx512, uint16_t, cc_maxabs_f16_avx512,
                        CC_SUMSQ_F16, CC_SUMABS_F16)

/* bfloat16's sums take 16 elements per load and widen them without moving
 * any across lanes: the even elements are the low halves of the 32-bit
 * words (shifted up: their float32 values), the odd ones the high halves
 * (masked: theirs). So e<p> holds the lanes of a block's elements 16p,
 * 16p + 2, .., 16p + 14 and o<p> those of 16p + 1, .., 16p + 15: the lanes
 * are taken from acc in that order and put back at the end, and every
 * element still goes to lane (its index modulo CC_LANES), as in the generic
 * loop. */
#define CC_BF16_STEP(INTO, p) {                                                \
    const __m256i w = _mm256_maskz_loadu_epi16(cc_mask16(left - 16 * p), x + i + 16 * p); \
    INTO(e##p, _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)))) \
    INTO(o##p, _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_and_si256(w, high)))) }
#define CC_SQ_INTO(a, v) { const __m512d v_ = (v); a = _mm512_fmadd_pd(v_, v_, a); }
#define CC_ABS_INTO(a, v) a = _mm512_add_pd(a, _mm512_abs_pd(v));
#define CC_SUMSQ_BF16(p) CC_BF16_STEP(CC_SQ_INTO, p)
#define CC_SUMABS_BF16(p) CC_BF16_STEP(CC_ABS_INTO, p)
#define CC_BF16_LOAD_ACC(p)                                                    \
    const __m512d lo##p = _mm512_loadu_pd(acc + 16 * p), hi##p = _mm512_loadu_pd(acc + 16 * p + 8); \
    __m512d e##p = _mm512_permutex2var_pd(lo##p, evens, hi##p);                \
    __m512d o##p = _mm512_permutex2var_pd(lo##p, odds, hi##p);
#define CC_BF16_STORE_ACC(p)                                                   \
    _mm512_storeu_pd(acc + 16 * p, _mm512_permutex2var_pd(e##p, low_half, o##p)); \
    _mm512_storeu_pd(acc + 16 * p + 8, _mm512_permutex2var_pd(e##p, high_half, o##p));
CC_AVX512 CC_UNUSED static void cc_reduce_bf16_avx512(const uint16_t *const *xs,
                                                      const ptrdiff_t *ns, ptrdiff_t count,
                                                      int kind, double *restrict acc) {
    if (kind == CC_MAXABS) {
        for (ptrdiff_t q = 0; q < count; q++) cc_maxabs_bf16_avx512(xs[q], ns[q], acc);
        return;
    }
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    /* permutex2var indices: 0-7 pick from the first operand, 8-15 from the second */
    const __m512i evens = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odds = _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1);
    const __m512i low_half = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
    const __m512i high_half = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
    CC_EACH4(CC_BF16_LOAD_ACC)
    for (ptrdiff_t q = 0; q < count; q++) {
        const uint16_t *x = xs[q];
        const ptrdiff_t n = ns[q];
        ptrdiff_t i = 0;
        if (kind == CC_SUMSQ) {
            CC_AVX512_BLOCKS(CC_EACH4, CC_SUMSQ_BF16)
        } else {
            CC_AVX512_BLOCKS(CC_EACH4, CC_SUMABS_BF16)
        }
    }
    CC_EACH4(CC_BF16_STORE_ACC)
}
/* A contiguous float32 buffer's sum of squares or of |x| on its own, its
 * lanes combined in registers in cc_combine_lanes' order (lane k with
 * k + 32, k + 16, k + 8: whole registers; then k + 4, k + 2, k + 1): the same
 * bits as cc_reduce_f32 then cc_combine_lanes, without 64 lanes stored,
 * reloaded and added one at a time, which a short row (a unit of AGC) pays
 * on every call. */
#define CC_ZERO_ACC(j) __m512d a##j = _mm512_setzero_pd();
CC_AVX512 CC_UNUSED static double cc_sum_one_f32_avx512(const float *x, ptrdiff_t n,
                                                        int kind) {
    ptrdiff_t i = 0;
    CC_EACH8(CC_ZERO_ACC)
    if (kind == CC_SUMSQ) {
        CC_AVX512_BLOCKS(CC_EACH8, CC_SUMSQ_F32)
    } else {
        CC_AVX512_BLOCKS(CC_EACH8, CC_SUMABS_F32)
    }
    a0 = _mm512_add_pd(a0, a4); a1 = _mm512_add_pd(a1, a5);
    a2 = _mm512_add_pd(a2, a6); a3 = _mm512_add_pd(a3, a7);
    a0 = _mm512_add_pd(a0, a2); a1 = _mm512_add_pd(a1, a3);
    a0 = _mm512_add_pd(a0, a1);
    const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(a0), _mm512_extractf64x4_pd(a0, 1));
    const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
}
#undef CC_EACH8
#undef CC_ZERO_ACC
#undef CC_EACH4
#undef CC_EACH2
#undef CC_AVX512_BLOCKS
#undef CC_LOAD8
#undef CC_SUMSQ_STEP
#undef CC_SUMABS_STEP
#undef CC_MAXABS_STEP
#undef CC_MAXABS16_STEP
#undef CC_LOAD_ACC
#undef CC_STORE_ACC
#undef CC_BF16_STEP
#undef CC_SQ_INTO
#undef CC_ABS_INTO
#undef CC_SUMSQ_BF16
#undef CC_SUMABS_BF16
#undef CC_BF16_LOAD_ACC
#undef CC_BF16_STORE_ACC
#endif

#define CC_AS_IS(v) (v)
CC_DEFINE_REDUCE(cc_reduce_f32_generic, float, float, CC_AS_IS)
CC_DEFINE_REDUCE(cc_reduce_f64, double, double, CC_AS_IS)
CC_DEFINE_REDUCE(cc_reduce_f16_generic, uint16_t, float, cc_f16_to_f32)
CC_DEFINE_REDUCE(cc_reduce_bf16_generic, uint16_t, float, cc_bf16_to_f32)

/* The reductions the engine calls: the AVX-512 form where it applies, else
 * the generic loop (the same lanes, the same bits). NAME reduces one piece
 * (any stride), NAME_pieces `count` contiguous pieces into the same lanes, as
 * many calls of NAME would. */
#define CC_DEFINE_REDUCE_DISPATCH(NAME, T, TWIN, GENERIC)                      \
CC_UNUSED static void NAME(const T *x, ptrdiff_t n, ptrdiff_t stride, int kind, \
                           double p, double scale, double *restrict acc) {     \
    CC_TWIN(stride == 1 && kind != CC_SUMPOW, TWIN(&x, &n, 1, kind, acc))      \
    GENERIC(x, n, stride, kind, p, scale, acc);                                \
}                                                                              \
CC_UNUSED static void NAME##_pieces(const T *const *xs, const ptrdiff_t *ns,   \
                                    ptrdiff_t count, int kind, double p,       \
                                    double scale, double *restrict acc) {      \
    CC_TWIN(kind != CC_SUMPOW, TWIN(xs, ns, count, kind, acc))                 \
    for (ptrdiff_t q = 0; q < count; q++)                                      \
        GENERIC(xs[q], ns[q], 1, kind, p, scale, acc);                         \
}
CC_DEFINE_REDUCE_DISPATCH(cc_reduce_f32, float, cc_reduce_f32_avx512, cc_reduce_f32_generic)
CC_DEFINE_REDUCE_DISPATCH(cc_reduce_f16, uint16_t, cc_reduce_f16_avx512, cc_reduce_f16_generic)
CC_DEFINE_REDUCE_DISPATCH(cc_reduce_bf16, uint16_t, cc_reduce_bf16_avx512,
                          cc_reduce_bf16_generic)
/* float64 has the generic loop only (no twin to dispatch to). */
CC_UNUSED static void cc_reduce_f64_pieces(const double *const *xs, const ptrdiff_t *ns,
                                           ptrdiff_t count, int kind, double p,
                                           double scale, double *restrict acc) {
    for (ptrdiff_t q = 0; q < count; q++)
        cc_reduce_f64(xs[q], ns[q], 1, kind, p, scale, acc);
}

#ifdef CC_AVX512_PATHS
#define CC_SUM_ONE_F32_TWIN                                                    \
    if (stride == 1 && (kind == CC_SUMSQ || kind == CC_SUMABS) && cc_avx512_usable()) \
        return cc_sum_one_f32_avx512(x, n, kind);
#else
#define CC_SUM_ONE_F32_TWIN
#endif

/* The reduction of one buffer on its own (fresh lanes, combined); TWIN: a
 * form that gives the same bits faster, where it applies. */
#define CC_DEFINE_REDUCE_ONE(NAME, REDUCE, T, TWIN)                            \
CC_UNUSED static double NAME(const T *x, ptrdiff_t n, ptrdiff_t stride,       \
                             int kind, double p, double scale) {               \
    TWIN                                                                       \
    double acc[CC_LANES] = {0};                                                \
    REDUCE(x, n, stride, kind, p, scale, acc);                                 \
    return cc_combine_lanes(acc, kind == CC_MAXABS);                           \
}

CC_DEFINE_REDUCE_ONE(cc_reduce_one_f32, cc_reduce_f32, float, CC_SUM_ONE_F32_TWIN)
CC_DEFINE_REDUCE_ONE(cc_reduce_one_f64, cc_reduce_f64, double, )

#endif
