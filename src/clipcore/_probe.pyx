"""The benchmarks' bandwidth probe: the ceiling a clip is measured against.

Not part of clipcore's API: ``python -m clipcore bench`` and ``benchmarks/``
use it. It runs the plainest streaming loops over a float32 buffer on the
kernels' own scheduler (``run_claimed``) and thread policy
(``resolve_threads``), through the public ``clipcore/kernels.pxd``.
"""
from cython.parallel cimport parallel
from libc.stdlib cimport malloc, free

from clipcore.kernels cimport (Claims, claims_new, run_claimed, resolve_threads, chunk_size,
                               chunk_count, tuning_table)
from clipcore._loops cimport cc_team_rank, cc_team_size, cc_use_tuning

cc_use_tuning(tuning_table())       # the kernels module's choices (cc_platform.h)

cdef extern from "cc_platform.h" nogil:
    enum: CC_TUNE_SCALE_BACKWARD

cdef extern from "cc_reduce.h" nogil:
    int CC_SUMSQ
    double cc_reduce_one_f32(const float *x, Py_ssize_t n, Py_ssize_t stride, int kind,
                             double p, double scale)

cdef extern from "cc_scale.h" nogil:
    void cc_scale_f32(float *x, Py_ssize_t n, Py_ssize_t stride, double s)

cdef extern from "cc_probe.h" nogil:
    float cc_probe_read_f32(const float *x, Py_ssize_t n)

cdef extern from "cc_elementwise.h" nogil:
    ctypedef void (*cc_loop_fn)(char **p, const Py_ssize_t *s, Py_ssize_t n)
    enum: CC_F32, CC_OP_MUL
    cc_loop_fn cc_get_loop_for(int tcode, int op, Py_ssize_t out_bytes)

cdef extern from * nogil:
    """
    /* o = x * 1 with the given elementwise multiply loop (the copy probe). */
    static void cc_probe_copy_f32(cc_loop_fn mul, const float *x, float *o, ptrdiff_t n) {
        static const float one = 1.0f;
        char *p[3] = { (char *)x, (char *)&one, (char *)o };
        const ptrdiff_t s[3] = { 1, 0, 1 };
        mul(p, s, n);
    }
    """
    void cc_probe_copy_f32(cc_loop_fn mul, const float *x, float *o, Py_ssize_t n)


ctypedef struct Probe:
    float *x
    float *o              # the copy's destination (NULL: x *= 1 in place)
    Py_ssize_t n, chunk, n_chunks
    bint square           # the read pass runs the norm's loop, not a plain sum
    double *sums          # chunk c's sum: kept, so the read cannot be optimized away
    cc_loop_fn copy
    Claims *cl


cdef inline Py_ssize_t chunk_len(const Probe *p, Py_ssize_t c) noexcept nogil:
    return min((c + 1) * p.chunk, p.n) - c * p.chunk


cdef void read_chunk(const void *ctx, Py_ssize_t c) noexcept nogil:
    cdef const Probe *p = <const Probe *>ctx
    cdef const float *x = p.x + c * p.chunk
    if p.square:
        p.sums[c] = cc_reduce_one_f32(x, chunk_len(p, c), 1, CC_SUMSQ, 2.0, 1.0)
    else:
        p.sums[c] = cc_probe_read_f32(x, chunk_len(p, c))


cdef void scale_chunk(const void *ctx, Py_ssize_t c) noexcept nogil:
    cdef const Probe *p = <const Probe *>ctx
    cc_scale_f32(p.x + c * p.chunk, chunk_len(p, c), 1, 1.0)


cdef void copy_chunk(const void *ctx, Py_ssize_t c) noexcept nogil:
    """o = x over chunk c, with the loop an elementwise out= op uses."""
    cdef const Probe *p = <const Probe *>ctx
    cc_probe_copy_f32(p.copy, p.x + c * p.chunk, p.o + c * p.chunk, chunk_len(p, c))


cdef void scale_own_chunks(const Probe *p, int rank, int size) noexcept nogil:
    """The read-write pass after the read pass, as a clip's scaling runs: each
    thread the chunks it read (last first where the tuning says so: the ones
    still in its cache); a chunk read by a thread this team lacks goes to
    rank owner % size."""
    cdef bint backward = tuning_table()[CC_TUNE_SCALE_BACKWARD]
    cdef Py_ssize_t i, c
    for i in range(p.n_chunks):
        c = p.n_chunks - 1 - i if backward else i
        if p.cl.owner[c] % size == rank:
            scale_chunk(p, c)


def bandwidth_probe(float[::1] buf, int n_threads=0, *, bint read=True, float[::1] out=None,
                    bint square=False):
    """A read pass, then a read-write pass (``x *= 1``) over buf, for the benchmarks' ceiling.

    Parameters
    ----------
    buf : float32 array, contiguous and writable
        The memory to stream over; its values are left as they are.
    n_threads : int
        Threads as the kernels take them (0: what OpenMP may use).
    read : bool
        False: only the read-write pass runs (what an in-place elementwise op moves).
    out : float32 array as long as buf, optional
        The second pass copies buf into out instead, with the stores an
        elementwise op's ``out=`` uses: a read pass and a write pass over two buffers.
    square : bool
        The read pass runs the norm's own loop (squares summed in float64)
        instead of a plain sum; which reads faster depends on where the data
        lie, so the benchmarks take the faster.

    Returns
    -------
    (seconds_read, seconds_read_write)
        Timed around each pass; seconds_read is None with read=False.

    Raises
    ------
    ValueError
        If out is not as long as buf (before any pass).

    Notes
    -----
    The passes share out the chunks as the kernels' passes do (claimed; the
    read-write pass after a read over each thread's own chunks), with the
    plainest loops: what a clip costs without its arithmetic, on the threads
    a kernel would use.
    """
    from time import perf_counter
    cdef Probe p
    cdef int nt
    p.n = buf.shape[0]
    if out is not None and out.shape[0] != p.n:
        raise ValueError(f"out: {out.shape[0]} elements, buf has {p.n}")
    p.x = &buf[0] if p.n else NULL
    p.o = &out[0] if out is not None and p.n else NULL
    p.chunk = chunk_size(p.n)
    p.n_chunks = chunk_count(p.n)
    p.square = square
    p.copy = cc_get_loop_for(CC_F32, CC_OP_MUL, p.n * 4)
    nt = resolve_threads(p.n, n_threads)
    p.cl = claims_new(p.n_chunks)
    p.sums = <double *>malloc((p.n_chunks + 1) * sizeof(double))   # + 1: never malloc(0)
    try:
        if p.cl == NULL or p.sums == NULL:
            raise MemoryError()
        t0 = perf_counter()
        if read:
            with nogil, parallel(num_threads=nt):
                run_claimed(p.cl, p.n_chunks, read_chunk, &p, cc_team_rank(), cc_team_size())
            p.cl.passes = 1
        t1 = perf_counter()
        with nogil, parallel(num_threads=nt):
            if out is not None:
                run_claimed(p.cl, p.n_chunks, copy_chunk, &p, cc_team_rank(), cc_team_size())
            elif read:
                scale_own_chunks(&p, cc_team_rank(), cc_team_size())
            else:
                run_claimed(p.cl, p.n_chunks, scale_chunk, &p, cc_team_rank(), cc_team_size())
        t2 = perf_counter()
    finally:
        free(p.cl)
        free(p.sums)
    return (t1 - t0) if read else None, t2 - t1
