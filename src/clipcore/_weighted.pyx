"""Per-example clipping's kernels: weighted sums over a leading batch axis,
``out[k][j] (+)= sum_i w[i] * x[k][i, j]``, with w[i] a clip rule's factor of
example i's norm over every x[k][i].

Each x[k] is a 2-d (B, N_k) view, each out[k] a 1-d (N_k,) view. The columns
of all the arrays are cut into tiles of up to TILE (the two-pass weighted
sums: SUM_TILE) columns of one array; a
tile's float64 sums are accumulated over its rows in order, i = 0..B-1 (four
at a time, their terms added pairwise, or chained by FMAs in the AVX-512
twin: an order that depends on B and the loop only), and
each row's sum of squares is taken per tile and added in tile order. Threads
claim whole tiles, so every output element is one thread's sum in one fixed
order: the results are the same bits for any thread count.

Two paths give the same bits. The two-pass path reads the x's twice: the
norms (row_sumsq), then the weighted sums (weighted_sum). The one-read path
(clip_sum), for examples small enough that a block of them stays in cache,
runs over blocks of rows (a multiple of four): the block's norms read from
memory, its weights, then its weighted terms added to float64 sums of every
column (acc) re-reading the block from cache; out is written after the last
block. Its blocks are the steps of one team (kernels' run_steps): a block's
weighted sums and the next block's norms are one step's items.
"""
from libc.math cimport sqrt, ldexp, isfinite, INFINITY, NAN
from libc.stdlib cimport malloc, free
cimport numpy as cnp

from clipcore.kernels cimport resolve_threads, run_holding, run_items, run_steps, tuning_table
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
    CC_DEFINE_WSUM(f64, double)
    CC_DEFINE_WSUM(f32_generic, float)
    #ifdef CC_AVX512_PATHS
    /* The AVX-512 twin for float32 rows of contiguous columns, four rows at a
     * time: each row's term is chained into the sums by an FMA (an order of
     * its own, the same for any thread count), 16 columns a step, the last
     * step masked to the columns left. */
    CC_AVX512 static inline void cc_wsum4_step_f32(
            const float *x, ptrdiff_t sr, const double *w, double *acc,
            __mmask8 m_lo, __mmask8 m_hi) {
        __m512d lo = _mm512_maskz_loadu_pd(m_lo, acc), hi = _mm512_maskz_loadu_pd(m_hi, acc + 8);
        for (int r = 0; r < 4; r++) {
            const __m512d wr = _mm512_set1_pd(w[r]);
            lo = _mm512_fmadd_pd(wr, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m_lo, x + r * sr)), lo);
            hi = _mm512_fmadd_pd(wr, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(m_hi, x + r * sr + 8)), hi);
        }
        _mm512_mask_storeu_pd(acc, m_lo, lo);
        _mm512_mask_storeu_pd(acc + 8, m_hi, hi);
    }
    CC_AVX512 static void cc_wsum_rows4_f32_avx512(
            const float *x, ptrdiff_t B, ptrdiff_t sr, const double *w, ptrdiff_t nb,
            double *CC_RESTRICT acc) {
        for (ptrdiff_t i = 0; i + 4 <= B; i += 4) {
            ptrdiff_t b = 0;
            for (; b + 16 <= nb; b += 16)
                cc_wsum4_step_f32(x + i * sr + b, sr, w + i, acc + b, 0xff, 0xff);
            if (b < nb)
                cc_wsum4_step_f32(x + i * sr + b, sr, w + i, acc + b, cc_mask8(nb - b),
                                  cc_mask8(nb - b - 8));
        }
    }
    #endif
    static void cc_wsum_rows_f32(const float *x, ptrdiff_t B, ptrdiff_t sr, ptrdiff_t sb,
                                 const double *w, ptrdiff_t nb, double *CC_RESTRICT acc) {
    #ifdef CC_AVX512_PATHS
        const ptrdiff_t whole = B / 4 * 4;
        if (sb == 1 && whole > 0 && cc_avx512_usable()) {
            cc_wsum_rows4_f32_avx512(x, whole, sr, w, nb, acc);
            x += whole * sr;
            w += whole;
            B -= whole;
        }
    #endif
        cc_wsum_rows_f32_generic(x, B, sr, sb, w, nb, acc);
    }
    """
    void cc_wsum_rows_f32(const float *x, Py_ssize_t B, Py_ssize_t sr, Py_ssize_t sb,
                          const double *w, Py_ssize_t nb, double *acc)
    void cc_wsum_rows_f64(const double *x, Py_ssize_t B, Py_ssize_t sr, Py_ssize_t sb,
                          const double *w, Py_ssize_t nb, double *acc)

cdef enum:
    # Columns per tile: 64 KB of float64 sums (L2), rows read in 32 KB runs
    # (the prefetchers like long runs: wider tiles than 2048 columns are faster).
    TILE = 8192
    # Tiles per item of the norm passes, read a row at a time: runs of a row
    # longer than a tile's (the prefetchers' ramp-up is paid per run).
    GROUP = 8
    # Columns per tile of the two-pass weighted sums (no norm depends on their
    # tiles): 512 KB of float64 sums, still in L2, rows read in 256 KB runs.
    SUM_TILE = 65536

# The clip rules: example i's weight from its norm (clip_weight).
cpdef enum:
    RULE_OPTAX = 0      # min(bound / norm, 1), NaN for a NaN or inf norm
    RULE_OPACUS = 1     # (bound / (norm + 1e-6)).clamp(max=1) in the norms' dtype

# A float64 sum of squares outside [2^-960, inf) may have lost the norm.
cdef double SUMSQ_SAFE_MIN = ldexp(1.0, -960)

ctypedef struct WsPart:
    char *x                 # x[0, 0]
    char *o                 # out[0]
    Py_ssize_t n            # columns
    Py_ssize_t sr, sb, so   # strides in elements: x's rows and columns, out's
    Py_ssize_t at           # position of the part's first column among all parts' columns
    bint f64
    bint add                # add to out's values instead of overwriting them

ctypedef struct WsJob:
    WsPart *parts
    Py_ssize_t *firsts      # per part: the index of its first tile
    Py_ssize_t n_parts, n_tiles, B, n_cols
    const double *w32       # per example: the weight of float32 parts
    const double *w64       # and of float64 parts
    Py_ssize_t tile         # columns per tile (the norms' partials: TILE)
    double *scratch         # weighted_sum: a tile's doubles per thread of the team
    double *part            # n_tiles x (rows of a block) sums of squares
    double *acc             # clip_sum: the float64 sums of every column
    Py_ssize_t block        # clip_sum: rows per block (a multiple of four)
    int rule
    double bound
    bint has_f64            # the norms' dtype (the clip rules) and their range check
    double *norms           # clip_sum: B norms, written
    double *w               # clip_sum: 2 x B weights (w32, then w64), written

ctypedef struct Rows:       # what a tile function runs over: job j's rows [i0, i1)
    WsJob *j
    Py_ssize_t i0, i1


cdef void clip_weight(int rule, double bound, bint f64, double norm,
                      double *w32, double *w64) noexcept nogil:
    """The weights of an example of norm norm, for float32 and float64 parts."""
    cdef float c32
    cdef double c
    if rule == RULE_OPTAX:
        c = (bound / norm if norm > bound else 1.0) if isfinite(norm) else NAN
        w32[0] = c
        w64[0] = c
    elif f64:                 # torch: reciprocal(norm + 1e-6) * bound; clamp keeps NaN
        c = 1.0 / (norm + 1e-6) * bound
        w64[0] = 1.0 if c > 1.0 else c
        w32[0] = <float>w64[0]
    else:
        c32 = (<float>1.0 / (<float>norm + <float>1e-6)) * <float>bound
        w32[0] = 1.0 if c32 > 1.0 else c32
        w64[0] = w32[0]


cdef inline const WsPart *tile_part(const WsJob *j, Py_ssize_t t, Py_ssize_t *b0,
                                    Py_ssize_t *nb) noexcept nogil:
    """Tile t's part; b0, nb: its first column in the part and its columns."""
    cdef Py_ssize_t k = run_holding(j.firsts, j.n_parts, t)
    cdef const WsPart *p = &j.parts[k]
    b0[0] = (t - j.firsts[k]) * j.tile
    nb[0] = p.n - b0[0] if p.n - b0[0] < j.tile else j.tile
    return p


cdef void ss_row(const WsJob *j, Py_ssize_t g, Py_ssize_t i, Py_ssize_t i0,
                 Py_ssize_t m) noexcept nogil:
    """The float64 sum of squares over each of group g's tiles' columns of row
    i, in one run of the row; part[t * m + i - i0] (m: rows in the part's run)."""
    cdef Py_ssize_t b0, nb, t
    cdef Py_ssize_t t1 = (g + 1) * GROUP if (g + 1) * GROUP < j.n_tiles else j.n_tiles
    cdef const WsPart *p
    for t in range(g * GROUP, t1):
        p = tile_part(j, t, &b0, &nb)
        if p.f64:
            j.part[t * m + i - i0] = cc_reduce_one_f64(
                <double *>p.x + i * p.sr + b0 * p.sb, nb, p.sb, CC_SUMSQ, 1.0, 1.0)
        else:
            j.part[t * m + i - i0] = cc_reduce_one_f32(
                <float *>p.x + i * p.sr + b0 * p.sb, nb, p.sb, CC_SUMSQ, 1.0, 1.0)


cdef void ss_group(const void *ctx, Py_ssize_t g) noexcept nogil:
    """Group g (tiles g * GROUP..): ss_row of each row i0 <= i < i1."""
    cdef const Rows *r = <const Rows *>ctx
    cdef Py_ssize_t i
    for i in range(r.i0, r.i1):
        ss_row(r.j, g, i, r.i0, r.i1 - r.i0)


cdef inline Py_ssize_t n_groups(const WsJob *j) noexcept nogil:
    return (j.n_tiles + GROUP - 1) // GROUP


ctypedef fused real:
    float
    double


cdef inline void tile_sums_of(const real *x, real *o, const WsPart *p, const double *w,
                              Py_ssize_t nb, Py_ssize_t rows, bint first, bint last,
                              double *acc) noexcept nogil:
    """tile_sums in the part's dtype: x the tile's first row, o its first out."""
    cdef Py_ssize_t b
    if first:
        for b in range(nb):
            acc[b] = o[b * p.so] if p.add else 0.0
    if real is float:
        cc_wsum_rows_f32(x, rows, p.sr, p.sb, w, nb, acc)
    else:
        cc_wsum_rows_f64(x, rows, p.sr, p.sb, w, nb, acc)
    if last:
        for b in range(nb):
            o[b * p.so] = <real>acc[b]


cdef void tile_sums(const WsJob *j, const WsPart *p, Py_ssize_t b0, Py_ssize_t nb,
                    Py_ssize_t i0, Py_ssize_t i1, bint first, bint last,
                    double *acc) noexcept nogil:
    """acc (the tile's nb float64 sums) += the weighted rows i0 <= i < i1 of the
    tile; first: acc starts from out (p.add) or 0; last: out = acc, in its dtype."""
    if p.f64:
        tile_sums_of(<double *>p.x + i0 * p.sr + b0 * p.sb, <double *>p.o + b0 * p.so, p,
                     j.w64 + i0, nb, i1 - i0, first, last, acc)
    else:
        tile_sums_of(<float *>p.x + i0 * p.sr + b0 * p.sb, <float *>p.o + b0 * p.so, p,
                     j.w32 + i0, nb, i1 - i0, first, last, acc)


cdef void ws_tile(const void *ctx, Py_ssize_t t) noexcept nogil:
    """Tile t: its columns' weighted sums over all rows, written to out."""
    cdef const WsJob *j = <const WsJob *>ctx
    cdef Py_ssize_t b0, nb
    cdef const WsPart *p = tile_part(j, t, &b0, &nb)
    tile_sums(j, p, b0, nb, 0, j.B, True, True, j.scratch + cc_team_rank() * j.tile)


cdef inline Rows block_rows(const WsJob *j, Py_ssize_t blk) noexcept nogil:
    """Block blk's rows."""
    cdef Rows r
    r.j = <WsJob *>j
    r.i0 = blk * j.block
    r.i1 = r.i0 + j.block if r.i0 + j.block < j.B else j.B
    return r


cdef inline Py_ssize_t n_blocks(const WsJob *j) noexcept nogil:
    return (j.B + j.block - 1) // j.block


cdef void block_tile(const Rows *r, Py_ssize_t t) noexcept nogil:
    """Tile t: the block's weighted rows added to the tile's columns in acc."""
    cdef const WsJob *j = r.j
    cdef Py_ssize_t b0, nb
    cdef const WsPart *p = tile_part(j, t, &b0, &nb)
    tile_sums(j, p, b0, nb, r.i0, r.i1, r.i0 == 0, r.i1 == j.B, j.acc + p.at + b0)


# clip_sum's steps (kernels' run_steps): step s adds block s - 1's weighted
# rows to the sums, a tile per item (that block has its weights), and reads
# block s's norms, a row of a group of tiles per item (each a long run of a
# row). One thread runs the items in order: a block's sums from cache right
# after its norms, as the steps' order is.

cdef inline Py_ssize_t sum_items(const WsJob *j, Py_ssize_t s) noexcept nogil:
    return j.n_tiles if s > 0 else 0


cdef inline Py_ssize_t norm_items(const WsJob *j, Py_ssize_t s) noexcept nogil:
    cdef Rows r
    if s == n_blocks(j):
        return 0
    r = block_rows(j, s)
    return n_groups(j) * (r.i1 - r.i0)


cdef Py_ssize_t step_count(const void *ctx, Py_ssize_t s) noexcept nogil:
    cdef const WsJob *j = <const WsJob *>ctx
    return sum_items(j, s) + norm_items(j, s)


cdef void step_item(const void *ctx, Py_ssize_t s, Py_ssize_t i) noexcept nogil:
    cdef const WsJob *j = <const WsJob *>ctx
    cdef Py_ssize_t k = i - sum_items(j, s), m
    cdef Rows r
    if k < 0:
        r = block_rows(j, s - 1)
        block_tile(&r, i)
    else:
        r = block_rows(j, s)
        m = r.i1 - r.i0
        ss_row(j, k // m, r.i0 + k % m, r.i0, m)


cdef int step_end(const void *ctx, Py_ssize_t s) noexcept nogil:
    """Block s's norms from its tiles' sums of squares (in tile order), and its
    weights; 1 (nothing more written) when a float64 sum left the range."""
    cdef const WsJob *j = <const WsJob *>ctx
    cdef Rows r
    cdef Py_ssize_t i, t, m
    cdef double q
    if s == n_blocks(j):
        return 0
    r = block_rows(j, s)
    m = r.i1 - r.i0
    for i in range(r.i0, r.i1):
        q = 0.0
        for t in range(j.n_tiles):
            q += j.part[t * m + i - r.i0]
        if j.has_f64 and (q == INFINITY or (q < SUMSQ_SAFE_MIN and q > 0.0)):
            return 1
        j.norms[i] = sqrt(q)
        clip_weight(j.rule, j.bound, j.has_f64, j.norms[i], &j.w[i], &j.w[j.B + i])
    return 0


cdef int alloc_parts(WsJob *j, Py_ssize_t n) except -1:
    """Room for n parts and their first tiles, in one block (free j.parts)."""
    j.parts = <WsPart *>malloc(n * (sizeof(WsPart) + sizeof(Py_ssize_t)))
    if j.parts == NULL:
        raise MemoryError()
    j.firsts = <Py_ssize_t *>(j.parts + n)
    return 0


cdef Py_ssize_t set_parts(WsJob *j, list xs, list outs, list add, Py_ssize_t tile) except -1:
    """j's parts for xs (and outs, or None, with add: per out, whether it is
    added to), cut into tiles of tile columns; returns the number of elements."""
    cdef Py_ssize_t k, total = 0, itemsize
    cdef cnp.ndarray x, o
    cdef WsPart *p
    j.tile = tile
    j.n_parts = 0
    j.n_tiles = 0
    j.n_cols = 0
    for k in range(len(xs)):
        x = <cnp.ndarray>xs[k]
        if cnp.PyArray_DIM(x, 1) == 0:
            continue
        itemsize = cnp.PyArray_ITEMSIZE(x)
        p = &j.parts[j.n_parts]
        p.x = <char *>cnp.PyArray_DATA(x)
        p.o = NULL
        p.so = 0
        p.add = False
        if outs is not None:
            o = <cnp.ndarray>outs[k]
            p.o = <char *>cnp.PyArray_DATA(o)
            p.so = cnp.PyArray_STRIDE(o, 0) // itemsize
            p.add = bool(add[k])
        p.n = cnp.PyArray_DIM(x, 1)
        p.sr = cnp.PyArray_STRIDE(x, 0) // itemsize
        p.sb = cnp.PyArray_STRIDE(x, 1) // itemsize
        p.f64 = cnp.PyArray_TYPE(x) == cnp.NPY_DOUBLE
        p.at = j.n_cols
        j.firsts[j.n_parts] = j.n_tiles
        j.n_tiles += (p.n + j.tile - 1) // j.tile
        j.n_cols += p.n
        total += p.n * cnp.PyArray_DIM(x, 0)
        j.n_parts += 1
    return total


def weights(const double[::1] norms, int rule, double bound, bint has_f64):
    """Per example, the weights of float32 and of float64 parts by the clip
    rule (RULE_*) from its norm; has_f64: the norms are float64 (Opacus's
    factor is computed in the norms' dtype). Two float64 (B,) arrays."""
    cdef Py_ssize_t B = norms.shape[0], i
    cdef cnp.ndarray w32 = cnp.PyArray_EMPTY(1, [B], cnp.NPY_DOUBLE, 0)
    cdef cnp.ndarray w64 = cnp.PyArray_EMPTY(1, [B], cnp.NPY_DOUBLE, 0)
    for i in range(B):
        clip_weight(rule, bound, has_f64, norms[i], <double *>cnp.PyArray_DATA(w32) + i,
                    <double *>cnp.PyArray_DATA(w64) + i)
    return w32, w64


def weighted_sum(list xs, list outs, list add, const double[::1] w32, const double[::1] w64,
                 int n_threads):
    """outs[k][j] = sum_i w[i] * xs[k][i, j] (plus outs[k][j] itself where add[k]),
    w: w32 for float32 parts, w64 for float64 ones.

    xs[k]: 2-d (B, N_k) aligned native float32/float64 views, any strides;
    outs[k]: 1-d (N_k,) views of xs[k]'s dtype, writable, overlapping no xs.
    The caller (clipcore._per_example) has checked all that; B > 0.
    """
    cdef Py_ssize_t total
    cdef WsJob job
    cdef int nt
    if w32.shape[0] == 0 or len(xs) == 0:
        return
    alloc_parts(&job, len(xs))
    job.scratch = NULL
    try:
        total = set_parts(&job, xs, outs, add, SUM_TILE)
        if job.n_parts == 0:
            return
        job.B = w32.shape[0]
        job.w32 = &w32[0]
        job.w64 = &w64[0]
        nt = resolve_threads(total, n_threads)
        if nt > job.n_tiles:        # run_items's team: a tile of scratch per thread
            nt = <int>job.n_tiles
        job.scratch = <double *>malloc(nt * job.tile * sizeof(double))
        if job.scratch == NULL:
            raise MemoryError()
        with nogil:
            run_items(job.n_tiles, ws_tile, &job, nt)
    finally:
        free(job.parts)
        free(job.scratch)


def row_sumsq(list xs, Py_ssize_t B, int n_threads):
    """Float64 sums of squares of each row i over every xs[k][i, :] ((B, N_k) views
    as for weighted_sum): per tile and row, then added in tile order (the same
    bits for any thread count). A float64 (B,) array."""
    cdef Py_ssize_t total, t, i
    cdef WsJob job
    cdef Rows rows
    cdef cnp.ndarray res = cnp.PyArray_ZEROS(1, [B], cnp.NPY_DOUBLE, 0)
    cdef double *r = <double *>cnp.PyArray_DATA(res)
    if B == 0 or len(xs) == 0:
        return res
    job.part = NULL
    alloc_parts(&job, len(xs))
    try:
        total = set_parts(&job, xs, None, None, TILE)
        if job.n_parts == 0:
            return res
        job.B = B
        job.part = <double *>malloc(job.n_tiles * B * sizeof(double))
        if job.part == NULL:
            raise MemoryError()
        rows.j = &job
        rows.i0 = 0
        rows.i1 = B
        with nogil:
            run_items(n_groups(&job), ss_group, &rows, resolve_threads(total, n_threads))
            for t in range(job.n_tiles):
                for i in range(B):
                    r[i] += job.part[t * B + i]
    finally:
        free(job.parts)
        free(job.part)
    return res


def clip_sum(list xs, list outs, list add, int rule, double bound, bint has_f64,
             double[::1] norms, Py_ssize_t block, int n_threads):
    """The one-read path: norms[i] = example i's 2-norm over every xs[k][i, :],
    w = clip_weight(norms) and outs[k] (+)= the weighted sums, as row_sumsq,
    weights and weighted_sum would compute them (the same bits), over blocks
    of block rows (a multiple of four) that the caches keep between their two reads.

    Arguments as weighted_sum's (B > 0 rows), rule and bound as weights'.
    Returns False, having written no out (norms partly), when a float64 sum
    of squares left float64's range (has_f64): the caller takes the range-safe path.
    """
    cdef Py_ssize_t total, B = norms.shape[0]
    cdef WsJob job
    cdef int rc
    if B == 0 or len(xs) == 0:
        return True
    alloc_parts(&job, len(xs))
    job.part = NULL
    try:
        total = set_parts(&job, xs, outs, add, TILE)
        if job.n_parts == 0:
            norms[:] = 0.0
            return True
        job.B = B
        job.block = block
        job.rule = rule
        job.bound = bound
        job.has_f64 = has_f64
        job.norms = &norms[0]
        # One block: the sums of squares, the weights, the column sums.
        job.part = <double *>malloc((job.n_tiles * block + 2 * B + job.n_cols) * sizeof(double))
        if job.part == NULL:
            raise MemoryError()
        job.w = job.part + job.n_tiles * block
        job.w32 = job.w
        job.w64 = job.w + B
        job.acc = job.w + 2 * B
        with nogil:
            rc = run_steps(n_blocks(&job) + 1, step_count, step_item, step_end, &job,
                           resolve_threads(total // B * block, n_threads))
        return rc == 0
    finally:
        free(job.parts)
        free(job.part)
