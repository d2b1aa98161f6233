/* Inner loops of clipcore's elementwise kernels (clipcore._elementwise's
 * ew_apply), in plain C so the compiler vectorizes them.
 *
 * Elementwise loops share one signature, as NumPy's ufunc loops do:
 *     void loop(char *const *p, const ptrdiff_t *s, ptrdiff_t n)
 * p[k] points at the first element of operand k (inputs, then the output),
 * s[k] is its stride in elements (0 for a broadcast scalar). The contiguous
 * cases the API produces (all strides 1; one input a scalar) get loops of
 * their own, with an in-place twin when the output is the input: the
 * out-of-place twin is `restrict`-qualified so it vectorizes without a
 * run-time alias check, and the in-place one reads and writes one pointer.
 *
 * NaN and signed zeros follow TensorFlow's CPU kernels:
 *     maximum(a, b) = b if b is NaN, else (a < b ? b : a)
 *     minimum(a, b) = b if b is NaN, else (b < a ? b : a)
 * so NaN in either operand gives NaN and of two equal zeros the first wins.
 * clip_by_value(x, lo, hi) = maximum(minimum(x, hi), lo), as TF composes it.
 *
 * The per-axis loops (cc_axis.h) scale with the multiply loops here.
 */
#ifndef CLIPCORE_CC_ELEMENTWISE_H
#define CLIPCORE_CC_ELEMENTWISE_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>

#include "cc_platform.h"
#include "cc_scale.h"

/* Element types with kernels; anything else goes through NumPy. */
enum { CC_F32 = 0, CC_F64, CC_I8, CC_I16, CC_I32, CC_I64,
       CC_U8, CC_U16, CC_U32, CC_U64, CC_NTYPES };
/* Elementwise operations (operand counts: 3, 3, 4, 3). */
enum { CC_OP_MAX = 0, CC_OP_MIN, CC_OP_CLIP, CC_OP_MUL, CC_NOPS };

typedef void (*cc_loop_fn)(char *const *p, const ptrdiff_t *s, ptrdiff_t n);

#define CC_NAN_FLOAT(v) ((v) != (v))
#define CC_NAN_INT(v) 0
#define CC_MAXV(a, b, ISNAN) (ISNAN(b) ? (b) : ((a) < (b) ? (b) : (a)))
#define CC_MINV(a, b, ISNAN) (ISNAN(b) ? (b) : ((b) < (a) ? (b) : (a)))

/* maximum / minimum of two operands. */
#define CC_DEFINE_MINMAX(NAME, T, OPV, ISNAN)                                   \
CC_CLONES static void NAME##_vv(const T *CC_RESTRICT a, const T *CC_RESTRICT b,  \
                                T *CC_RESTRICT o, ptrdiff_t n) {                 \
    for (ptrdiff_t i = 0; i < n; i++) o[i] = OPV(a[i], b[i], ISNAN); }           \
CC_CLONES static void NAME##_vv_ina(T *a, const T *b, ptrdiff_t n) {             \
    for (ptrdiff_t i = 0; i < n; i++) a[i] = OPV(a[i], b[i], ISNAN); }           \
CC_CLONES static void NAME##_vv_inb(const T *a, T *b, ptrdiff_t n) {             \
    for (ptrdiff_t i = 0; i < n; i++) b[i] = OPV(a[i], b[i], ISNAN); }           \
CC_CLONES static void NAME##_vs(const T *CC_RESTRICT a, T b, T *CC_RESTRICT o,   \
                                ptrdiff_t n) {                                   \
    CC_FOR_PREFETCHED(T, a, n, o[i] = OPV(a[i], b, ISNAN)) }                     \
CC_CLONES static void NAME##_vs_in(T *a, T b, ptrdiff_t n) {                     \
    CC_FOR_PREFETCHED(T, a, n, a[i] = OPV(a[i], b, ISNAN)) }                     \
CC_CLONES static void NAME##_sv(T a, const T *CC_RESTRICT b, T *CC_RESTRICT o,   \
                                ptrdiff_t n) {                                   \
    for (ptrdiff_t i = 0; i < n; i++) o[i] = OPV(a, b[i], ISNAN); }              \
CC_CLONES static void NAME##_sv_in(T a, T *b, ptrdiff_t n) {                     \
    for (ptrdiff_t i = 0; i < n; i++) b[i] = OPV(a, b[i], ISNAN); }              \
static void NAME(char *const *p, const ptrdiff_t *s, ptrdiff_t n) {             \
    const T *a = (const T *)p[0], *b = (const T *)p[1];                          \
    T *o = (T *)p[2];                                                            \
    const ptrdiff_t sa = s[0], sb = s[1], so = s[2];                             \
    if (so == 1 && sa == 1 && sb == 1) {                                         \
        if (o == a) NAME##_vv_ina(o, b, n);                                      \
        else if (o == b) NAME##_vv_inb(a, o, n);                                 \
        else NAME##_vv(a, b, o, n);                                              \
    } else if (so == 1 && sa == 1 && sb == 0) {                                  \
        if (o == a) NAME##_vs_in(o, *b, n); else NAME##_vs(a, *b, o, n);         \
    } else if (so == 1 && sa == 0 && sb == 1) {                                  \
        if (o == b) NAME##_sv_in(*a, o, n); else NAME##_sv(*a, b, o, n);         \
    } else {                                                                     \
        for (ptrdiff_t i = 0; i < n; i++)                                        \
            o[i * so] = OPV(a[i * sa], b[i * sb], ISNAN);                        \
    }                                                                            \
}

/* clip_by_value: x, lo, hi -> o. With scalar bounds (the common case) a NaN
 * bound makes every element NaN, so the loop itself needs no NaN test and
 * compiles to min/max instructions. */
#define CC_DEFINE_CLIP(NAME, T, ISNAN)                                          \
CC_CLONES static void NAME##_ss(const T *CC_RESTRICT x, T lo, T hi,              \
                                T *CC_RESTRICT o, ptrdiff_t n) {                 \
    CC_FOR_PREFETCHED(T, x, n, T v = x[i]; v = hi < v ? hi : v;                  \
                               o[i] = v < lo ? lo : v) }                         \
CC_CLONES static void NAME##_ss_in(T *x, T lo, T hi, ptrdiff_t n) {              \
    CC_FOR_PREFETCHED(T, x, n, T v = x[i]; v = hi < v ? hi : v;                  \
                               x[i] = v < lo ? lo : v) }                         \
static void NAME(char *const *p, const ptrdiff_t *s, ptrdiff_t n) {             \
    const T *x = (const T *)p[0], *lo = (const T *)p[1], *hi = (const T *)p[2];  \
    T *o = (T *)p[3];                                                            \
    const ptrdiff_t sx = s[0], sl = s[1], sh = s[2], so = s[3];                  \
    if (sl == 0 && sh == 0 && !ISNAN(*lo) && !ISNAN(*hi)) {                      \
        const T l = *lo, h = *hi;                                                \
        if (sx == 1 && so == 1) {                                                \
            if (o == x) NAME##_ss_in(o, l, h, n); else NAME##_ss(x, l, h, o, n); \
        } else {                                                                 \
            for (ptrdiff_t i = 0; i < n; i++) {                                  \
                T v = x[i * sx]; v = h < v ? h : v; o[i * so] = v < l ? l : v; } \
        }                                                                        \
        return;                                                                  \
    }                                                                            \
    for (ptrdiff_t i = 0; i < n; i++) {                                          \
        T v = CC_MINV(x[i * sx], hi[i * sh], ISNAN);                             \
        o[i * so] = CC_MAXV(v, lo[i * sl], ISNAN);                               \
    }                                                                            \
}

/* o = x * s (floating types): the scaling pass of the norm clips. */
#define CC_DEFINE_MUL(NAME, T)                                                  \
CC_CLONES static void NAME##_vs(const T *CC_RESTRICT x, T s, T *CC_RESTRICT o,   \
                                ptrdiff_t n) {                                   \
    CC_FOR_PREFETCHED(T, x, n, o[i] = x[i] * s) }                                \
CC_CLONES static void NAME##_vs_in(T *x, T s, ptrdiff_t n) {                     \
    CC_FOR_PREFETCHED(T, x, n, x[i] *= s) }                                      \
CC_CLONES static void NAME##_vv(const T *CC_RESTRICT x, const T *CC_RESTRICT s,  \
                                T *CC_RESTRICT o, ptrdiff_t n) {                 \
    for (ptrdiff_t i = 0; i < n; i++) o[i] = x[i] * s[i]; }                      \
CC_CLONES static void NAME##_vv_in(T *x, const T *CC_RESTRICT s, ptrdiff_t n) {  \
    for (ptrdiff_t i = 0; i < n; i++) x[i] *= s[i]; }                            \
static void NAME(char *const *p, const ptrdiff_t *s, ptrdiff_t n) {             \
    const T *x = (const T *)p[0], *f = (const T *)p[1];                          \
    T *o = (T *)p[2];                                                            \
    const ptrdiff_t sx = s[0], sf = s[1], so = s[2];                             \
    if (sx == 1 && so == 1 && sf == 0) {                                         \
        if (o == x) NAME##_vs_in(o, *f, n); else NAME##_vs(x, *f, o, n);         \
    } else if (sx == 1 && so == 1 && sf == 1 && o != f) {                        \
        if (o == x) NAME##_vv_in(o, f, n); else NAME##_vv(x, f, o, n);           \
    } else {                                                                     \
        for (ptrdiff_t i = 0; i < n; i++) o[i * so] = x[i * sx] * f[i * sf];     \
    }                                                                            \
}

#define CC_DEFINE_ALL(SUF, T, ISNAN)                                            \
    CC_DEFINE_MINMAX(cc_max_##SUF, T, CC_MAXV, ISNAN)                           \
    CC_DEFINE_MINMAX(cc_min_##SUF, T, CC_MINV, ISNAN)                           \
    CC_DEFINE_CLIP(cc_clip_##SUF, T, ISNAN)

CC_DEFINE_ALL(f32, float, CC_NAN_FLOAT)
CC_DEFINE_ALL(f64, double, CC_NAN_FLOAT)
CC_DEFINE_ALL(i8, int8_t, CC_NAN_INT)
CC_DEFINE_ALL(i16, int16_t, CC_NAN_INT)
CC_DEFINE_ALL(i32, int32_t, CC_NAN_INT)
CC_DEFINE_ALL(i64, int64_t, CC_NAN_INT)
CC_DEFINE_ALL(u8, uint8_t, CC_NAN_INT)
CC_DEFINE_ALL(u16, uint16_t, CC_NAN_INT)
CC_DEFINE_ALL(u32, uint32_t, CC_NAN_INT)
CC_DEFINE_ALL(u64, uint64_t, CC_NAN_INT)
CC_DEFINE_MUL(cc_mul_f32, float)
CC_DEFINE_MUL(cc_mul_f64, double)

#define CC_ROW(SUF) { cc_max_##SUF, cc_min_##SUF, cc_clip_##SUF, NULL }
static const cc_loop_fn cc_loops[CC_NTYPES][CC_NOPS] = {
    { cc_max_f32, cc_min_f32, cc_clip_f32, cc_mul_f32 },
    { cc_max_f64, cc_min_f64, cc_clip_f64, cc_mul_f64 },
    CC_ROW(i8), CC_ROW(i16), CC_ROW(i32), CC_ROW(i64),
    CC_ROW(u8), CC_ROW(u16), CC_ROW(u32), CC_ROW(u64),
};
#undef CC_ROW

CC_UNUSED static inline cc_loop_fn cc_get_loop(int tcode, int op) {
    if (tcode < 0 || tcode >= CC_NTYPES || op < 0 || op >= CC_NOPS) return NULL;
    return cc_loops[tcode][op];
}

/* ---- AVX-512 twins of the float loops: streaming, for large outputs, and in place. ----
 * An output written with ordinary stores is first read into the cache (each
 * store that misses fetches its line): a third memory pass besides reading
 * the input and writing the output. For an output too large to stay in the
 * cache, AVX-512 streaming stores skip that read. A twin takes the contiguous
 * case with scalar operands (x, then scalars, then o, o not x), where the
 * packed instructions give exactly the plain loop's results (see the NaN and
 * zero rules above: with a scalar that is not NaN, maximum(x, b) is
 * max_ps(b, x) and minimum(x, b) is min_ps(b, x), which return x when x is
 * NaN or equal to b); anything else goes to the plain loop. The in-place
 * twins take the same case with o == x. */
#ifdef CC_AVX512_PATHS
/* o[i] = OPV(x[i]) for n elements: plain stores up to o's 64-byte boundary
 * and for the tail, streaming stores between; fenced so the data are in
 * memory order before another thread reads them. */
#define CC_DEFINE_STREAM_BODY(NAME, T, VT, W, SET1, LOADU, STREAM, OPS, OPV)    \
CC_AVX512 static void NAME(const T *x, T a, T b, T *o, ptrdiff_t n) {          \
    ptrdiff_t i = 0;                                                            \
    const VT va = SET1(a), vb = SET1(b);                                        \
    (void)va;                                                                   \
    for (; i < n && ((uintptr_t)(o + i) & 63); i++) o[i] = OPS(x[i]);           \
    for (; i + W <= n; i += W) {                                                \
        CC_PREFETCH_LINE(x + i)                                                 \
        STREAM(o + i, OPV(LOADU(x + i))); }                                     \
    for (; i < n; i++) o[i] = OPS(x[i]);                                        \
    _mm_sfence();                                                               \
}
#define CC_MAX_S(v) ((v) < b ? b : (v))          /* CC_MAXV(x, b) for b not NaN */
#define CC_MIN_S(v) (b < (v) ? b : (v))          /* CC_MINV(x, b) for b not NaN */
#define CC_CLIP_S(v) (a > (b < (v) ? b : (v)) ? a : (b < (v) ? b : (v)))   /* a=lo, b=hi */
#define CC_MAX_V32(v) _mm512_max_ps(vb, v)
#define CC_MIN_V32(v) _mm512_min_ps(vb, v)
#define CC_CLIP_V32(v) _mm512_max_ps(va, _mm512_min_ps(vb, v))
#define CC_MAX_V64(v) _mm512_max_pd(vb, v)
#define CC_MIN_V64(v) _mm512_min_pd(vb, v)
#define CC_CLIP_V64(v) _mm512_max_pd(va, _mm512_min_pd(vb, v))
#define CC_DEFINE_STREAM_BODIES(SUF, T, VT, W, SET1, LOADU, STREAM, V)          \
    CC_DEFINE_STREAM_BODY(cc_max_##SUF##_nt, T, VT, W, SET1, LOADU, STREAM, CC_MAX_S, CC_MAX_##V) \
    CC_DEFINE_STREAM_BODY(cc_min_##SUF##_nt, T, VT, W, SET1, LOADU, STREAM, CC_MIN_S, CC_MIN_##V) \
    CC_DEFINE_STREAM_BODY(cc_clip_##SUF##_nt, T, VT, W, SET1, LOADU, STREAM, CC_CLIP_S, CC_CLIP_##V) \
    CC_DEFINE_STREAM_BODY(cc_mul_##SUF##_nt, T, VT, W, SET1, LOADU, STREAM, CC_MUL_S, CC_MUL_##V)
CC_DEFINE_STREAM_BODIES(f32, float, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_stream_ps, V32)
CC_DEFINE_STREAM_BODIES(f64, double, __m512d, 8, _mm512_set1_pd, _mm512_loadu_pd, _mm512_stream_pd, V64)
/* In-place twins (cc_mul_*_in lives in cc_scale.h, beside the scaling pass). */
#define CC_DEFINE_IN_PLACE(SUF, T, VT, W, SET1, LOADU, STOREU, V)               \
    CC_DEFINE_PACKED_IN_PLACE(cc_max_##SUF##_in, T, VT, W, SET1, LOADU, STOREU, CC_MAX_S, CC_MAX_##V) \
    CC_DEFINE_PACKED_IN_PLACE(cc_min_##SUF##_in, T, VT, W, SET1, LOADU, STOREU, CC_MIN_S, CC_MIN_##V) \
    CC_DEFINE_PACKED_IN_PLACE(cc_clip_##SUF##_in, T, VT, W, SET1, LOADU, STOREU, CC_CLIP_S, CC_CLIP_##V)
CC_DEFINE_IN_PLACE(f32, float, __m512, 16, _mm512_set1_ps, _mm512_loadu_ps, _mm512_storeu_ps, V32)
CC_DEFINE_IN_PLACE(f64, double, __m512d, 8, _mm512_set1_pd, _mm512_loadu_pd, _mm512_storeu_pd, V64)

/* The twins' dispatchers, with the loop signature: in place, the in-place
 * twin; out of place, the streaming twin (NT 1) or the plain loop (NT 0); the
 * plain loop too when the case or the CPU does not fit: a NaN scalar (whose
 * NaN rules the packed max/min do not follow), strides, another CPU.
 * Operands: max/min/mul (x, s, o), clip (x, lo, hi, o). */
#define CC_DEFINE_PACKED_VS(NAME, T, SUFFIX, NT)                                \
static void NAME##SUFFIX(char *const *p, const ptrdiff_t *s, ptrdiff_t n) {    \
    const T b = *(const T *)p[1];                                               \
    if (s[0] == 1 && s[1] == 0 && s[2] == 1 && b == b && cc_avx512_usable()) {  \
        if (p[2] == p[0]) { NAME##_in((T *)p[2], 0, b, n); return; }          \
        if (NT) { NAME##_nt((const T *)p[0], 0, b, (T *)p[2], n); return; }    \
    }                                                                           \
    NAME(p, s, n); }
#define CC_DEFINE_PACKED_CLIP(SUF, T, SUFFIX, NT)                               \
static void cc_clip_##SUF##SUFFIX(char *const *p, const ptrdiff_t *s, ptrdiff_t n) { \
    const T lo = *(const T *)p[1], hi = *(const T *)p[2];                       \
    if (s[0] == 1 && s[1] == 0 && s[2] == 0 && s[3] == 1 && lo == lo && hi == hi \
            && cc_avx512_usable()) {                                            \
        if (p[3] == p[0]) { cc_clip_##SUF##_in((T *)p[3], lo, hi, n); return; } \
        if (NT) { cc_clip_##SUF##_nt((const T *)p[0], lo, hi, (T *)p[3], n); return; } \
    }                                                                           \
    cc_clip_##SUF(p, s, n); }
#define CC_DEFINE_PACKED(SUF, T, SUFFIX, NT)                                    \
CC_DEFINE_PACKED_VS(cc_max_##SUF, T, SUFFIX, NT)                                \
CC_DEFINE_PACKED_VS(cc_min_##SUF, T, SUFFIX, NT)                                \
CC_DEFINE_PACKED_VS(cc_mul_##SUF, T, SUFFIX, NT)                                \
CC_DEFINE_PACKED_CLIP(SUF, T, SUFFIX, NT)
CC_DEFINE_PACKED(f32, float, _stream, 1)
CC_DEFINE_PACKED(f64, double, _stream, 1)
CC_DEFINE_PACKED(f32, float, _packed, 0)
CC_DEFINE_PACKED(f64, double, _packed, 0)
#define CC_ROW(SUF, SUFFIX) { cc_max_##SUF##SUFFIX, cc_min_##SUF##SUFFIX,           \
                              cc_clip_##SUF##SUFFIX, cc_mul_##SUF##SUFFIX }
static const cc_loop_fn cc_stream_loops[2][CC_NOPS] = { CC_ROW(f32, _stream), CC_ROW(f64, _stream) };
static const cc_loop_fn cc_packed_loops[2][CC_NOPS] = { CC_ROW(f32, _packed), CC_ROW(f64, _packed) };
#undef CC_ROW
#endif

/* The loop for an output of out_bytes bytes (in place or not): for the float
 * types the twins' dispatcher, streaming when the output is at least
 * CC_STREAM_MIN_BYTES, more than a large L3 cache keeps for its next use (a
 * smaller output stays in the cache). Callers decide by the whole output: a
 * call sees one chunk. Each table is indexed on its own, so that a caller
 * with constant tcode and op gets just that loop's address, and a module that
 * asks for one loop does not carry every loop of the tables. */
#define CC_STREAM_MIN_BYTES ((ptrdiff_t)1 << 24)
CC_UNUSED static inline cc_loop_fn cc_get_loop_for(int tcode, int op, ptrdiff_t out_bytes) {
#ifdef CC_AVX512_PATHS
    if ((tcode == CC_F32 || tcode == CC_F64) && op >= 0 && op < CC_NOPS)
        return out_bytes >= CC_STREAM_MIN_BYTES ? cc_stream_loops[tcode][op]
                                                : cc_packed_loops[tcode][op];
#else
    (void)out_bytes;
#endif
    return cc_get_loop(tcode, op);
}

#endif
