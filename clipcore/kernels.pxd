# clipcore's C-level API: nogil kernels over lists of buffers.
#
# Another Cython extension uses them with
#     from clipcore cimport kernels
# (Cython finds this file beside the installed package; no C header is needed:
# the functions come through the module's C-API capsule).

# Buffer kinds a Segment can hold.
cdef enum:
    SEG_F32 = 0        # float32, scaled in place
    SEG_F64 = 1        # float64, scaled in place
    SEG_F64_COPY = 2   # float64 copy of a buffer of another dtype: read, never scaled
    SEG_F16 = 3        # float16 (IEEE binary16), read as float32, scaled in float32 (RNE)
    SEG_BF16 = 4       # bfloat16, the same

# One run of equally spaced elements of one buffer.
cdef inline int segment_itemsize(int kind) noexcept nogil:
    return 4 if kind == SEG_F32 else 2 if kind == SEG_F16 or kind == SEG_BF16 else 8

ctypedef struct Segment:
    char *data            # first element
    Py_ssize_t n          # number of elements (> 0)
    Py_ssize_t stride     # distance between elements, in elements (may be < 0)
    int kind              # SEG_*

# A list of segments laid out as one sequence of elements that is cut into
# fixed-size chunks; starts[s] is the position of segs[s]'s first element.
ctypedef struct Layout:
    Segment *segs
    Py_ssize_t *starts
    Py_ssize_t n_segs
    Py_ssize_t n_total

# The factor a clip multiplies by, given the norm (1: write nothing; NaN: every
# element becomes NaN). It runs in every thread of the kernel's team: pure, nogil.
ctypedef double (*clip_rule)(double norm, const void *ctx) noexcept nogil

# The one thread-count policy: the team size for n_total elements when asked
# for n_threads (0: what OpenMP may use; < 0: up to -n_threads, an adapter's
# count, serial while late teams back the default off). Every parallel region
# takes its num_threads from here.
cdef int resolve_threads(Py_ssize_t n_total, int n_threads) noexcept nogil

# Work is cut into chunks of at least CHUNK_MIN elements, at most MAX_CHUNKS of
# them (the boundaries depend on the total only). For clipcore's own extensions:
# the elementwise engine and the out-of-place global clip cut theirs the same way.
cdef enum:
    CHUNK_MIN = 16384
    MAX_CHUNKS = 4096

cdef inline Py_ssize_t chunk_size(Py_ssize_t n_total) noexcept nogil:
    cdef Py_ssize_t c = (n_total + MAX_CHUNKS - 1) // MAX_CHUNKS
    return c if c > CHUNK_MIN else CHUNK_MIN

cdef inline Py_ssize_t chunk_count(Py_ssize_t n_total) noexcept nogil:
    return (n_total + chunk_size(n_total) - 1) // chunk_size(n_total)

# Elements per work item where an engine groups an array's rows into items of
# its own (the per-axis engine's blocks and pieces of rows, AGC's blocks of
# units). kernels.pyx's PARALLEL_MIN has the same value for another idea: the
# size of a whole call below which one thread does the work.
cdef enum:
    ITEM_ELEMENTS = 65536

# The index of the run holding position pos, given the runs' ascending first
# positions starts[0..n-1] (starts[0] <= pos): a layout's segment, a job's part.
cdef inline Py_ssize_t run_holding(const Py_ssize_t *starts, Py_ssize_t n,
                                   Py_ssize_t pos) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = n - 1, mid
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= pos:
            lo = mid
        else:
            hi = mid - 1
    return lo

# One item of work (a chunk, a block of rows, a tile), run without the GIL.
ctypedef void (*chunk_fn)(const void *ctx, Py_ssize_t i) noexcept nogil

# The one scheduler: fn(ctx, i) for every i in [0, n_items), each exactly once,
# on a team of n_threads (resolve_threads' answer; at most n_items of them).
# Each thread runs its own contiguous block of items in order, then claims
# what is left of the others' blocks, last first: a thread woken late does
# less instead of holding the others up. After the region, how long the team
# kept its first thread waiting feeds the default policy's back-off. One
# thread runs every item, in order, when n_threads <= 1, n_items <= 1 or the
# team's state cannot be allocated. fn may index per-thread scratch by its
# OpenMP thread number (< n_threads; 0 when serial).
cdef void run_items(Py_ssize_t n_items, chunk_fn fn, const void *ctx,
                    int n_threads) noexcept nogil

# Work in steps on one team, for work whose later items need a result of the
# earlier ones (per-example clipping's blocks: their weights need their norms):
# step s runs fn(ctx, s, i) for every i < count(ctx, s), the items handed out
# one at a time (to even ranks from the first, to odd ranks from the last);
# the thread that finishes the step's last item runs end(ctx, s), and the
# next step's items see what it wrote. A nonzero end ends the work and
# is returned (0 when every step ran). One parallel region for all the steps
# and no barrier: a thread woken late joins the step the others have reached,
# and the back-off judges the team over the whole call, as run_items does over
# its region. Serial, in order, as run_items.
ctypedef Py_ssize_t (*step_count_fn)(const void *ctx, Py_ssize_t s) noexcept nogil
ctypedef void (*step_fn)(const void *ctx, Py_ssize_t s, Py_ssize_t i) noexcept nogil
ctypedef int (*step_end_fn)(const void *ctx, Py_ssize_t s) noexcept nogil
cdef int run_steps(Py_ssize_t n_steps, step_count_fn count, step_fn fn, step_end_fn end,
                   const void *ctx, int n_threads) noexcept nogil

# The layer below run_items, for a region of its own whose passes share one
# set of claims (the fused norm and clip, the benchmarks' bandwidth probe): a
# Claims for n_chunks chunks, on the heap (a kernel may run in a thread with
# a small stack), no pass begun (one block: free() it; NULL out of memory);
# in every thread of the team, run_claimed runs fn(ctx, c) for the chunks this
# thread claims in the current pass. Unlike run_items, neither reports to the
# back-off.
ctypedef struct Claims:
    int passes                      # passes over the chunks the team has begun
    int *claims                     # per chunk c: passes that have claimed it
    int *owner                      # per chunk c: the thread that claimed it last

cdef Claims *claims_new(Py_ssize_t n_chunks) noexcept nogil
cdef void run_claimed(Claims *cl, Py_ssize_t n_chunks, chunk_fn fn, const void *ctx,
                      int rank, int size) noexcept nogil

# The process's tuning table (cc_platform.h CC_TUNE_*): every module that includes
# the loops points its cc_tuning here when it loads.
cdef int *tuning_table() noexcept nogil

cdef double layout_norm(const Layout *lay, double norm_type, int n_threads) noexcept nogil
cdef void layout_scale(const Layout *lay, double scale, int n_threads) noexcept nogil
# The norm, then the scaling by rule(norm, ctx), in one parallel region; returns the norm.
cdef double layout_clip(const Layout *lay, double norm_type, clip_rule rule, const void *ctx,
                        int n_threads) noexcept nogil

# Out of place: dst = src * scale (s32 for float32 pairs, s64 for float64) for
# contiguous pairs laid end to end, starts[k] the position of pairs[k]'s first
# element, in the kernels' chunks (dst == src scales in place).
ctypedef struct Pair:
    const char *src
    char *dst
    Py_ssize_t n          # elements
    int f64               # float64 (else float32)

cdef void scale_into(const Pair *pairs, const Py_ssize_t *starts, Py_ssize_t count,
                     float s32, double s64, int n_threads) noexcept nogil

# Pointer-and-length forms for other extensions (float32 buffers, contiguous).
cdef double norm_f32(float **ptrs, const Py_ssize_t *lengths, Py_ssize_t count,
                     double norm_type, int n_threads) noexcept nogil
cdef void scale_f32(float **ptrs, const Py_ssize_t *lengths, Py_ssize_t count,
                    float scale, int n_threads) noexcept nogil
# Clamp in place into [lo, hi] as PyTorch's clamp does (hi wherever lo > hi; a
# NaN element or a NaN bound gives NaN); 0, or -1 (nothing written) out of memory.
cdef int clip_value_f32(float **ptrs, const Py_ssize_t *lengths, Py_ssize_t count,
                        float lo, float hi, int n_threads) noexcept nogil
