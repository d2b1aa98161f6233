"""Fused norm and rescale kernels over lists of float32/float64/float16/bfloat16 buffers.

All elements of all buffers form one sequence that is cut into fixed-size
chunks; chunk boundaries depend only on the total size, so each chunk's
float64 partial is the same whatever thread computes it, and partials are
combined in chunk order: the result is bitwise identical for any thread count.
"""
from cython.parallel cimport parallel
from libc.math cimport sqrt, pow, ldexp, INFINITY, NAN, isnan
from libc.stdlib cimport malloc, calloc, free
from libc.stddef cimport ptrdiff_t
from libc.limits cimport INT_MAX

from clipcore._loops cimport (cc_openmp_enabled, cc_max_threads, cc_num_procs, cc_simd_path,
                              cc_team_rank, cc_team_size, cc_now)

cdef extern from "cc_platform.h" nogil:
    void cc_team_barrier()
    int cc_exchange(int *x, int v)
    int cc_load(const int *x)
    long long cc_fetch_add(long long *x, long long v)
    void cc_store_sync(int *x, int v)
    int cc_load_sync(const int *x)
    void cc_pause()
    void cc_yield()
    int cc_install_fork_guard()
    int cc_in_forked_child()
    enum: CC_TUNE_PREFETCH, CC_TUNE_SCALE_BACKWARD, CC_TUNE_TWINS, CC_TUNE_PREFETCH16, CC_TUNE_COUNT
    int *cc_own_tuning()
    ctypedef unsigned long long cc_fpmode
    cc_fpmode CC_FP_FLUSH
    cc_fpmode cc_fp_get()
    cc_fpmode cc_fp_set(cc_fpmode mode)

cdef extern from "cc_reduce.h" nogil:
    enum: CC_LANES
    int CC_SUMSQ, CC_SUMABS, CC_MAXABS, CC_SUMPOW
    void cc_reduce_f32(const float *x, Py_ssize_t n, Py_ssize_t stride, int kind, double p,
                       double scale, double *acc)
    void cc_reduce_f64(const double *x, Py_ssize_t n, Py_ssize_t stride, int kind, double p,
                       double scale, double *acc)
    void cc_reduce_f16(const unsigned short *x, Py_ssize_t n, Py_ssize_t stride, int kind,
                       double p, double scale, double *acc)
    void cc_reduce_bf16(const unsigned short *x, Py_ssize_t n, Py_ssize_t stride, int kind,
                        double p, double scale, double *acc)
    void cc_reduce_f32_pieces(const float **xs, const ptrdiff_t *ns, ptrdiff_t count, int kind,
                              double p, double scale, double *acc)
    void cc_reduce_f64_pieces(const double **xs, const ptrdiff_t *ns, ptrdiff_t count,
                              int kind, double p, double scale, double *acc)
    void cc_reduce_f16_pieces(const unsigned short **xs, const ptrdiff_t *ns, ptrdiff_t count,
                              int kind, double p, double scale, double *acc)
    void cc_reduce_bf16_pieces(const unsigned short **xs, const ptrdiff_t *ns, ptrdiff_t count,
                               int kind, double p, double scale, double *acc)
    double cc_combine_lanes(double *acc, int is_max)
    double cc_max_nan(double a, double b)

cdef extern from "cc_scale.h" nogil:
    void cc_scale_f32(float *x, Py_ssize_t n, Py_ssize_t stride, double s)
    void cc_scale_f64(double *x, Py_ssize_t n, Py_ssize_t stride, double s)
    void cc_scale_f16(unsigned short *x, Py_ssize_t n, Py_ssize_t stride, double s)
    void cc_scale_bf16(unsigned short *x, Py_ssize_t n, Py_ssize_t stride, double s)

cdef extern from "cc_elementwise.h" nogil:
    int CC_F32, CC_F64, CC_OP_MUL
    ctypedef void (*cc_loop_fn)(char **p, const Py_ssize_t *s, Py_ssize_t n) noexcept nogil
    cc_loop_fn cc_get_loop_for(int tcode, int op, Py_ssize_t out_bytes)

cdef extern from * nogil:
    """
    /* Clamp a contiguous float32 run into [lo, hi]: max first, then min (as
     * PyTorch's clamp), written so that a NaN element stays NaN and the
     * compiler emits packed max/min instructions. */
    CC_CLONES CC_UNUSED static void cc_clamp_f32(float *x, ptrdiff_t n, float lo, float hi) {
        for (ptrdiff_t i = 0; i < n; i++) {
            float v = x[i];
            v = lo > v ? lo : v;
            x[i] = v > hi ? hi : v;
        }
    }
    """
    void cc_clamp_f32(float *x, Py_ssize_t n, float lo, float hi)

# Chunks (kernels.pxd) hold at least CHUNK_MIN elements and there are at most
# MAX_CHUNKS of them, so a team's per-chunk state is small (and on the heap: a
# kernel may run in a thread with a small stack). Below PARALLEL_MIN elements
# one thread does the work: even an awake team costs more than it saves. When
# n_threads is not given, one thread also does work below _auto_parallel_min
# elements: OpenMP's idle threads soon sleep (GOMP_SPINCOUNT, see __init__.py),
# and one woken costs its waker time and starts late, while one core reads a
# list that fits its L2 fast. The crossover is found per machine on lists
# written just before each call, as a training loop writes its gradients.
# A team has at most THREADS_PER_PROC threads per processor: more only costs
# memory and thread creation (which can fail and abort the process), and the
# results are the same bits for any team size. More than one per processor
# stays possible: the tests use it to make threads take over chunks.
cdef enum:
    PARALLEL_MIN = 65536    # a whole call's size; kernels.pxd's ITEM_ELEMENTS is another idea
    THREADS_PER_PROC = 4
# The default policy's crossover (elements); clipcore._tuning sets it per machine.
cdef Py_ssize_t _auto_parallel_min = 655360

# A team whose caller waited for the others most of the call -- their cores
# busy with other work, a thread preempted mid-chunk or woken late -- makes
# the default policy run serially for a while: LATE_BACKOFF_MIN seconds, or
# twice the last back-off (up to LATE_BACKOFF_MAX) when the last late team
# was less than LATE_MEMORY back-offs ago. A busy core lets some teams through
# on time, so one on time does not end a run of late ones. An explicit
# n_threads is always honoured.
cdef double LATE_WAIT_MIN = 50e-6
cdef double LATE_BACKOFF_MIN = 0.05
cdef double LATE_BACKOFF_MAX = 2.0
cdef double LATE_MEMORY = 4.0
cdef double _serial_until = 0.0
cdef double _late_backoff = 0.0
cdef double _last_late = 0.0

cdef int _max_team = THREADS_PER_PROC * (cc_num_procs() if cc_num_procs() > 0 else 1)

if cc_install_fork_guard() != 0:
    raise ImportError("clipcore.kernels: pthread_atfork failed (out of memory)")


cdef int resolve_threads(Py_ssize_t n_total, int n_threads) noexcept nogil:
    """Threads to use: n_threads if > 0; -n_threads if < 0 (an adapter's count),
    or 1 while backing off from late teams; for 0, what OpenMP may use, or 1
    for lists below the crossover and while backing off. 1 for small work or
    in a forked child; never more than chunks, nor than _max_team."""
    cdef Py_ssize_t cap = chunk_count(n_total)
    if cc_in_forked_child() or n_total < PARALLEL_MIN:
        return 1
    if n_threads < 0:       # an adapter's count (clipcore.torch: torch's), backing off too
        if _serial_until > 0.0 and cc_now() < _serial_until:
            return 1
        n_threads = -n_threads
    elif n_threads == 0:
        if n_total < _auto_parallel_min or (_serial_until > 0.0 and cc_now() < _serial_until):
            return 1
        n_threads = cc_max_threads()
    if cap > _max_team:
        cap = _max_team
    if n_threads > cap:
        n_threads = <int>cap
    return n_threads if n_threads > 0 else 1


# One pass over a layout: every chunk, each cut into its segments' pieces.
cdef enum:
    PASS_REDUCE = 0    # reduction of chunk c (kind, p, and scale: |x| / scale for CC_SUMPOW)
    PASS_SCALE = 1     # x *= factor (SEG_F64_COPY segments are left alone; 16-bit ones
                       # by the factor as float32, rounded once to their type)
    PASS_CLAMP = 2     # x = min(max(x, lo), hi): float32 segments, contiguous

ctypedef struct Pass:
    int what
    int kind
    double p, scale
    double *partials   # chunk c's result, when a team runs the pass (pass_claimed)
    double factor
    float lo, hi


# A reduction hands the contiguous pieces of a chunk to its loop PIECES at a
# time, so that a list of small buffers keeps the lanes in registers.
cdef enum:
    PIECES = 32

ctypedef struct Pieces:
    int kind                   # SEG_* of every piece held
    ptrdiff_t count
    const char *xs[PIECES]
    ptrdiff_t ns[PIECES]


cdef void reduce_pieces(Pieces *run, const Pass *ps, double *acc) noexcept nogil:
    """Reduce the contiguous pieces held into acc (as one call per piece would), and empty run."""
    if run.count == 0:
        return
    if run.kind == SEG_F32:
        cc_reduce_f32_pieces(<const float **>run.xs, run.ns, run.count, ps.kind, ps.p,
                             ps.scale, acc)
    elif run.kind == SEG_F16:
        cc_reduce_f16_pieces(<const unsigned short **>run.xs, run.ns, run.count, ps.kind,
                             ps.p, ps.scale, acc)
    elif run.kind == SEG_BF16:
        cc_reduce_bf16_pieces(<const unsigned short **>run.xs, run.ns, run.count, ps.kind,
                              ps.p, ps.scale, acc)
    else:
        cc_reduce_f64_pieces(<const double **>run.xs, run.ns, run.count, ps.kind, ps.p,
                             ps.scale, acc)
    run.count = 0


cdef void reduce_strided(const Segment *seg, const char *x, Py_ssize_t n, const Pass *ps,
                         double *acc) noexcept nogil:
    """Reduce n elements of seg from x (seg's stride apart) into acc."""
    if seg.kind == SEG_F32:
        cc_reduce_f32(<const float *>x, n, seg.stride, ps.kind, ps.p, ps.scale, acc)
    elif seg.kind == SEG_F16:
        cc_reduce_f16(<const unsigned short *>x, n, seg.stride, ps.kind, ps.p, ps.scale, acc)
    elif seg.kind == SEG_BF16:
        cc_reduce_bf16(<const unsigned short *>x, n, seg.stride, ps.kind, ps.p, ps.scale, acc)
    else:
        cc_reduce_f64(<const double *>x, n, seg.stride, ps.kind, ps.p, ps.scale, acc)


cdef double pass_chunk(const Layout *lay, const Pass *ps, Py_ssize_t c, Py_ssize_t chunk) noexcept nogil:
    """Run the pass over chunk c; returns its result (0 for a pass that writes).
    A reduction's pieces share one set of lanes, each piece in turn."""
    cdef double acc[CC_LANES]
    cdef Pieces run
    cdef Py_ssize_t lo = c * chunk, hi = lo + chunk, s = run_holding(lay.starts, lay.n_segs, lo), off, take, k
    cdef const Segment *seg
    cdef char *x
    if hi > lay.n_total:
        hi = lay.n_total
    if ps.what == PASS_REDUCE:
        for k in range(CC_LANES):
            acc[k] = 0.0
        run.count = 0
    while lo < hi:
        seg = &lay.segs[s]
        off = lo - lay.starts[s]
        take = seg.n - off if seg.n - off < hi - lo else hi - lo
        x = seg.data + off * seg.stride * segment_itemsize(seg.kind)
        if ps.what == PASS_REDUCE:
            if run.count == PIECES or (run.count > 0 and (seg.kind != run.kind or seg.stride != 1)):
                reduce_pieces(&run, ps, acc)
            if seg.stride == 1:
                run.kind = seg.kind
                run.xs[run.count] = x
                run.ns[run.count] = take
                run.count += 1
            else:
                reduce_strided(seg, x, take, ps, acc)
        elif ps.what == PASS_SCALE:
            if seg.kind == SEG_F32:
                cc_scale_f32(<float *>x, take, seg.stride, ps.factor)
            elif seg.kind == SEG_F64:
                cc_scale_f64(<double *>x, take, seg.stride, ps.factor)
            elif seg.kind == SEG_F16:
                cc_scale_f16(<unsigned short *>x, take, seg.stride, ps.factor)
            elif seg.kind == SEG_BF16:
                cc_scale_bf16(<unsigned short *>x, take, seg.stride, ps.factor)
        else:
            cc_clamp_f32(<float *>x, take, ps.lo, ps.hi)
        lo += take
        s += 1
    if ps.what == PASS_REDUCE:
        reduce_pieces(&run, ps, acc)
        return cc_combine_lanes(acc, ps.kind == CC_MAXABS)
    return 0.0


cdef inline bint has_result(const Pass *ps) noexcept nogil:
    return ps.what == PASS_REDUCE


cdef inline double combine(int kind, double acc, double v) noexcept nogil:
    """Chunk results combined: NaN-propagating max for CC_MAXABS, else a sum."""
    return cc_max_nan(acc, v) if kind == CC_MAXABS else acc + v


cdef double pass_all(const Layout *lay, const Pass *ps, bint backward=False) noexcept nogil:
    """One thread runs the pass over every chunk (last chunk first if backward);
    returns the chunks' results combined in chunk order, as a team combines them."""
    cdef Py_ssize_t chunk = chunk_size(lay.n_total), n_chunks = chunk_count(lay.n_total), c
    cdef double acc = 0.0, v
    if backward:
        for c in range(n_chunks - 1, -1, -1):
            pass_chunk(lay, ps, c, chunk)
    else:
        for c in range(n_chunks):
            v = pass_chunk(lay, ps, c, chunk)
            if has_result(ps):
                acc = combine(ps.kind, acc, v)
    return acc


# In a team, each thread runs through its own block of chunks, claiming each,
# then takes from the end of the other blocks what their threads have not
# reached: the first thread starts at once, and one that OpenMP must first wake
# (see _auto_parallel_min) does less instead of making the others wait for its
# block. A thread's chunks stay contiguous, so its prefetches run ahead into its
# own next chunk (claiming single chunks in turn is slower than blocks).
ctypedef struct Team:
    Claims *cl
    double *partials                # chunk c's reduction
    double waited                   # seconds thread 0 spent at the team's barriers
    double t_free                   # when thread 0 finished its part (cc_now)


cdef Claims *claims_new(Py_ssize_t n_chunks) noexcept nogil:
    """Claims for n_chunks chunks, no pass begun (one block: free() it); NULL out of memory."""
    cdef Claims *cl = <Claims *>malloc(sizeof(Claims) + 2 * n_chunks * sizeof(int))
    cdef Py_ssize_t c
    if cl == NULL:
        return NULL
    cl.passes = 0
    cl.claims = <int *>(cl + 1)
    cl.owner = cl.claims + n_chunks
    for c in range(n_chunks):
        cl.claims[c] = 0
    return cl


cdef void note_wait(double waited, double total) noexcept nogil:
    """After a team's region: back the default policy off when the thread that
    started it spent more than a quarter of the call (and LATE_WAIT_MIN) waiting
    for the others (see LATE_BACKOFF_MIN); else stop backing off."""
    global _serial_until, _late_backoff, _last_late
    cdef double now
    if waited < LATE_WAIT_MIN or waited < 0.25 * total:
        _serial_until = 0.0
        return
    now = cc_now()
    if _late_backoff > 0.0 and now - _last_late < LATE_MEMORY * _late_backoff:
        _late_backoff = min(2 * _late_backoff, LATE_BACKOFF_MAX)
    else:
        _late_backoff = LATE_BACKOFF_MIN
    _last_late = now
    _serial_until = now + _late_backoff


cdef int team_open(Team *team, Py_ssize_t n_chunks, bint partials=True) noexcept nogil:
    """A team's state for n_chunks chunks, on the heap (partials: room for
    per-chunk results); 0, or -1 out of memory (then nothing is left to free)."""
    team.waited = 0.0
    team.t_free = 0.0
    team.cl = claims_new(n_chunks)
    team.partials = NULL
    if partials:
        team.partials = <double *>malloc((n_chunks + 1) * sizeof(double))   # + 1: never malloc(0)
    if team.cl == NULL or (partials and team.partials == NULL):
        team_close(team)
        return -1
    return 0


cdef void team_close(Team *team) noexcept nogil:
    free(team.cl)
    free(team.partials)
    team.cl = NULL
    team.partials = NULL


cdef inline bint claim(Claims *cl, Py_ssize_t c) noexcept nogil:
    """True in the one thread that takes chunk c in the team's current pass."""
    cdef int now = cl.passes
    return cc_load(&cl.claims[c]) == now and cc_exchange(&cl.claims[c], now + 1) == now


cdef void run_claimed(Claims *cl, Py_ssize_t n_chunks, chunk_fn fn, const void *ctx,
                      int rank, int size) noexcept nogil:
    """In every thread of a team, inside its region: fn(ctx, c) for the chunks
    this thread claims in the current pass: its block of chunks in order, then
    what is left of the other blocks, last chunk first."""
    cdef Py_ssize_t first, end, i, c
    cdef int r, other
    for r in range(size):
        other = (rank + r) % size
        first = other * n_chunks // size
        end = (other + 1) * n_chunks // size
        for i in range(first, end):
            c = i if r == 0 else first + end - 1 - i
            if claim(cl, c):
                cl.owner[c] = rank
                fn(ctx, c)


cdef void run_items(Py_ssize_t n_items, chunk_fn fn, const void *ctx,
                    int n_threads) noexcept nogil:
    """fn(ctx, i) for every item, on a team of n_threads claiming them (kernels.pxd)."""
    cdef Team team
    cdef Py_ssize_t i
    cdef double t_start
    cdef cc_fpmode mode, own = 0     # own: each thread's (Cython makes it firstprivate)
    if n_threads > n_items:
        n_threads = <int>n_items
    if n_threads <= 1 or team_open(&team, n_items, False) != 0:
        for i in range(n_items):
            fn(ctx, i)
        return
    t_start = cc_now()
    mode = cc_fp_get()
    with parallel(num_threads=n_threads):
        own = cc_fp_set(mode)            # the caller's mode (cc_platform.h)
        run_claimed(team.cl, n_items, fn, ctx, cc_team_rank(), cc_team_size())
        team_done(&team, cc_team_rank())
        cc_fp_set(own)
    note_team(&team, t_start)
    team_close(&team)


ctypedef struct Steps:              # run_steps' work, shared by its team
    step_count_fn count
    step_fn fn
    step_end_fn end
    const void *ctx
    int n_steps
    int step                        # the step whose items are handed out (n_steps: none)
    int rc                          # end's nonzero result
    long long *given                # per step: claims from the front, and from the back
    long long *done                 # per step: items finished


cdef enum:
    STEP_SPINS = 1000               # polls with a pause before each poll yields the core
    BACK_SHIFT = 32                 # given's claims from the back: its bits from this one up


cdef void end_step(Steps *st, int s) noexcept nogil:
    """In the thread that finished step s's last item: end(s), then the next
    step (or none left) for every thread to see."""
    cdef int rc = st.end(st.ctx, s)
    if rc != 0:
        st.rc = rc
        cc_store_sync(&st.step, st.n_steps)
    else:
        cc_store_sync(&st.step, s + 1)


cdef inline int claim_item(long long *given, int n, bint back) noexcept nogil:
    """A step's next item from its front or its back (one word holds both
    ends' claims, so they never meet on one item), or -1: all handed out."""
    cdef long long was = cc_fetch_add(given, (1LL << BACK_SHIFT) if back else 1)
    cdef long long front = (was & ((1LL << BACK_SHIFT) - 1)) + (0 if back else 1)
    cdef long long from_back = (was >> BACK_SHIFT) + (1 if back else 0)
    if front + from_back > n:
        return -1
    return <int>(n - from_back if back else front - 1)


cdef void team_steps(Steps *st, Team *team, int rank) noexcept nogil:
    """In every thread of a team: items of the current step, one at a time,
    until the steps are over. Even ranks take a step's items from its first,
    odd ranks from its last, so that a step whose items are of two kinds
    (clip_sum's: sums from cache, then norms from memory) runs both at once.
    No barrier: a thread woken late starts at the step the others have
    reached, and only a step's own items hold it back."""
    cdef int s, i, n, polls
    cdef double t0
    while True:
        s = cc_load_sync(&st.step)
        if s >= st.n_steps:
            return
        n = <int>st.count(st.ctx, s)
        i = claim_item(&st.given[s], n, rank % 2 == 1)
        if i >= 0:
            st.fn(st.ctx, s, i)
            if cc_fetch_add(&st.done[s], 1) == n - 1:
                end_step(st, s)
        elif n == 0 and cc_fetch_add(&st.done[s], 1) == 0:
            end_step(st, s)
        else:                        # every item handed out: wait for the step's end
            t0 = cc_now() if rank == 0 else 0.0
            polls = 0
            while cc_load_sync(&st.step) == s:
                polls += 1
                if polls < STEP_SPINS:
                    cc_pause()
                else:
                    cc_yield()
            if rank == 0:
                team.waited += cc_now() - t0


cdef int run_steps(Py_ssize_t n_steps, step_count_fn count, step_fn fn, step_end_fn end,
                   const void *ctx, int n_threads) noexcept nogil:
    """Steps in order on one team (kernels.pxd); end's first nonzero result, or 0."""
    cdef Team team
    cdef Steps st
    cdef Py_ssize_t s, i, most = 0
    cdef int rc
    cdef double t_start
    cdef cc_fpmode mode, own = 0     # own: each thread's (Cython makes it firstprivate)
    for s in range(n_steps):
        most = max(most, count(ctx, s))
    if n_threads > most:
        n_threads = <int>most
    st.given = NULL
    if n_threads > 1 and n_steps < INT_MAX and most < INT_MAX - n_threads:
        st.given = <long long *>calloc(2 * n_steps, sizeof(long long))
    if st.given == NULL or team_open(&team, 0, False) != 0:
        free(st.given)
        for s in range(n_steps):
            for i in range(count(ctx, s)):
                fn(ctx, s, i)
            rc = end(ctx, s)
            if rc != 0:
                return rc
        return 0
    st.count = count
    st.fn = fn
    st.end = end
    st.ctx = ctx
    st.n_steps = <int>n_steps
    st.step = 0
    st.rc = 0
    st.done = st.given + n_steps
    t_start = cc_now()
    mode = cc_fp_get()
    with parallel(num_threads=n_threads):
        own = cc_fp_set(mode)            # as in run_items
        team_steps(&st, &team, cc_team_rank())
        team_done(&team, cc_team_rank())
        cc_fp_set(own)
    note_team(&team, t_start)
    team_close(&team)
    free(st.given)
    return st.rc


ctypedef struct LayoutPass:
    const Layout *lay
    const Pass *ps


cdef void layout_pass_chunk(const void *ctx, Py_ssize_t c) noexcept nogil:
    cdef const LayoutPass *job = <const LayoutPass *>ctx
    cdef double v = pass_chunk(job.lay, job.ps, c, chunk_size(job.lay.n_total))
    if has_result(job.ps):
        job.ps.partials[c] = v


cdef void pass_claimed(const Layout *lay, const Pass *ps, Team *team,
                       int rank, int size) noexcept nogil:
    """This thread's share of a pass over the layout (run_claimed)."""
    cdef LayoutPass job
    job.lay = lay
    job.ps = ps
    run_claimed(team.cl, chunk_count(lay.n_total), layout_pass_chunk, &job, rank, size)


cdef void scale_claimed(const Layout *lay, const Pass *ps, Team *team, int rank) noexcept nogil:
    """This thread's share of the scaling pass after a claimed reduction: the
    chunks it reduced (last first, where the tuning says so: they are the ones
    still in its cache), then any left, first first."""
    cdef Py_ssize_t chunk = chunk_size(lay.n_total), n_chunks = chunk_count(lay.n_total), c, i
    cdef bint backward = cc_own_tuning()[CC_TUNE_SCALE_BACKWARD]
    for i in range(n_chunks):
        c = n_chunks - 1 - i if backward else i
        if team.cl.owner[c] == rank and claim(team.cl, c):
            pass_chunk(lay, ps, c, chunk)
    for c in range(n_chunks):
        if claim(team.cl, c):
            pass_chunk(lay, ps, c, chunk)


cdef void team_barrier(Team *team, int rank) noexcept nogil:
    """The team's barrier; thread 0 counts the time it waits there."""
    cdef double t0 = cc_now() if rank == 0 else 0.0
    cc_team_barrier()
    if rank == 0:
        team.waited += cc_now() - t0


cdef void team_done(Team *team, int rank) noexcept nogil:
    """In every thread at the end of its part of a region: thread 0 notes when."""
    if rank == 0:
        team.t_free = cc_now()


cdef void note_team(Team *team, double t_start) noexcept nogil:
    """After a team's region (see note_wait)."""
    cdef double t_end = cc_now()
    note_wait(team.waited + t_end - team.t_free, t_end - t_start)


cdef void run_pass(const Layout *lay, const Pass *ps, int n_threads) noexcept nogil:
    """A pass that writes (no per-chunk results) over every chunk, on the
    threads resolve_threads gives."""
    cdef LayoutPass job
    job.lay = lay
    job.ps = ps
    run_items(chunk_count(lay.n_total), layout_pass_chunk, &job,
              resolve_threads(lay.n_total, n_threads))


# The norm and the clip run as a team: the threads of one parallel region
# reduce the chunks they claim, wait for each other, then each adds all
# partials itself in chunk order (the same bits in every thread), so the norm,
# the scale and the scaling pass need no second region.

cdef double team_reduce(const Layout *lay, int kind, double p, double scale,
                        Team *team, int rank, int size) noexcept nogil:
    """Sum (or NaN-propagating max) of per-element terms, in every thread of the team."""
    cdef Py_ssize_t c
    cdef double acc = 0.0
    cdef Pass ps
    ps.what = PASS_REDUCE
    ps.kind = kind
    ps.p = p
    ps.scale = scale
    if size == 1:
        return pass_all(lay, &ps)
    ps.partials = team.partials
    pass_claimed(lay, &ps, team, rank, size)
    team_barrier(team, rank)     # every partial written
    for c in range(chunk_count(lay.n_total)):
        acc = combine(kind, acc, team.partials[c])
    if rank == 0:
        team.cl.passes += 1
    team_barrier(team, rank)     # partials read before another pass claims chunks
    return acc


cdef bint has_f64(const Layout *lay) noexcept nogil:
    cdef Py_ssize_t s
    for s in range(lay.n_segs):
        if lay.segs[s].kind == SEG_F64 or lay.segs[s].kind == SEG_F64_COPY:
            return True
    return False


# A float64 square overflows for |x| > 2^511 and loses digits below 2^-537; a
# float32 one (or a 16-bit one's) never does. Below SUMSQ_TINY, squares that
# underflowed may matter.
cdef double SUMSQ_TINY = ldexp(1.0, -960)


cdef double team_scaled_norm(const Layout *lay, double norm_type, Team *team,
                             int rank, int size) noexcept nogil:
    """m * (sum (|x| / m)^p)^(1/p), m the max |x|: |x| / m <= 1, so the sum
    neither overflows nor loses the largest terms (dividing, as a reciprocal of a
    subnormal m would be inf)."""
    cdef double m = team_reduce(lay, CC_MAXABS, 0.0, 1.0, team, rank, size), s
    if norm_type == INFINITY or m == 0.0 or m == INFINITY or isnan(m):
        return m
    s = team_reduce(lay, CC_SUMPOW, norm_type, m, team, rank, size)
    return m * (sqrt(s) if norm_type == 2.0 else pow(s, 1.0 / norm_type))


cdef double team_norm(const Layout *lay, double norm_type, Team *team,
                      int rank, int size) noexcept nogil:
    """The norm_type-norm over all elements (norm_type > 0), in every thread of the team."""
    cdef double s
    if lay.n_total == 0:
        return 0.0
    if norm_type == 1.0:
        return team_reduce(lay, CC_SUMABS, 1.0, 1.0, team, rank, size)
    if norm_type != 2.0:
        return team_scaled_norm(lay, norm_type, team, rank, size)
    s = team_reduce(lay, CC_SUMSQ, 2.0, 1.0, team, rank, size)
    # Plain squares are right unless float64 ones left the range (an inf sum,
    # from a finite list, or one too small to trust): then scaled, as p != 2.
    if (s == INFINITY or s < SUMSQ_TINY) and has_f64(lay):
        return team_scaled_norm(lay, 2.0, team, rank, size)
    return sqrt(s)


cdef void team_clip(const Layout *lay, double norm_type, clip_rule rule, const void *ctx,
                    Team *team, double *norm_out, int rank, int size) noexcept nogil:
    """The norm, then rule(norm) as the factor (1: write nothing); thread 0 stores the norm."""
    cdef double norm = team_norm(lay, norm_type, team, rank, size), factor = 1.0
    cdef Pass ps
    if rule != NULL:
        factor = rule(norm, ctx)
    if factor != 1.0:            # NaN included
        ps.what = PASS_SCALE
        ps.factor = factor
        if size > 1:
            scale_claimed(lay, &ps, team, rank)
        else:
            pass_all(lay, &ps, cc_own_tuning()[CC_TUNE_SCALE_BACKWARD])   # as scale_claimed
    if rank == 0:
        norm_out[0] = norm


cdef double layout_clip(const Layout *lay, double norm_type, clip_rule rule, const void *ctx,
                        int n_threads) noexcept nogil:
    """The norm_type-norm of the layout; then every element is multiplied by
    rule(norm, ctx) unless that is 1 (rule NULL: the norm only). One parallel
    region (one thread when a team's state cannot be allocated: the same result)."""
    cdef Team team
    cdef double norm = 0.0
    cdef int nt = resolve_threads(lay.n_total, n_threads)
    cdef double t_start
    cdef cc_fpmode mode, own = 0     # own: each thread's (Cython makes it firstprivate)
    if nt > 1 and team_open(&team, chunk_count(lay.n_total)) == 0:
        t_start = cc_now()
        mode = cc_fp_get()
        with parallel(num_threads=nt):
            own = cc_fp_set(mode)        # as in run_items
            team_clip(lay, norm_type, rule, ctx, &team, &norm, cc_team_rank(), cc_team_size())
            team_done(&team, cc_team_rank())
            cc_fp_set(own)
        note_team(&team, t_start)
        team_close(&team)
    else:
        team_clip(lay, norm_type, rule, ctx, NULL, &norm, 0, 1)
    return norm


cdef double layout_norm(const Layout *lay, double norm_type, int n_threads) noexcept nogil:
    """The norm_type-norm over all elements of the layout (norm_type > 0)."""
    return layout_clip(lay, norm_type, NULL, NULL, n_threads)


cdef void layout_scale(const Layout *lay, double scale, int n_threads) noexcept nogil:
    """Multiply every writable element of the layout by scale, in place."""
    cdef Pass ps
    ps.what = PASS_SCALE
    ps.factor = scale
    run_pass(lay, &ps, n_threads)


ctypedef struct ScaleJob:
    const Pair *pairs
    const Py_ssize_t *starts
    Py_ssize_t count, total          # pairs; elements in all
    float s32
    double s64
    cc_loop_fn f32, f64              # dst = src * s, chosen for the outputs' size


cdef void scale_chunk(const void *ctx, Py_ssize_t c) noexcept nogil:
    """dst = src * scale over chunk c of the pairs laid end to end."""
    cdef const ScaleJob *job = <const ScaleJob *>ctx
    cdef Py_ssize_t chunk = chunk_size(job.total), lo = c * chunk, hi = lo + chunk
    cdef Py_ssize_t a = run_holding(job.starts, job.count, lo), off, take
    cdef const Pair *pr
    cdef char *p[3]
    cdef Py_ssize_t st[3]
    st[0] = 1
    st[1] = 0
    st[2] = 1
    if hi > job.total:
        hi = job.total
    while lo < hi:
        pr = &job.pairs[a]
        off = lo - job.starts[a]
        take = pr.n - off
        if take > hi - lo:
            take = hi - lo
        if pr.f64:
            p[0] = <char *>pr.src + off * 8
            p[1] = <char *>&job.s64
            p[2] = pr.dst + off * 8
            job.f64(p, st, take)
        else:
            p[0] = <char *>pr.src + off * 4
            p[1] = <char *>&job.s32
            p[2] = pr.dst + off * 4
            job.f32(p, st, take)
        lo += take
        a += 1


cdef void scale_into(const Pair *pairs, const Py_ssize_t *starts, Py_ssize_t count,
                     float s32, double s64, int n_threads) noexcept nogil:
    """dst = src * scale over every pair, in the kernels' chunks (run_items)."""
    cdef ScaleJob job
    if count <= 0:
        return
    job.pairs = pairs
    job.starts = starts
    job.count = count
    job.total = starts[count - 1] + pairs[count - 1].n
    job.s32 = s32
    job.s64 = s64
    # A large output goes to memory with streaming stores; its size in bytes
    # is at least total * 4.
    job.f32 = cc_get_loop_for(CC_F32, CC_OP_MUL, job.total * 4)
    job.f64 = cc_get_loop_for(CC_F64, CC_OP_MUL, job.total * 4)
    run_items(chunk_count(job.total), scale_chunk, &job, resolve_threads(job.total, n_threads))


cdef int layout_from_pointers(Layout *lay, float **ptrs, const Py_ssize_t *lengths,
                              Py_ssize_t count) noexcept nogil:
    """Fill lay (malloc'ed arrays; free with free_layout) from contiguous float32 buffers."""
    cdef Py_ssize_t i
    lay.segs = <Segment *>malloc((count + 1) * sizeof(Segment))
    lay.starts = <Py_ssize_t *>malloc((count + 1) * sizeof(Py_ssize_t))
    lay.n_segs = 0
    lay.n_total = 0
    if lay.segs == NULL or lay.starts == NULL:
        free(lay.segs)
        free(lay.starts)
        return -1
    for i in range(count):
        if lengths[i] <= 0:
            continue
        lay.segs[lay.n_segs].data = <char *>ptrs[i]
        lay.segs[lay.n_segs].n = lengths[i]
        lay.segs[lay.n_segs].stride = 1
        lay.segs[lay.n_segs].kind = SEG_F32
        lay.starts[lay.n_segs] = lay.n_total
        lay.n_total += lengths[i]
        lay.n_segs += 1
    return 0


cdef double norm_f32(float **ptrs, const Py_ssize_t *lengths, Py_ssize_t count,
                     double norm_type, int n_threads) noexcept nogil:
    """norm_type-norm over count contiguous float32 buffers; NaN if out of memory."""
    cdef Layout lay
    cdef double result
    if layout_from_pointers(&lay, ptrs, lengths, count) != 0:
        return NAN
    result = layout_norm(&lay, norm_type, n_threads)
    free(lay.segs)
    free(lay.starts)
    return result


cdef void scale_f32(float **ptrs, const Py_ssize_t *lengths, Py_ssize_t count,
                    float scale, int n_threads) noexcept nogil:
    """Multiply count contiguous float32 buffers by scale, in place."""
    cdef Layout lay
    if layout_from_pointers(&lay, ptrs, lengths, count) != 0:
        return
    layout_scale(&lay, scale, n_threads)
    free(lay.segs)
    free(lay.starts)


cdef int clip_value_f32(float **ptrs, const Py_ssize_t *lengths, Py_ssize_t count,
                        float lo, float hi, int n_threads) noexcept nogil:
    """Clamp count contiguous float32 buffers in place into [lo, hi].

    hi wherever lo > hi (PyTorch's order); a NaN element stays NaN and a NaN
    bound makes every element NaN. Returns 0, or -1 when out of memory (then
    nothing is written).
    """
    cdef Layout lay
    cdef Pass ps
    if layout_from_pointers(&lay, ptrs, lengths, count) != 0:
        return -1
    if isnan(lo) or isnan(hi):
        layout_scale(&lay, NAN, n_threads)
    else:
        ps.what = PASS_CLAMP
        ps.lo = lo
        ps.hi = hi
        run_pass(&lay, &ps, n_threads)
    free(lay.segs)
    free(lay.starts)
    return 0


def _clip_value_f32_(addresses, lengths, double lo, double hi, int n_threads=0):
    """Clamp contiguous float32 buffers, given by address and length, in place.

    Runs ``clip_value_f32``. Not public API: it exists for
    ``clipcore.torch.clip_grad_value_``, which checks the tensors and keeps
    them alive during the call.
    """
    cdef Py_ssize_t count = len(addresses), i
    cdef float **ptrs = <float **>calloc(count + 1, sizeof(float *))
    cdef Py_ssize_t *lens = <Py_ssize_t *>calloc(count + 1, sizeof(Py_ssize_t))
    cdef int status = -1
    try:
        if ptrs != NULL and lens != NULL:
            for i in range(count):
                ptrs[i] = <float *><size_t>addresses[i]
                lens[i] = lengths[i]
            with nogil:
                status = clip_value_f32(ptrs, lens, count, <float>lo, <float>hi, n_threads)
        if status != 0:
            raise MemoryError()
    finally:
        free(ptrs)
        free(lens)


def openmp_enabled():
    """True when the extension was built with OpenMP."""
    return bool(cc_openmp_enabled())


def max_threads():
    """Threads OpenMP may use now (OMP_NUM_THREADS, threadpoolctl); 1 without OpenMP."""
    return 1 if cc_in_forked_child() else cc_max_threads()


def simd_path():
    """The instruction set the hot loops run with on this machine."""
    return cc_simd_path().decode()


cdef class fp_flush:
    """``with fp_flush(True):`` this thread computes with subnormals flushed to
    zero (flush-to-zero and denormals-are-zero); ``fp_flush(False)``: with
    IEEE subnormals. The mode before comes back on exit.

    clipcore's kernels compute in their caller's mode, on every thread of a
    team. TensorFlow runs its kernels flushing; graph mode keeps subnormals
    with this, as the eager functions do.
    """
    cdef bint flush
    cdef cc_fpmode saved

    def __init__(self, bint flush):
        self.flush = flush

    def __enter__(self):
        cdef cc_fpmode mode = cc_fp_get()
        self.saved = cc_fp_set(mode | CC_FP_FLUSH if self.flush else mode & ~CC_FP_FLUSH)
        return self

    def __exit__(self, *exc):
        cc_fp_set(self.saved)
        return False


def can_flush():
    """True when fp_flush can change the mode on this platform."""
    return CC_FP_FLUSH != 0


def get_tuning():
    """The streaming loops' run-time choices and the default policy's crossover."""
    cdef int *t = cc_own_tuning()
    return {"prefetch": bool(t[CC_TUNE_PREFETCH]),
            "scale_backward": bool(t[CC_TUNE_SCALE_BACKWARD]),
            "twins": bool(t[CC_TUNE_TWINS]),
            "prefetch16": bool(t[CC_TUNE_PREFETCH16]),
            "parallel_min": int(_auto_parallel_min)}


def set_tuning(*, prefetch=None, scale_backward=None, twins=None, prefetch16=None,
               parallel_min=None):
    """Set some of get_tuning()'s choices (clipcore._tuning; results keep their bits
    whatever is chosen, except that the loops differ in speed)."""
    global _auto_parallel_min
    cdef int *t = cc_own_tuning()
    if parallel_min is not None:
        if parallel_min < 0:
            raise ValueError(f"parallel_min must be >= 0, got {parallel_min}")
        _auto_parallel_min = parallel_min
    for flag, value in ((CC_TUNE_PREFETCH, prefetch), (CC_TUNE_SCALE_BACKWARD, scale_backward),
                        (CC_TUNE_TWINS, twins), (CC_TUNE_PREFETCH16, prefetch16)):
        if value is not None:
            t[flag] = 1 if value else 0


cdef int *tuning_table() noexcept nogil:
    return cc_own_tuning()


def _note_wait(double waited, double total):
    """note_wait, for the tests: a team's caller waited `waited` of `total` seconds."""
    note_wait(waited, total)


def _forget_late_teams():
    """For the tests: the policy as if no team had ever been late."""
    global _serial_until, _late_backoff
    _serial_until = 0.0
    _late_backoff = 0.0


def late_team_backoff():
    """Seconds the default policy stays serial after a team whose other threads
    were late (0.0: not backing off)."""
    return _late_backoff if _serial_until > 0.0 and cc_now() < _serial_until else 0.0


def threads_for(Py_ssize_t n_total, int n_threads=0):
    """Threads the kernels would use for n_total elements (n_threads=0: OpenMP's default)."""
    return resolve_threads(n_total, n_threads)
