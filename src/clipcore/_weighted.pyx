"""Weighted sums over a leading batch axis: ``out[k][j] = sum_i w[i] * x[k][i, j]``.

The kernel of per-example clipping (clipcore._per_example): each x[k] is a
2-d (B, N_k) view, each out[k] a 1-d (N_k,) view. The columns of all the
arrays are cut into tiles of up to TILE columns of one array; a tile's float64
sums stay in L2 while its rows are read in order, i = 0..B-1 (four at a time,
their terms added pairwise: an order that depends on B only). Threads claim
whole tiles (kernels.run_items), so every output element is one thread's
sum in one fixed order: the results are the same bits for any thread count.
"""
from libc.stdlib cimport malloc, free
cimport numpy as cnp

from clipcore.kernels cimport resolve_threads, run_holding, run_items, chunk_fn, tuning_table
from clipcore._loops cimport cc_team_rank, cc_use_tuning

cnp.import_array()

cdef extern from "cc_reduce.h" nogil:
    int CC_SUMSQ
    double cc_reduce_one_f32(const float *x, Py_ssize_t n, Py_ssize_t stride, int kind,
                             double p, double scale)
    double cc_reduce_one_f64(const double *x, Py_ssize_t n, Py_ssize_t stride, int kind,
                             double p, double scale)

cc_use_tuning(tuning_table())       # the kernels module's choices (cc_platform.h)

cdef extern from * nogil:
    """
    /* acc[b] += sum over rows i < B of w[i] * x[i * sr + b * sb], for b < nb.
     * Contiguous rows four at a time: a quarter of the accumulator traffic. */
    #define CC_DEFINE_WSUM(SUF, T)                                              \\
    CC_CLONES CC_UNUSED static void cc_wsum_rows_##SUF(                         \\
            const T *x, ptrdiff_t B, ptrdiff_t sr, ptrdiff_t sb, const double *w, \\
            ptrdiff_t nb, double *CC_RESTRICT acc) {                            \\
        ptrdiff_t i = 0;                                                        \\
        if (sb == 1) {                                                          \\
            for (; i + 4 <= B; i += 4) {                                        \\
                const T *x0 = x + i * sr, *x1 = x0 + sr, *x2 = x1 + sr, *x3 = x2 + sr; \\
                const double w0 = w[i], w1 = w[i + 1], w2 = w[i + 2], w3 = w[i + 3]; \\
                for (ptrdiff_t b = 0; b < nb; b++)                              \\
                    acc[b] += (w0 * (double)x0[b] + w1 * (double)x1[b])         \\
                              + (w2 * (double)x2[b] + w3 * (double)x3[b]);      \\
            }                                                                   \\
        }                                                                       \\
        for (; i < B; i++) {                                                    \\
            const T *xr = x + i * sr;                                           \\
            const double wi = w[i];                                             \\
            for (ptrdiff_t b = 0; b < nb; b++) acc[b] += wi * (double)xr[b * sb]; \\
        }                                                                       \\
    }
    CC_DEFINE_WSUM(f32, float)
    CC_DEFINE_WSUM(f64, double)
    """
    void cc_wsum_rows_f32(const float *x, Py_ssize_t B, Py_ssize_t sr, Py_ssize_t sb,
                          const double *w, Py_ssize_t nb, double *acc)
    void cc_wsum_rows_f64(const double *x, Py_ssize_t B, Py_ssize_t sr, Py_ssize_t sb,
                          const double *w, Py_ssize_t nb, double *acc)

cdef enum:
    # Columns per tile: 64 KB of float64 sums (L2), rows read in 32 KB runs
    # (the prefetchers like long runs: wider tiles than 2048 columns are faster).
    TILE = 8192

ctypedef struct WsPart:
    char *x                 # x[0, 0]
    char *o                 # out[0]
    Py_ssize_t n            # columns
    Py_ssize_t sr, sb, so   # strides in elements: x's rows and columns, out's
    bint f64

ctypedef struct WsJob:
    WsPart *parts
    Py_ssize_t *firsts      # per part: the index of its first tile
    Py_ssize_t n_parts, n_tiles, B
    const double *w
    double *scratch         # TILE doubles per thread of the team
    bint accumulate         # add to out's values instead of overwriting them
    double *part            # row_sumsq: n_tiles x B sums of squares


cdef void ss_tile(const void *ctx, Py_ssize_t t) noexcept nogil:
    """Tile t: each row's float64 sum of squares over the tile's columns."""
    cdef const WsJob *j = <const WsJob *>ctx
    cdef Py_ssize_t k = run_holding(j.firsts, j.n_parts, t)
    cdef const WsPart *p = &j.parts[k]
    cdef Py_ssize_t b0 = (t - j.firsts[k]) * TILE, i
    cdef Py_ssize_t nb = p.n - b0 if p.n - b0 < TILE else TILE
    for i in range(j.B):
        if p.f64:
            j.part[t * j.B + i] = cc_reduce_one_f64(<double *>p.x + i * p.sr + b0 * p.sb, nb,
                                                    p.sb, CC_SUMSQ, 1.0, 1.0)
        else:
            j.part[t * j.B + i] = cc_reduce_one_f32(<float *>p.x + i * p.sr + b0 * p.sb, nb,
                                                    p.sb, CC_SUMSQ, 1.0, 1.0)


cdef void ws_tile(const void *ctx, Py_ssize_t t) noexcept nogil:
    """Tile t: its columns' weighted sums, written to out in its dtype."""
    cdef const WsJob *j = <const WsJob *>ctx
    cdef Py_ssize_t b0, nb, b
    cdef Py_ssize_t k = run_holding(j.firsts, j.n_parts, t)
    cdef const WsPart *p = &j.parts[k]
    cdef double *acc = j.scratch + cc_team_rank() * TILE
    b0 = (t - j.firsts[k]) * TILE
    nb = p.n - b0 if p.n - b0 < TILE else TILE
    if p.f64:
        for b in range(nb):
            acc[b] = (<double *>p.o)[(b0 + b) * p.so] if j.accumulate else 0.0
        cc_wsum_rows_f64(<double *>p.x + b0 * p.sb, j.B, p.sr, p.sb, j.w, nb, acc)
        for b in range(nb):
            (<double *>p.o)[(b0 + b) * p.so] = acc[b]
    else:
        for b in range(nb):
            acc[b] = (<float *>p.o)[(b0 + b) * p.so] if j.accumulate else 0.0
        cc_wsum_rows_f32(<float *>p.x + b0 * p.sb, j.B, p.sr, p.sb, j.w, nb, acc)
        for b in range(nb):
            (<float *>p.o)[(b0 + b) * p.so] = <float>acc[b]


cdef int ws_run(WsJob *j, chunk_fn fn, int nt) noexcept nogil:
    """fn over every tile, on nt threads claiming tiles; -1 when out of memory."""
    if nt > j.n_tiles:           # run_items's team: a TILE of scratch per thread
        nt = <int>j.n_tiles
    j.scratch = <double *>malloc(nt * TILE * sizeof(double))
    if j.scratch == NULL:
        return -1
    run_items(j.n_tiles, fn, j, nt)
    free(j.scratch)
    return 0


cdef int alloc_parts(WsJob *j, Py_ssize_t n) except -1:
    """Room for n parts and their first tiles, in one block (free j.parts)."""
    j.parts = <WsPart *>malloc(n * (sizeof(WsPart) + sizeof(Py_ssize_t)))
    if j.parts == NULL:
        raise MemoryError()
    j.firsts = <Py_ssize_t *>(j.parts + n)
    return 0


cdef Py_ssize_t set_parts(WsJob *j, list xs, list outs) except -1:
    """j's parts for xs (and outs, or None); returns the number of elements."""
    cdef Py_ssize_t k, total = 0, itemsize
    cdef cnp.ndarray x, o
    cdef WsPart *p
    j.n_parts = 0
    j.n_tiles = 0
    for k in range(len(xs)):
        x = <cnp.ndarray>xs[k]
        if cnp.PyArray_DIM(x, 1) == 0:
            continue
        itemsize = cnp.PyArray_ITEMSIZE(x)
        p = &j.parts[j.n_parts]
        p.x = <char *>cnp.PyArray_DATA(x)
        p.o = NULL
        p.so = 0
        if outs is not None:
            o = <cnp.ndarray>outs[k]
            p.o = <char *>cnp.PyArray_DATA(o)
            p.so = cnp.PyArray_STRIDE(o, 0) // itemsize
        p.n = cnp.PyArray_DIM(x, 1)
        p.sr = cnp.PyArray_STRIDE(x, 0) // itemsize
        p.sb = cnp.PyArray_STRIDE(x, 1) // itemsize
        p.f64 = cnp.PyArray_TYPE(x) == cnp.NPY_DOUBLE
        j.firsts[j.n_parts] = j.n_tiles
        j.n_tiles += (p.n + TILE - 1) // TILE
        total += p.n
        j.n_parts += 1
    return total


def weighted_sum(list xs, const double[::1] w, list outs, bint accumulate, int n_threads):
    """outs[k][j] = sum_i w[i] * xs[k][i, j] (plus outs[k][j] itself with accumulate).

    xs[k]: 2-d (B, N_k) aligned native float32/float64 views, any strides;
    outs[k]: 1-d (N_k,) views of xs[k]'s dtype, writable, overlapping no xs.
    The caller (clipcore._per_example) has checked all that; B > 0.
    """
    cdef Py_ssize_t B = w.shape[0], total
    cdef WsJob job
    cdef int nt, rc
    if B == 0 or len(xs) == 0:
        return
    alloc_parts(&job, len(xs))
    try:
        total = set_parts(&job, xs, outs)
        if job.n_parts == 0:
            return
        job.B = B
        job.w = &w[0]
        job.accumulate = accumulate
        nt = resolve_threads(total * B, n_threads)
        with nogil:
            rc = ws_run(&job, ws_tile, nt)
        if rc != 0:
            raise MemoryError()
    finally:
        free(job.parts)


def row_sumsq(list xs, Py_ssize_t B, int n_threads):
    """Float64 sums of squares of each row i over every xs[k][i, :] ((B, N_k) views
    as for weighted_sum): per tile and row, then added in tile order (the same
    bits for any thread count). A float64 (B,) array."""
    cdef Py_ssize_t total, t, i
    cdef WsJob job
    cdef int nt, rc
    cdef cnp.ndarray res = cnp.PyArray_ZEROS(1, [B], cnp.NPY_DOUBLE, 0)
    cdef double *r = <double *>cnp.PyArray_DATA(res)
    if B == 0 or len(xs) == 0:
        return res
    job.part = NULL
    alloc_parts(&job, len(xs))
    try:
        total = set_parts(&job, xs, None)
        if job.n_parts == 0:
            return res
        job.B = B
        job.part = <double *>malloc(job.n_tiles * B * sizeof(double))
        if job.part == NULL:
            raise MemoryError()
        nt = resolve_threads(total * B, n_threads)
        with nogil:
            rc = ws_run(&job, ss_tile, nt)
            for t in range(job.n_tiles):
                for i in range(B):
                    r[i] += job.part[t * B + i]
        if rc != 0:
            raise MemoryError()
    finally:
        free(job.parts)
        free(job.part)
    return res

