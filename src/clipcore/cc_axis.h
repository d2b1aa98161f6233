/* Inner loops of clipcore's per-axis kernels (clipcore._elementwise's
 * axis_reduce / axis_clip), in plain C so the compiler vectorizes them:
 * reductions over the middle axis of a 3-d view (A, R, B), reducing R, and
 * clip_by_norm over it.
 *
 * Kinds are cc_reduce.h's CC_SUMSQ, CC_SUMABS, CC_MAXABS, all in float64
 * (maxima NaN-propagating). Rows shorter than CC_SHORT_ROW are summed
 * serially; longer ones by cc_reduce_* (CC_LANES float64 lanes). Which one
 * runs depends on the shape only, so results never depend on threads. The
 * scaling goes through cc_elementwise.h's multiply loops.
 */
#ifndef CLIPCORE_CC_AXIS_H
#define CLIPCORE_CC_AXIS_H

#include <stddef.h>
#include <math.h>

#include "cc_platform.h"
#include "cc_reduce.h"
#include "cc_elementwise.h"

#define CC_SHORT_ROW 32

/* The per-slice scale of clip_by_norm: clip / max(norm, clip), with
 * TensorFlow's NaN-propagating maximum (0/0 and inf/inf give NaN, as TF's
 * x * clip / max(norm, clip) does). clip is >= 0 or NaN. */
static inline double cc_norm_scale(double sumsq, double clip) {
    double norm = sqrt(sumsq);
    double m = (norm != norm || clip != clip) ? NAN : (norm < clip ? clip : norm);
    return clip / m;
}

#define CC_DEFINE_AXIS(SUF, T)                                                  \
/* One row: n elements, stride s. */                                            \
static inline double cc_row_reduce_##SUF(const T *x, ptrdiff_t n, ptrdiff_t s, int kind) { \
    if (n >= CC_SHORT_ROW) return cc_reduce_one_##SUF(x, n, s, kind, 1.0, 1.0);     \
    double acc = 0.0;                                                           \
    for (ptrdiff_t i = 0; i < n; i++) {                                         \
        double v = fabs((double)x[i * s]);                                      \
        if (kind == CC_SUMSQ) acc += v * v;                                     \
        else if (kind == CC_SUMABS) acc += v;                                   \
        else acc = (v > acc || v != v) ? v : acc;                               \
    }                                                                           \
    return acc;                                                                 \
}                                                                               \
/* res[a] = reduction of row a, for nrows rows. */                              \
CC_UNUSED static void cc_rows_reduce_##SUF(const T *x, ptrdiff_t nrows, ptrdiff_t sa,     \
                                 ptrdiff_t n, ptrdiff_t s, int kind, double *res) { \
    for (ptrdiff_t a = 0; a < nrows; a++)                                       \
        res[a] = cc_row_reduce_##SUF(x + a * sa, n, s, kind);                   \
}                                                                               \
/* clip_by_norm of nrows rows, each reduced then scaled while it is in cache. */ \
CC_UNUSED static void cc_rows_clip_##SUF(const T *x, ptrdiff_t nrows, ptrdiff_t sa,       \
                               ptrdiff_t n, ptrdiff_t s, T *o, ptrdiff_t oa,    \
                               ptrdiff_t os, double clip) {                     \
    for (ptrdiff_t a = 0; a < nrows; a++) {                                     \
        const T *xr = x + a * sa;                                               \
        T *orow = o + a * oa;                                                   \
        T f = (T)cc_norm_scale(cc_row_reduce_##SUF(xr, n, s, CC_SUMSQ), clip);  \
        char *p[3] = { (char *)xr, (char *)&f, (char *)orow };                  \
        ptrdiff_t st[3] = { s, 0, os };                                         \
        cc_mul_##SUF(p, st, n);                                                 \
    }                                                                           \
}                                                                               \
/* acc[b] (b < nb) accumulates nr rows (stride sr) of nb elements (stride sb).  \
 * Contiguous rows are taken four at a time (their terms added pairwise, then  \
 * to acc): a quarter of the accumulator traffic. */                           \
CC_CLONES CC_UNUSED static void cc_cols_reduce_##SUF(const T *x, ptrdiff_t nr, ptrdiff_t sr, \
                                           ptrdiff_t nb, ptrdiff_t sb, int kind, \
                                           double *CC_RESTRICT acc) {           \
    ptrdiff_t r = 0;                                                            \
    if (sb == 1 && kind == CC_SUMSQ) {                                          \
        for (; r + 4 <= nr; r += 4) {                                           \
            const T *x0 = x + r * sr, *x1 = x0 + sr, *x2 = x1 + sr, *x3 = x2 + sr; \
            for (ptrdiff_t b = 0; b < nb; b++) {                                \
                double v0 = (double)x0[b], v1 = (double)x1[b];                  \
                double v2 = (double)x2[b], v3 = (double)x3[b];                  \
                acc[b] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3); }          \
        }                                                                       \
    } else if (sb == 1 && kind == CC_SUMABS) {                                  \
        for (; r + 4 <= nr; r += 4) {                                           \
            const T *x0 = x + r * sr, *x1 = x0 + sr, *x2 = x1 + sr, *x3 = x2 + sr; \
            for (ptrdiff_t b = 0; b < nb; b++)                                  \
                acc[b] += (fabs((double)x0[b]) + fabs((double)x1[b]))           \
                          + (fabs((double)x2[b]) + fabs((double)x3[b]));        \
        }                                                                       \
    }                                                                           \
    for (; r < nr; r++) {                                                       \
        const T *xr = x + r * sr;                                               \
        if (sb == 1) {                                                          \
            if (kind == CC_SUMSQ)                                               \
                for (ptrdiff_t b = 0; b < nb; b++) {                            \
                    double v = (double)xr[b]; acc[b] += v * v; }                \
            else if (kind == CC_SUMABS)                                         \
                for (ptrdiff_t b = 0; b < nb; b++) acc[b] += fabs((double)xr[b]); \
            else                                                                \
                for (ptrdiff_t b = 0; b < nb; b++) {                            \
                    double v = fabs((double)xr[b]);                             \
                    acc[b] = (v > acc[b] || v != v) ? v : acc[b]; }             \
        } else {                                                                \
            for (ptrdiff_t b = 0; b < nb; b++) {                                \
                double v = fabs((double)xr[b * sb]);                            \
                if (kind == CC_SUMSQ) acc[b] += v * v;                          \
                else if (kind == CC_SUMABS) acc[b] += v;                        \
                else acc[b] = (v > acc[b] || v != v) ? v : acc[b];              \
            }                                                                   \
        }                                                                       \
    }                                                                           \
}                                                                               \
/* o[r, b] = x[r, b] * f[b] for nr rows of nb elements. */                      \
CC_UNUSED static void cc_cols_scale_##SUF(const T *x, ptrdiff_t nr, ptrdiff_t sr, ptrdiff_t sb, \
                                const T *f, ptrdiff_t nb, T *o, ptrdiff_t osr,  \
                                ptrdiff_t osb) {                                \
    ptrdiff_t st[3] = { sb, 1, osb };                                           \
    for (ptrdiff_t r = 0; r < nr; r++) {                                        \
        char *p[3] = { (char *)(x + r * sr), (char *)f, (char *)(o + r * osr) }; \
        cc_mul_##SUF(p, st, nb);                                                \
    }                                                                           \
}

CC_DEFINE_AXIS(f32, float)
CC_DEFINE_AXIS(f64, double)

#endif
