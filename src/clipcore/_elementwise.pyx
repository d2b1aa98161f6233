"""Kernels of the TensorFlow-semantics ops: elementwise and per-axis.

Two engines, both called by clipcore._ops once it has validated, converted
and broadcast its arguments (nothing here checks user input):

* ``ew_apply``: maximum, minimum, clip_by_value and scaling over operands of
  one shape and dtype (broadcast operands have zero strides). Axes are
  reordered by the output's strides and merged where every operand allows,
  so the inner loop is as long as possible; the flat index space is cut
  into the kernels' chunks.
* ``axis_reduce`` / ``axis_clip``: float64 sums of squares, sums of |x| or
  maxima of |x| over the middle axis of a 3-d view (A, R, B), and
  clip_by_norm over it. Which loop reduces a slice, and how a long slice is
  cut into pieces, depends on the shape only: results never depend on the
  number of threads.

Both hand their work items (chunks, blocks of rows, pieces, tiles) to the
kernels' one scheduler, kernels.run_items.
"""
from libc.stdlib cimport malloc, calloc, free
cimport numpy as cnp

from clipcore.kernels cimport (resolve_threads, run_items, tuning_table, chunk_size, chunk_count,
                               ITEM_ELEMENTS)
from clipcore._loops cimport cc_use_tuning
from clipcore._axis cimport (cc_norm_scale, cc_rows_reduce_f32, cc_rows_reduce_f64,
                             cc_rows_clip_f32, cc_rows_clip_f64, cc_cols_reduce_f32,
                             cc_cols_reduce_f64, cc_cols_scale_f32, cc_cols_scale_f64)

cnp.import_array()

cc_use_tuning(tuning_table())       # the kernels module's choices (cc_platform.h)

cdef extern from "cc_reduce.h" nogil:
    int CC_SUMSQ, CC_SUMABS, CC_MAXABS
    double cc_max_nan(double a, double b)
    double cc_reduce_one_f32(const float *x, Py_ssize_t n, Py_ssize_t stride, int kind,
                         double p, double scale)
    double cc_reduce_one_f64(const double *x, Py_ssize_t n, Py_ssize_t stride, int kind,
                         double p, double scale)

cdef extern from "cc_elementwise.h" nogil:
    int CC_F32, CC_F64, CC_I8, CC_I16, CC_I32, CC_I64, CC_U8, CC_U16, CC_U32, CC_U64, CC_NTYPES
    int CC_OP_MAX, CC_OP_MIN, CC_OP_CLIP, CC_OP_MUL
    ctypedef void (*cc_loop_fn)(char **p, const Py_ssize_t *s, Py_ssize_t n) noexcept nogil
    cc_loop_fn cc_get_loop(int tcode, int op)
    cc_loop_fn cc_get_loop_for(int tcode, int op, Py_ssize_t out_bytes)

cdef enum:
    MAXD = 64          # NumPy's limit on dimensions
    MAXOP = 4          # operands of one loop, output included
    # Per-axis engine tuning (all in elements; choices depend on shape only).
    MANY_ROWS = 64     # at least this many rows: one row per work item
    PIECE = ITEM_ELEMENTS   # a long row (or column block) is cut into pieces of this size
    MAX_PIECES = 256
    TILE = 4096        # columns per tile when reducing over a leading axis:
                       # whole rows are read in order, float64 sums stay in L1/L2
    MANY_TILES = 16
    COL_PIECE = 1 << 20     # elements per piece of a tile, when tiles are few
    PARTIALS_MAX = 1 << 19  # doubles of column partials, at most (4 MB)
    FUSE_BYTES = 524288     # a tile this small is scaled while it is still in cache

REDUCE_SUMSQ = CC_SUMSQ
REDUCE_SUMABS = CC_SUMABS
REDUCE_MAXABS = CC_MAXABS
OP_MAX = CC_OP_MAX
OP_MIN = CC_OP_MIN
OP_CLIP = CC_OP_CLIP
OP_MUL = CC_OP_MUL
# The element types ew_apply runs on, (dtype kind, itemsize) -> type code; other
# types (float16, bfloat16, long double, byte-swapped) go through NumPy.
TYPE_CODES = {("f", 4): CC_F32, ("f", 8): CC_F64, ("i", 1): CC_I8, ("i", 2): CC_I16,
              ("i", 4): CC_I32, ("i", 8): CC_I64, ("u", 1): CC_U8, ("u", 2): CC_U16,
              ("u", 4): CC_U32, ("u", 8): CC_U64}


# ---------------------------------------------------------------- elementwise

ctypedef struct EwJob:
    cc_loop_fn fn
    int nop
    int nd                           # outer dimensions
    Py_ssize_t inner                 # length of the inner (merged) dimension
    Py_ssize_t shape[MAXD]
    Py_ssize_t strides[MAXOP][MAXD]  # bytes
    Py_ssize_t binner[MAXOP]         # inner stride, bytes
    Py_ssize_t sinner[MAXOP]         # inner stride, elements
    char *base[MAXOP]
    Py_ssize_t total                 # positions in all


cdef void ew_range(const EwJob *job, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Run the loop over flat positions [lo, hi) of the (outer..., inner) space."""
    cdef Py_ssize_t idx[MAXD]
    cdef char *row[MAXOP]
    cdef char *p[MAXOP]
    cdef Py_ssize_t rem = lo // job.inner, off = lo % job.inner, take
    cdef int d, k
    for k in range(job.nop):
        row[k] = job.base[k]
    for d in range(job.nd - 1, -1, -1):
        idx[d] = rem % job.shape[d]
        rem = rem // job.shape[d]
        for k in range(job.nop):
            row[k] += idx[d] * job.strides[k][d]
    while lo < hi:
        take = job.inner - off
        if take > hi - lo:
            take = hi - lo
        for k in range(job.nop):
            p[k] = row[k] + off * job.binner[k]
        job.fn(p, job.sinner, take)
        lo += take
        off = 0
        d = job.nd - 1           # odometer over the outer dimensions
        while d >= 0:
            idx[d] += 1
            for k in range(job.nop):
                row[k] += job.strides[k][d]
            if idx[d] < job.shape[d]:
                break
            for k in range(job.nop):
                row[k] -= job.shape[d] * job.strides[k][d]
            idx[d] = 0
            d -= 1


cdef void ew_chunk(const void *job, Py_ssize_t c) noexcept nogil:
    """Chunk c of the flat positions, cut as the norm kernels cut theirs."""
    cdef const EwJob *j = <const EwJob *>job
    cdef Py_ssize_t chunk = chunk_size(j.total)
    ew_range(j, c * chunk, min((c + 1) * chunk, j.total))


def ew_apply(int op, int tcode, tuple operands, int n_threads):
    """Run elementwise op over operands (inputs then output).

    Inputs broadcast to the output's shape (NumPy's rules: shapes aligned
    at the end, length-1 and missing axes repeat); all have its dtype, are
    aligned and in native byte order; an input is either the output itself
    or does not overlap it.
    """
    cdef EwJob job
    cdef int nop = len(operands), nd, k, d, j, m, od, out_nd
    cdef int order[MAXD]
    cdef cnp.ndarray arr, out = <cnp.ndarray>operands[nop - 1]
    cdef Py_ssize_t itemsize = cnp.PyArray_ITEMSIZE(out), total = 1, n
    cdef Py_ssize_t shape[MAXD]
    cdef Py_ssize_t strides[MAXOP][MAXD]
    job.fn = cc_get_loop(tcode, op)
    if job.fn == NULL or nop > MAXOP or nop < 2:
        raise ValueError(f"no elementwise loop for op {op}, type code {tcode}")
    job.nop = nop
    out_nd = cnp.PyArray_NDIM(out)
    for k in range(nop):
        arr = <cnp.ndarray>operands[k]
        if cnp.PyArray_NDIM(arr) > out_nd:
            raise ValueError("an operand has more dimensions than the output")
    nd = 0
    for d in range(out_nd):                  # drop length-1 dimensions
        n = cnp.PyArray_DIM(out, d)
        if n == 0:
            return
        if n == 1:
            continue
        shape[nd] = n
        for k in range(nop):
            arr = <cnp.ndarray>operands[k]
            od = d - (out_nd - cnp.PyArray_NDIM(arr))
            if od < 0 or cnp.PyArray_DIM(arr, od) == 1:
                strides[k][nd] = 0           # broadcast
            elif cnp.PyArray_DIM(arr, od) == n:
                strides[k][nd] = cnp.PyArray_STRIDE(arr, od)
            else:
                raise ValueError("operands do not broadcast to the output's shape")
        nd += 1
    # Outermost first: sort by |output stride|, largest first (stable).
    for d in range(nd):
        j = d
        while j > 0 and abs(strides[nop - 1][order[j - 1]]) < abs(strides[nop - 1][d]):
            order[j] = order[j - 1]
            j -= 1
        order[j] = d
    # Merge a dimension into the next one when every operand allows it.
    m = -1
    for j in range(nd):
        d = order[j]
        if m >= 0:
            for k in range(nop):
                if job.strides[k][m] != strides[k][d] * shape[d]:
                    break
            else:
                job.shape[m] *= shape[d]
                for k in range(nop):
                    job.strides[k][m] = strides[k][d]
                continue
        m += 1
        job.shape[m] = shape[d]
        for k in range(nop):
            job.strides[k][m] = strides[k][d]
    if m < 0:                  # a single element
        job.inner = 1
        job.nd = 0
        for k in range(nop):
            job.binner[k] = 0
    else:
        job.inner = job.shape[m]
        job.nd = m
        for k in range(nop):
            job.binner[k] = job.strides[k][m]
    for k in range(nop):
        job.sinner[k] = job.binner[k] // itemsize
        job.base[k] = <char *>cnp.PyArray_DATA(<cnp.ndarray>operands[k])
    for d in range(job.nd):
        total *= job.shape[d]
    total *= job.inner
    job.total = total
    job.fn = cc_get_loop_for(tcode, op, total * itemsize)   # in place: see its dispatcher
    cdef int nt = resolve_threads(total, n_threads)
    with nogil:
        run_items(chunk_count(total), ew_chunk, &job, nt)


# ------------------------------------------------------------------- per axis

ctypedef struct AxisJob:
    char *x
    char *o
    bint f64
    Py_ssize_t A, R, B
    Py_ssize_t sa, sr, sb        # x strides, elements
    Py_ssize_t oa, osr, ob       # o strides, elements
    int kind
    double clip
    double *res                  # A*B results (or NULL)
    char *f                      # A*B scale factors in x's dtype (or NULL)
    double *part                 # partial results of pieces
    cc_loop_fn scale             # o = x * f[a] over a piece of a long row
    Py_ssize_t blk               # rows per work item, when rows are whole
    Py_ssize_t P, rp             # pieces per row / column block, rows per piece
    Py_ssize_t nbt, width        # column tiles per a, columns of a tile's partials
    bint fuse                    # a tile is scaled as soon as it is reduced
    Py_ssize_t rs, nrp           # scaling columns: rows per work item, items per a


cdef inline char *xp(const AxisJob *j, Py_ssize_t a, Py_ssize_t r, Py_ssize_t b) noexcept nogil:
    return j.x + (a * j.sa + r * j.sr + b * j.sb) * (8 if j.f64 else 4)


cdef inline char *op_(const AxisJob *j, Py_ssize_t a, Py_ssize_t r, Py_ssize_t b) noexcept nogil:
    return j.o + (a * j.oa + r * j.osr + b * j.ob) * (8 if j.f64 else 4)


cdef inline double combine(int kind, double acc, double v) noexcept nogil:
    return cc_max_nan(acc, v) if kind == CC_MAXABS else acc + v


cdef void set_factor(const AxisJob *j, Py_ssize_t i, double sumsq) noexcept nogil:
    if j.f64:
        (<double *>j.f)[i] = cc_norm_scale(sumsq, j.clip)
    else:
        (<float *>j.f)[i] = <float>cc_norm_scale(sumsq, j.clip)


# Rows (B == 1): each row a of R elements is one slice. Every function of
# the form f(ctx, item) below is one work item of kernels.run_items.

cdef void rows_block(const AxisJob *j, Py_ssize_t item, bint clip) noexcept nogil:
    cdef Py_ssize_t a0 = item * j.blk, a1 = a0 + j.blk if a0 + j.blk < j.A else j.A
    if clip:
        if j.f64:
            cc_rows_clip_f64(<double *>xp(j, a0, 0, 0), a1 - a0, j.sa, j.R, j.sr,
                             <double *>op_(j, a0, 0, 0), j.oa, j.osr, j.clip)
        else:
            cc_rows_clip_f32(<float *>xp(j, a0, 0, 0), a1 - a0, j.sa, j.R, j.sr,
                             <float *>op_(j, a0, 0, 0), j.oa, j.osr, j.clip)
    elif j.f64:
        cc_rows_reduce_f64(<double *>xp(j, a0, 0, 0), a1 - a0, j.sa, j.R, j.sr, j.kind, j.res + a0)
    else:
        cc_rows_reduce_f32(<float *>xp(j, a0, 0, 0), a1 - a0, j.sa, j.R, j.sr, j.kind, j.res + a0)


cdef void rows_reduce(const void *ctx, Py_ssize_t item) noexcept nogil:
    rows_block(<const AxisJob *>ctx, item, False)


cdef void rows_clip(const void *ctx, Py_ssize_t item) noexcept nogil:
    rows_block(<const AxisJob *>ctx, item, True)


cdef void row_piece_reduce(const void *ctx, Py_ssize_t item) noexcept nogil:
    cdef const AxisJob *j = <const AxisJob *>ctx
    cdef Py_ssize_t a = item // j.P, r0 = (item % j.P) * j.rp
    cdef Py_ssize_t n = j.R - r0 if j.R - r0 < j.rp else j.rp
    if j.f64:
        j.part[item] = cc_reduce_one_f64(<double *>xp(j, a, r0, 0), n, j.sr, j.kind, 1.0, 1.0)
    else:
        j.part[item] = cc_reduce_one_f32(<float *>xp(j, a, r0, 0), n, j.sr, j.kind, 1.0, 1.0)


cdef void row_piece_scale(const void *ctx, Py_ssize_t item) noexcept nogil:
    cdef const AxisJob *j = <const AxisJob *>ctx
    cdef Py_ssize_t a = item // j.P, r0 = (item % j.P) * j.rp
    cdef Py_ssize_t n = j.R - r0 if j.R - r0 < j.rp else j.rp
    cdef char *p[3]
    cdef Py_ssize_t s[3]
    p[0] = xp(j, a, r0, 0)
    p[1] = j.f + a * (8 if j.f64 else 4)
    p[2] = op_(j, a, r0, 0)
    s[0] = j.sr
    s[1] = 0
    s[2] = j.osr
    j.scale(p, s, n)


cdef int run_rows(AxisJob *j, bint clip, int nt) noexcept nogil:
    """Returns -1 when out of memory."""
    cdef Py_ssize_t a, p, items
    cdef double acc
    if j.A >= MANY_ROWS or j.R <= PIECE:
        # Whole rows per work item: ~PIECE elements per block of rows.
        j.blk = PIECE // (j.R if j.R > 0 else 1)
        if j.blk < 1:
            j.blk = 1
        run_items((j.A + j.blk - 1) // j.blk, rows_clip if clip else rows_reduce, j, nt)
        return 0
    # Few long rows: pieces of each row, combined in order.
    j.P = (j.R + PIECE - 1) // PIECE
    if j.P > MAX_PIECES:
        j.P = MAX_PIECES
    j.rp = (j.R + j.P - 1) // j.P
    j.P = (j.R + j.rp - 1) // j.rp
    items = j.A * j.P
    j.part = <double *>malloc(items * sizeof(double))
    if j.part == NULL:
        return -1
    run_items(items, row_piece_reduce, j, nt)
    for a in range(j.A):
        acc = 0.0
        for p in range(j.P):
            acc = combine(j.kind, acc, j.part[a * j.P + p])
        if clip:
            set_factor(j, a, acc)
        else:
            j.res[a] = acc
    free(j.part)
    j.part = NULL
    if clip:
        run_items(items, row_piece_scale, j, nt)
    return 0


# Columns (B > 1): slice (a, b) is x[a, :, b]. A tile is up to TILE columns of
# one a; its rows are read in order, each adding to the tile's float64 sums.
# When tiles are few, each is cut into pieces of rows (P per tile, a number
# that depends on the shape only) whose partial sums are added in order.

cdef void tile_reduce(const void *ctx, Py_ssize_t item) noexcept nogil:
    cdef const AxisJob *j = <const AxisJob *>ctx
    cdef Py_ssize_t tile = item // j.P, p = item % j.P
    cdef Py_ssize_t a = tile // j.nbt, b0 = (tile % j.nbt) * TILE
    cdef Py_ssize_t nb = j.B - b0 if j.B - b0 < TILE else TILE
    cdef Py_ssize_t r0 = p * j.rp, nr = j.R - p * j.rp if j.R - p * j.rp < j.rp else j.rp
    cdef double *acc = j.res + a * j.B + b0 if j.P == 1 else j.part + item * j.width
    cdef Py_ssize_t b
    if j.f64:
        cc_cols_reduce_f64(<double *>xp(j, a, r0, b0), nr, j.sr, nb, j.sb, j.kind, acc)
    else:
        cc_cols_reduce_f32(<float *>xp(j, a, r0, b0), nr, j.sr, nb, j.sb, j.kind, acc)
    if not j.fuse:
        return
    # The tile is still in cache: scale it now (its factors in j.f, not on the stack).
    for b in range(nb):
        set_factor(j, a * j.B + b0 + b, acc[b])
    if j.f64:
        cc_cols_scale_f64(<double *>xp(j, a, 0, b0), j.R, j.sr, j.sb,
                          <double *>j.f + a * j.B + b0, nb, <double *>op_(j, a, 0, b0),
                          j.osr, j.ob)
    else:
        cc_cols_scale_f32(<float *>xp(j, a, 0, b0), j.R, j.sr, j.sb,
                          <float *>j.f + a * j.B + b0, nb, <float *>op_(j, a, 0, b0),
                          j.osr, j.ob)


cdef void cols_scale_rows(const void *ctx, Py_ssize_t item) noexcept nogil:
    cdef const AxisJob *j = <const AxisJob *>ctx
    cdef Py_ssize_t a = item // j.nrp, r0 = (item % j.nrp) * j.rs
    cdef Py_ssize_t nr = j.R - r0 if j.R - r0 < j.rs else j.rs
    if j.f64:
        cc_cols_scale_f64(<double *>xp(j, a, r0, 0), nr, j.sr, j.sb, <double *>j.f + a * j.B,
                          j.B, <double *>op_(j, a, r0, 0), j.osr, j.ob)
    else:
        cc_cols_scale_f32(<float *>xp(j, a, r0, 0), nr, j.sr, j.sb, <float *>j.f + a * j.B,
                          j.B, <float *>op_(j, a, r0, 0), j.osr, j.ob)


cdef int run_cols(AxisJob *j, bint clip, int nt) noexcept nogil:
    """Returns -1 when out of memory."""
    cdef Py_ssize_t tiles, items, i, a, b, p, t
    cdef Py_ssize_t itemsize = 8 if j.f64 else 4
    cdef double acc
    j.nbt = (j.B + TILE - 1) // TILE
    tiles = j.A * j.nbt
    j.width = j.B if j.B < TILE else TILE
    j.P = 1
    j.rp = j.R
    if tiles < MANY_TILES and j.R * j.width > COL_PIECE:
        j.P = (j.R * j.width + COL_PIECE - 1) // COL_PIECE
        if j.P > PARTIALS_MAX // (tiles * j.width):
            j.P = PARTIALS_MAX // (tiles * j.width)
        if j.P < 1:
            j.P = 1
        j.rp = (j.R + j.P - 1) // j.P
        j.P = (j.R + j.rp - 1) // j.rp
    j.fuse = clip and j.P == 1 and j.R * j.width * itemsize <= FUSE_BYTES
    items = tiles * j.P
    if j.P > 1:
        j.part = <double *>calloc(items * j.width, sizeof(double))
        if j.part == NULL:
            return -1
    run_items(items, tile_reduce, j, nt)
    if j.P > 1:          # add the pieces of each tile, in order
        for t in range(tiles):
            a = t // j.nbt
            for b in range(t % j.nbt * TILE, min(j.B, (t % j.nbt + 1) * TILE)):
                acc = 0.0
                for p in range(j.P):
                    acc = combine(j.kind, acc, j.part[(t * j.P + p) * j.width + b % TILE])
                j.res[a * j.B + b] = acc
        free(j.part)
        j.part = NULL
    if not clip or j.fuse:
        return 0
    for i in range(j.A * j.B):
        set_factor(j, i, j.res[i])
    j.rs = (PIECE + j.B - 1) // j.B
    j.nrp = (j.R + j.rs - 1) // j.rs
    run_items(j.A * j.nrp, cols_scale_rows, j, nt)
    return 0


cdef int axis_job(AxisJob *j, cnp.ndarray x3, cnp.ndarray o3) except -1:
    cdef Py_ssize_t itemsize = cnp.PyArray_ITEMSIZE(x3)
    j.x = <char *>cnp.PyArray_DATA(x3)
    j.f64 = cnp.PyArray_TYPE(x3) == cnp.NPY_DOUBLE
    j.A = cnp.PyArray_DIM(x3, 0)
    j.R = cnp.PyArray_DIM(x3, 1)
    j.B = cnp.PyArray_DIM(x3, 2)
    j.sa = cnp.PyArray_STRIDE(x3, 0) // itemsize
    j.sr = cnp.PyArray_STRIDE(x3, 1) // itemsize
    j.sb = cnp.PyArray_STRIDE(x3, 2) // itemsize
    j.o = NULL
    j.oa = j.osr = j.ob = 0
    if o3 is not None:
        j.o = <char *>cnp.PyArray_DATA(o3)
        j.oa = cnp.PyArray_STRIDE(o3, 0) // itemsize
        j.osr = cnp.PyArray_STRIDE(o3, 1) // itemsize
        j.ob = cnp.PyArray_STRIDE(o3, 2) // itemsize
    j.scale = cc_get_loop_for(CC_F64 if j.f64 else CC_F32, CC_OP_MUL,
                              0 if j.o == NULL or j.o == j.x else cnp.PyArray_NBYTES(x3))
    j.res = NULL
    j.f = NULL
    j.part = NULL
    j.blk = 1
    j.P = 1
    j.rp = j.R
    j.nbt = j.width = 1
    j.fuse = False
    j.rs = j.nrp = 1
    j.clip = 0.0
    j.kind = CC_SUMSQ
    return 0


def axis_reduce(cnp.ndarray x3, int kind, int n_threads):
    """Float64 reductions of x3[a, :, b] (x3: aligned native float32/float64, 3-d).

    Returns an (A, B) float64 array; 0 where R == 0 (the caller decides what
    an empty maximum is).
    """
    cdef AxisJob j
    axis_job(&j, x3, None)
    j.kind = kind
    cdef cnp.ndarray res = cnp.PyArray_ZEROS(2, [j.A, j.B], cnp.NPY_DOUBLE, 0)
    if j.A == 0 or j.B == 0 or j.R == 0:
        return res
    j.res = <double *>cnp.PyArray_DATA(res)
    cdef int nt = resolve_threads(j.A * j.R * j.B, n_threads), rc = 0
    with nogil:
        rc = run_rows(&j, False, nt) if j.B == 1 else run_cols(&j, False, nt)
    if rc != 0:
        raise MemoryError()
    return res


def axis_clip(cnp.ndarray x3, cnp.ndarray o3, double clip, int n_threads):
    """o3[a, :, b] = x3[a, :, b] * clip / max(norm(x3[a, :, b]), clip).

    x3, o3: 3-d views of one shape and dtype (aligned native float32 or
    float64); o3 is x3 itself or does not overlap it. clip is >= 0 or NaN.
    """
    cdef AxisJob j
    axis_job(&j, x3, o3)
    j.kind = CC_SUMSQ
    j.clip = clip
    if j.A == 0 or j.B == 0 or j.R == 0:
        return
    cdef Py_ssize_t nf = j.A * j.B
    cdef bint two_pass = (j.B == 1 and not (j.A >= MANY_ROWS or j.R <= PIECE)) or j.B > 1
    cdef int nt = resolve_threads(j.A * j.R * j.B, n_threads), rc = 0
    if two_pass:         # the factors (a fused tile's too), then scaled in a second pass
        j.f = <char *>malloc(nf * (8 if j.f64 else 4))
        j.res = <double *>calloc(nf, sizeof(double))
        if j.f == NULL or j.res == NULL:
            free(j.f)
            free(j.res)
            raise MemoryError()
    with nogil:
        rc = run_rows(&j, True, nt) if j.B == 1 else run_cols(&j, True, nt)
    free(j.f)
    free(j.res)
    if rc != 0:
        raise MemoryError()
