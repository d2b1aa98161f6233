"""Weighted sums over a leading batch axis: ``out[k][j] = sum_i w[i] * x[k][i, j]``.

The kernel of per-example clipping (clipcore._per_example): each x[k] is a
2-d (B, N_k) view, each out[k] a 1-d (N_k,) view. The columns of all the
arrays are cut into tiles of up to TILE columns of one array; a tile's float64
sums stay in L1 while its rows are read in order, i = 0..B-1 (four at a time,
their terms added pairwise: an order that depends on B only). Threads claim
whole tiles (kernels.run_claimed), so every output element is one thread's
sum in one fixed order: the results are the same bits for any thread count.

Also here: the argument parsers of _lists, for the Python layer (they are
cdef functions, so Python reaches them through this module).
"""
from cython.parallel cimport parallel
from libc.stdlib cimport malloc, free
cimport numpy as cnp

from clipcore.kernels cimport (resolve_threads, Claims, claims_new, run_claimed, note_wait,
                               tuning_table, cc_team_rank, cc_team_size, cc_now)
from clipcore._lists cimport as_tuple, as_real, collect

cnp.import_array()

cdef extern from "cc_loops.h" nogil:
    void cc_use_tuning(int *table)

cdef extern from "cc_elementwise.h" nogil:     # CC_RESTRICT
    int CC_F32

cc_use_tuning(tuning_table())       # the kernels module's choices (cc_loops.h)

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
    TILE = 2048        # columns per tile: 16 KB of float64 sums, in L1 beside the rows

ctypedef struct WsPart:
    char *x                 # x[0, 0]
    char *o                 # out[0]
    Py_ssize_t n            # columns
    Py_ssize_t sr, sb, so   # strides in elements: x's rows and columns, out's
    Py_ssize_t first        # index of the part's first tile
    bint f64

ctypedef struct WsJob:
    WsPart *parts
    Py_ssize_t n_parts, n_tiles, B
    const double *w
    double *scratch         # TILE doubles per thread of the team
    bint accumulate         # add to out's values instead of overwriting them


cdef void ws_tile(const void *ctx, Py_ssize_t t) noexcept nogil:
    """Tile t: its columns' weighted sums, written to out in its dtype."""
    cdef const WsJob *j = <const WsJob *>ctx
    cdef Py_ssize_t lo = 0, hi = j.n_parts - 1, mid, b0, nb, b
    cdef const WsPart *p
    cdef double *acc = j.scratch + cc_team_rank() * TILE
    while lo < hi:                          # the part holding tile t
        mid = (lo + hi + 1) // 2
        if j.parts[mid].first <= t:
            lo = mid
        else:
            hi = mid - 1
    p = &j.parts[lo]
    b0 = (t - p.first) * TILE
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


cdef int ws_run(WsJob *j, int nt) noexcept nogil:
    """Every tile, on nt threads claiming tiles; -1 when out of memory."""
    cdef Claims *cl = NULL
    cdef Py_ssize_t t
    cdef double t_start, t_free = 0.0
    cdef double *free_at = &t_free
    if nt > j.n_tiles:
        nt = <int>j.n_tiles
    if nt > 1:
        cl = claims_new(j.n_tiles)
    if cl == NULL:
        nt = 1
    j.scratch = <double *>malloc(nt * TILE * sizeof(double))
    if j.scratch == NULL:
        free(cl)
        return -1
    if nt == 1:
        for t in range(j.n_tiles):
            ws_tile(j, t)
    else:
        t_start = cc_now()
        with parallel(num_threads=nt):
            run_claimed(cl, j.n_tiles, ws_tile, j, cc_team_rank(), cc_team_size())
            if cc_team_rank() == 0:
                free_at[0] = cc_now()
        note_wait(cc_now() - t_free, cc_now() - t_start)
    free(cl)
    free(j.scratch)
    return 0


def weighted_sum(list xs, const double[::1] w, list outs, bint accumulate, int n_threads):
    """outs[k][j] = sum_i w[i] * xs[k][i, j] (plus outs[k][j] itself with accumulate).

    xs[k]: 2-d (B, N_k) aligned native float32/float64 views, any strides;
    outs[k]: 1-d (N_k,) views of xs[k]'s dtype, writable, overlapping no xs.
    The caller (clipcore._per_example) has checked all that; B > 0.
    """
    cdef Py_ssize_t K = len(xs), k, total = 0, itemsize
    cdef Py_ssize_t B = w.shape[0]
    cdef cnp.ndarray x, o
    cdef WsJob job
    cdef int nt, rc
    if B == 0 or K == 0:
        return
    job.parts = <WsPart *>malloc(K * sizeof(WsPart))
    if job.parts == NULL:
        raise MemoryError()
    try:
        job.n_parts = 0
        job.n_tiles = 0
        for k in range(K):
            x = <cnp.ndarray>xs[k]
            o = <cnp.ndarray>outs[k]
            if cnp.PyArray_DIM(x, 1) == 0:
                continue
            itemsize = cnp.PyArray_ITEMSIZE(x)
            job.parts[job.n_parts].x = <char *>cnp.PyArray_DATA(x)
            job.parts[job.n_parts].o = <char *>cnp.PyArray_DATA(o)
            job.parts[job.n_parts].n = cnp.PyArray_DIM(x, 1)
            job.parts[job.n_parts].sr = cnp.PyArray_STRIDE(x, 0) // itemsize
            job.parts[job.n_parts].sb = cnp.PyArray_STRIDE(x, 1) // itemsize
            job.parts[job.n_parts].so = cnp.PyArray_STRIDE(o, 0) // itemsize
            job.parts[job.n_parts].f64 = cnp.PyArray_TYPE(x) == cnp.NPY_DOUBLE
            job.parts[job.n_parts].first = job.n_tiles
            job.n_tiles += (cnp.PyArray_DIM(x, 1) + TILE - 1) // TILE
            total += cnp.PyArray_DIM(x, 1)
            job.n_parts += 1
        if job.n_parts == 0:
            return
        job.B = B
        job.w = &w[0]
        job.accumulate = accumulate
        nt = resolve_threads(total * B, n_threads)
        with nogil:
            rc = ws_run(&job, nt)
        if rc != 0:
            raise MemoryError()
    finally:
        free(job.parts)


def list_arg(obj, str name):
    """obj as a tuple: a list or tuple (or other sequence) of arrays, as _lists takes them."""
    return as_tuple(obj, name)


def real_arg(value, str name):
    """A real number as a float, with _lists' checks and messages."""
    return as_real(value, name)


def writable_list(obj, str name):
    """The arrays of a list of buffers to write, validated as the in-place ops
    validate theirs (floating-point, writable, not overlapping themselves or
    each other; None entries stay None). Nothing is written."""
    return collect(obj, True, name).arrays
