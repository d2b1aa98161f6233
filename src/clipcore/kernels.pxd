# clipcore's C-level API: nogil kernels over lists of buffers.
#
# Another Cython extension uses them with
#     from clipcore cimport kernels
# and clipcore.get_include() on its include path (for cc_loops.h).

cdef extern from "cc_loops.h" nogil:
    int CC_SUMSQ, CC_SUMABS, CC_MAXABS, CC_SUMPOW
    int cc_openmp_enabled()
    int cc_max_threads()
    const char *cc_simd_path()

# Buffer kinds a Segment can hold.
cdef enum:
    SEG_F32 = 0        # float32, scaled in place
    SEG_F64 = 1        # float64, scaled in place
    SEG_F64_COPY = 2   # float64 copy of a buffer of another dtype: read, never scaled

# One run of equally spaced elements of one buffer.
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

cdef int resolve_threads(Py_ssize_t n_total, int n_threads) noexcept nogil
cdef double layout_norm(const Layout *lay, double norm_type, int n_threads) noexcept nogil
cdef void layout_scale(const Layout *lay, double scale, int n_threads) noexcept nogil
# The norm, then the scaling by rule(norm, ctx), in one parallel region; returns the norm.
cdef double layout_clip(const Layout *lay, double norm_type, clip_rule rule, const void *ctx,
                        int n_threads) noexcept nogil

# Pointer-and-length forms for other extensions (float32 buffers, contiguous).
cdef double norm_f32(float **ptrs, const Py_ssize_t *lengths, Py_ssize_t count,
                     double norm_type, int n_threads) noexcept nogil
cdef void scale_f32(float **ptrs, const Py_ssize_t *lengths, Py_ssize_t count,
                    float scale, int n_threads) noexcept nogil
# Clamp in place into [lo, hi] as PyTorch's clamp does (hi wherever lo > hi; a
# NaN element or a NaN bound gives NaN); 0, or -1 (nothing written) out of memory.
cdef int clip_value_f32(float **ptrs, const Py_ssize_t *lengths, Py_ssize_t count,
                        float lo, float hi, int n_threads) noexcept nogil
