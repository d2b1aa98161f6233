"""Unit-wise norms and scaling over a list of arrays: the kernels of adaptive gradient clipping.

Each grad and its parameter are 2-d views with the same strides whose units
are the rows (PyTorch's layout: output units first) or the columns (JAX's:
units last). One team pass reads every grad and parameter once and writes
each unit's float64 reduction of both; a second pass multiplies the units
whose factor (agc_factor) is not 1. For float32 units on rows, unit_clip does
both in one pass, scaling each row while it is in cache. Work items hold whole
units (blocks of rows, tiles of columns), so each unit's sum is one thread's,
in one order: the same bits for any thread count.
"""
from libc.math cimport sqrt, isnan
from libc.stdlib cimport malloc, free
cimport numpy as cnp

from clipcore.kernels cimport (chunk_fn, resolve_threads, run_holding, run_items, tuning_table,
                               ITEM_ELEMENTS)
from clipcore._loops cimport cc_use_tuning
from clipcore._lists cimport Extent, sort_extents
from clipcore._axis cimport (cc_cols_reduce_f32, cc_cols_reduce_f64, cc_cols_scale_f32,
                             cc_cols_scale_f64)

cnp.import_array()

cdef extern from "cc_reduce.h" nogil:
    int CC_SUMSQ, CC_SUMABS, CC_MAXABS
    double cc_reduce_one_f32(const float *x, Py_ssize_t n, Py_ssize_t stride, int kind,
                             double p, double scale)
    double cc_reduce_one_f64(const double *x, Py_ssize_t n, Py_ssize_t stride, int kind,
                             double p, double scale)

cdef extern from "cc_scale.h" nogil:
    void cc_scale_f32(float *x, Py_ssize_t n, Py_ssize_t stride, double s)
    void cc_scale_f64(double *x, Py_ssize_t n, Py_ssize_t stride, double s)

cc_use_tuning(tuning_table())       # the kernels module's choices (cc_platform.h)

REDUCE_SUMSQ, REDUCE_SUMABS, REDUCE_MAXABS = CC_SUMSQ, CC_SUMABS, CC_MAXABS

cdef enum:
    COLS_TILE = 256         # columns per item when units are columns: whole cache lines

ctypedef struct UnitPart:
    char *g                 # grad[0, 0]
    char *p                 # param[0, 0] (NULL in the scale pass)
    char *f                 # the units' factors, in the arrays' dtype (scale pass)
    Py_ssize_t R, C         # rows, columns
    Py_ssize_t sr, sc       # strides in elements, the same for grad and param
    Py_ssize_t per_item     # rows (units on rows) or columns (units on columns) per item
    Py_ssize_t unit0        # index of its first unit in the norms
    bint by_cols
    bint f64

ctypedef struct UnitJob:
    UnitPart *parts
    Py_ssize_t *firsts      # per part: the index of its first item
    Py_ssize_t n_parts, n_items
    int kind
    double *gn              # per unit: the grads' reductions
    double *pn              # and the params'
    double clipping, eps    # unit_clip's AGC parameters


cdef inline double np_maximum(double a, double b) noexcept nogil:
    """NumPy's maximum: NaN when either is."""
    return a if a >= b or isnan(a) else b


cdef inline float np_maximum_f(float a, float b) noexcept nogil:
    return a if a >= b or isnan(a) else b


cdef double agc_factor(double gn, double pn, bint f64, double clipping,
                       double eps) noexcept nogil:
    """A unit's factor from its grad and param norms: 1 below the bound
    clipping * max(pn, eps), else bound / max(gn, 1e-6); in float32 unless f64
    (the arrays' dtype, as the frameworks compute it)."""
    cdef double bound
    cdef float g32, bound32
    if f64:
        bound = np_maximum(pn, eps) * clipping
        return 1.0 if gn < bound else bound / np_maximum(gn, 1e-6)
    g32 = <float>gn
    bound32 = np_maximum_f(<float>pn, <float>eps) * <float>clipping
    return 1.0 if g32 < bound32 else bound32 / np_maximum_f(g32, <float>1e-6)


cdef inline double unit_norm(double r, int kind) noexcept nogil:
    """The norm from a unit's reduction (REDUCE_*)."""
    return sqrt(r) if kind == CC_SUMSQ else r


cdef inline const UnitPart *part_at(const UnitJob *j, Py_ssize_t item,
                                   Py_ssize_t *i0) noexcept nogil:
    """The part holding item, and (in i0) the item's first row or column there."""
    cdef Py_ssize_t k = run_holding(j.firsts, j.n_parts, item)
    i0[0] = (item - j.firsts[k]) * j.parts[k].per_item
    return &j.parts[k]


cdef inline double reduce_run(const char *x, Py_ssize_t n, Py_ssize_t s, bint f64,
                              int kind) noexcept nogil:
    if f64:
        return cc_reduce_one_f64(<const double *>x, n, s, kind, 1.0, 1.0)
    return cc_reduce_one_f32(<const float *>x, n, s, kind, 1.0, 1.0)


cdef void reduce_item(const void *ctx, Py_ssize_t item) noexcept nogil:
    cdef const UnitJob *j = <const UnitJob *>ctx
    cdef Py_ssize_t i0, i, n, b
    cdef const UnitPart *q = part_at(j, item, &i0)
    cdef Py_ssize_t size = 8 if q.f64 else 4
    cdef double *gacc
    cdef double *pacc
    if not q.by_cols:
        n = min(q.per_item, q.R - i0)
        for i in range(i0, i0 + n):
            j.gn[q.unit0 + i] = reduce_run(q.g + i * q.sr * size, q.C, q.sc, q.f64, j.kind)
            j.pn[q.unit0 + i] = reduce_run(q.p + i * q.sr * size, q.C, q.sc, q.f64, j.kind)
        return
    n = min(q.per_item, q.C - i0)
    gacc = j.gn + q.unit0 + i0
    pacc = j.pn + q.unit0 + i0
    for b in range(n):
        gacc[b] = 0.0
        pacc[b] = 0.0
    if q.f64:
        cc_cols_reduce_f64(<double *>(q.g + i0 * q.sc * size), q.R, q.sr, n, q.sc, j.kind, gacc)
        cc_cols_reduce_f64(<double *>(q.p + i0 * q.sc * size), q.R, q.sr, n, q.sc, j.kind, pacc)
    else:
        cc_cols_reduce_f32(<float *>(q.g + i0 * q.sc * size), q.R, q.sr, n, q.sc, j.kind, gacc)
        cc_cols_reduce_f32(<float *>(q.p + i0 * q.sc * size), q.R, q.sr, n, q.sc, j.kind, pacc)


cdef void scale_item(const void *ctx, Py_ssize_t item) noexcept nogil:
    cdef const UnitJob *j = <const UnitJob *>ctx
    cdef Py_ssize_t i0, i, n, b
    cdef const UnitPart *q = part_at(j, item, &i0)
    cdef Py_ssize_t size = 8 if q.f64 else 4
    cdef double s
    cdef char *g
    if not q.by_cols:
        for i in range(i0, min(i0 + q.per_item, q.R)):
            s = (<double *>q.f)[i] if q.f64 else (<float *>q.f)[i]
            if s == 1.0:
                continue
            if q.f64:
                cc_scale_f64(<double *>(q.g + i * q.sr * size), q.C, q.sc, s)
            else:
                cc_scale_f32(<float *>(q.g + i * q.sr * size), q.C, q.sc, s)
        return
    n = min(q.per_item, q.C - i0)
    for b in range(i0, i0 + n):          # write the tile only if one of its factors is not 1
        s = (<double *>q.f)[b] if q.f64 else (<float *>q.f)[b]
        if s != 1.0:
            break
    else:
        return
    g = q.g + i0 * q.sc * size
    if q.f64:
        cc_cols_scale_f64(<double *>g, q.R, q.sr, q.sc, <double *>q.f + i0, n, <double *>g,
                          q.sr, q.sc)
    else:
        cc_cols_scale_f32(<float *>g, q.R, q.sr, q.sc, <float *>q.f + i0, n, <float *>g,
                          q.sr, q.sc)


cdef void clip_item(const void *ctx, Py_ssize_t item) noexcept nogil:
    """unit_clip's rows of item: each row's reductions, its factor, and the
    row scaled by it (when not 1) while it is still in cache."""
    cdef const UnitJob *j = <const UnitJob *>ctx
    cdef Py_ssize_t i0, i
    cdef const UnitPart *q = part_at(j, item, &i0)
    cdef float *g
    cdef double s
    for i in range(i0, min(i0 + q.per_item, q.R)):
        g = <float *>q.g + i * q.sr
        s = agc_factor(unit_norm(cc_reduce_one_f32(g, q.C, q.sc, j.kind, 1.0, 1.0), j.kind),
                       unit_norm(cc_reduce_one_f32(<float *>q.p + i * q.sr, q.C, q.sc, j.kind,
                                                   1.0, 1.0), j.kind),
                       False, j.clipping, j.eps)
        if s != 1.0:
            cc_scale_f32(g, q.C, q.sc, s)


cdef void fill_part(UnitPart *q, char *g, char *p, char *f, Py_ssize_t R, Py_ssize_t C,
                    Py_ssize_t sr, Py_ssize_t sc, bint f64, bint by_cols) noexcept:
    q.g, q.p, q.f = g, p, f
    q.R, q.C, q.sr, q.sc = R, C, sr, sc
    q.f64 = f64
    q.by_cols = by_cols
    q.per_item = COLS_TILE if by_cols else max(1, ITEM_ELEMENTS // max(1, C))


cdef int set_parts(UnitJob *j, list grads, list params, list factors,
                   tuple by_cols) except -1:
    """j's parts, one per (grad, param or factors) pair of arrays."""
    cdef Py_ssize_t k, size
    cdef cnp.ndarray g
    for k in range(j.n_parts):
        g = <cnp.ndarray>grads[k]
        size = cnp.PyArray_ITEMSIZE(g)
        fill_part(&j.parts[k], <char *>cnp.PyArray_DATA(g),
                  <char *>cnp.PyArray_DATA(<cnp.ndarray>params[k]) if params is not None else NULL,
                  <char *>cnp.PyArray_DATA(<cnp.ndarray>factors[k]) if factors is not None else NULL,
                  cnp.PyArray_DIM(g, 0), cnp.PyArray_DIM(g, 1),
                  cnp.PyArray_STRIDE(g, 0) // size, cnp.PyArray_STRIDE(g, 1) // size,
                  size == 8, by_cols[k])
    return 0


cdef int open_parts(UnitJob *j, Py_ssize_t n_parts) except -1:
    """Room for n_parts parts (free j.parts after)."""
    j.n_parts = n_parts
    j.parts = <UnitPart *>malloc((n_parts + 1) * (sizeof(UnitPart) + sizeof(Py_ssize_t)))
    if j.parts == NULL:
        raise MemoryError()
    j.firsts = <Py_ssize_t *>(j.parts + n_parts + 1)
    return 0


cdef void run_parts(UnitJob *j, chunk_fn fn, int n_threads) noexcept nogil:
    """fn over every item of j's filled parts (numbered here: items and units in order)."""
    cdef Py_ssize_t k, units = 0, items = 0, total = 0
    cdef UnitPart *q
    for k in range(j.n_parts):
        q = &j.parts[k]
        j.firsts[k] = items
        q.unit0 = units
        items += ((q.C if q.by_cols else q.R) + q.per_item - 1) // q.per_item
        units += q.C if q.by_cols else q.R
        total += q.R * q.C
    j.n_items = items
    run_items(items, fn, j, resolve_threads(total, n_threads))


cdef int run_job(UnitJob *j, list grads, list params, list factors, tuple by_cols,
                 chunk_fn fn, int n_threads) except -1:
    """fn over every item of j's parts (grads with params or factors)."""
    open_parts(j, len(grads))
    try:
        set_parts(j, grads, params, factors, by_cols)
        with nogil:
            run_parts(j, fn, n_threads)
    finally:
        free(j.parts)
    return 0


def unit_reduce(list grads, list params, tuple by_cols, int kind, int n_threads):
    """Per-unit float64 reductions (kind: REDUCE_*) of grads and params, in one pass.

    grads[k] and params[k]: 2-d aligned native float32/float64 arrays of one
    shape and strides, no dimension of length 0; by_cols[k]: their units are
    columns (else rows). Returns (grad_norms, param_norms), each one float64
    array of all the units in list order (the caller takes roots and
    checks ranges).
    """
    cdef UnitJob j
    cdef Py_ssize_t units = 0, k
    for k in range(len(grads)):
        units += (<cnp.ndarray>grads[k]).shape[1 if by_cols[k] else 0]
    gn = cnp.PyArray_EMPTY(1, [units], cnp.NPY_DOUBLE, 0)
    pn = cnp.PyArray_EMPTY(1, [units], cnp.NPY_DOUBLE, 0)
    j.kind = kind
    j.gn = <double *>cnp.PyArray_DATA(gn)
    j.pn = <double *>cnp.PyArray_DATA(pn)
    run_job(&j, grads, params, None, by_cols, reduce_item, n_threads)
    return gn, pn


def unit_scale(list grads, list factors, tuple by_cols, int n_threads):
    """grads[k]'s units times factors[k] (1-d, the grad's dtype, one per unit),
    in place; units whose factor is 1 are not written."""
    cdef UnitJob j
    run_job(&j, grads, None, factors, by_cols, scale_item, n_threads)


def unit_clip(list grads, list params, int kind, double clipping, double eps, int n_threads):
    """AGC in place of float32 grads whose units are rows, in one pass: per row,
    the reductions (kind: REDUCE_*) of grad and param, agc_factor of their norms,
    and the row scaled by it where it is not 1, as unit_reduce, agc_factors and
    unit_scale would (the same bits). grads[k], params[k]: 2-d aligned native
    float32 arrays of one shape and strides, no dimension of length 0."""
    cdef UnitJob j
    j.kind = kind
    j.clipping = clipping
    j.eps = eps
    run_job(&j, grads, params, None, (False,) * len(grads), clip_item, n_threads)


cdef bint grads_apart(const Extent *exts, Py_ssize_t n, Py_ssize_t n_grads) noexcept nogil:
    """True when no grad's extent (pos < n_grads) meets another extent, of the
    extents sorted by lo (params may meet each other)."""
    cdef Py_ssize_t i
    cdef char *any_hi = NULL
    cdef char *grad_hi = NULL
    for i in range(n):              # the extents before i that reach past its start
        if (any_hi if exts[i].pos < n_grads else grad_hi) > exts[i].lo:
            return False
        any_hi = max(any_hi, exts[i].hi)
        if exts[i].pos < n_grads:
            grad_hi = max(grad_hi, exts[i].hi)
    return True


def unit_clip_memory(list grads, list params, list rows, list lengths, int kind,
                     double clipping, double eps, int n_threads):
    """unit_clip over contiguous float32 buffers given by address, for an
    adapter that has checked them and keeps them alive (clipcore.torch):
    grads[k] and params[k] hold lengths[k] values, rows[k] units of
    lengths[k] // rows[k]. Returns False, writing nothing, when a grad's
    memory meets another grad's or a param's (the adapter's checked path then
    names them); else True."""
    cdef Py_ssize_t n = len(grads), k, m = 0, length, r
    cdef UnitJob j
    cdef Extent *exts             # grad m at 2 * m, its param at 2 * m + 1, then sorted
    cdef char *g
    cdef char *p
    cdef bint apart = False
    if not (len(params) == len(rows) == len(lengths) == n):
        raise ValueError("unit_clip_memory: lists of unequal lengths")
    open_parts(&j, n)
    exts = <Extent *>malloc((2 * n + 1) * sizeof(Extent))
    try:
        if exts == NULL:
            raise MemoryError()
        for k in range(n):
            length, r = lengths[k], rows[k]
            if length == 0:
                continue
            if r <= 0 or length % r:
                raise ValueError(f"unit_clip_memory: {length} values in {r} rows")
            g, p = <char *><size_t>grads[k], <char *><size_t>params[k]
            exts[2 * m].lo, exts[2 * m].hi, exts[2 * m].pos = g, g + 4 * length, m
            exts[2 * m + 1].lo, exts[2 * m + 1].hi, exts[2 * m + 1].pos = p, p + 4 * length, n + m
            fill_part(&j.parts[m], g, p, NULL, r, length // r, length // r, 1, False, False)
            m += 1
        j.n_parts = m
        j.kind = kind
        j.clipping = clipping
        j.eps = eps
        sort_extents(exts, 2 * m)
        with nogil:
            apart = grads_apart(exts, 2 * m, m)
            if apart:
                run_parts(&j, clip_item, n_threads)
    finally:
        free(exts)
        free(j.parts)
    return apart


def agc_factors(const double[::1] gn, const double[::1] pn, bint f64, double clipping,
                double eps):
    """agc_factor of every unit, from float64 norms: a float64 (f64) or float32 array."""
    cdef Py_ssize_t i, n = gn.shape[0]
    if pn.shape[0] != n:
        raise ValueError(f"{n} grad norms but {pn.shape[0]} param norms")
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, [n], cnp.NPY_DOUBLE if f64 else cnp.NPY_FLOAT, 0)
    cdef double *o64 = <double *>cnp.PyArray_DATA(out)
    cdef float *o32 = <float *>cnp.PyArray_DATA(out)
    for i in range(n):
        if f64:
            o64[i] = agc_factor(gn[i], pn[i], True, clipping, eps)
        else:
            o32[i] = <float>agc_factor(gn[i], pn[i], False, clipping, eps)
    return out
