# Validated lists of buffers, for other clipcore modules that run the kernels.
cimport numpy as cnp
from cpython.object cimport PyObject
from clipcore.kernels cimport Layout, clip_rule, SEG_F32, SEG_F64

ctypedef struct Extent:
    char *lo          # lowest byte of the array
    char *hi          # one past its highest byte
    Py_ssize_t pos    # position in _Buffers.arrays, which is the index in t_list
    bint dense        # every byte in [lo, hi) belongs to the array: overlapping extents share memory

cdef int sort_extents(Extent *a, Py_ssize_t n) except -1

# What a Plan checks before each call: an array it writes, or one its memory
# comes from (a base), must still have the data pointer and size it had.
ctypedef struct Pin:
    PyObject *arr     # borrowed: _Buffers.arrays keeps it (and its bases) alive
    char *data
    Py_ssize_t size
    Py_ssize_t pos    # index in t_list
    bint written      # the array the kernels write (not a base): must stay writable

cdef class _Buffers:
    cdef Layout lay          # the segments the kernels run over
    cdef Py_ssize_t cap
    cdef Extent *exts        # in place: the memory each non-empty array spans
    cdef Py_ssize_t n_exts
    cdef list arrays         # the array viewed for each t_list entry (None for None),
                             # kept alive while we hold pointers into it
    cdef list generic        # (index, array, float64 copy) for dtypes the kernels do not scale
    cdef Pin *pins           # a Plan's checks (NULL otherwise)
    cdef Py_ssize_t n_pins
    cdef list sources        # a Plan's (index, object, fingerprint) for objects whose memory can move

    cdef int push(self, char *data, Py_ssize_t n, Py_ssize_t stride, int kind) except -1
    cdef int add_strided(self, cnp.ndarray arr, int kind) except -1
    cdef int add(self, cnp.ndarray arr, Py_ssize_t index, str name, bint in_place) except -1
    cdef void add_extent(self, cnp.ndarray arr, Py_ssize_t index) noexcept
    cdef int pin(self, tuple seq) except -1
    cdef int check_pins(self) except -1
    cdef double norm(self, double norm_type, int n_threads) except? -1.0
    cdef int scale_generic(self, double factor) except -1
    cdef int scale(self, double factor, int n_threads) except -1
    cdef double clip_with(self, clip_rule rule, const void *ctx, double norm_type,
                          int n_threads) except? -1.0
    cdef double clip(self, double clip_norm, object use_norm, double norm_type,
                     bint error_if_nonfinite, int n_threads) except? -1.0

cdef class Plan:
    cdef _Buffers buffers
    cdef int n_threads
    cdef _Buffers live(self)

# segment_kind's answers for element types the kernels do not read as such.
cdef enum:
    OTHER_FLOAT = -1     # another floating-point type (long double): a float64 copy
    NOT_FLOAT = -2

cdef inline int promote_kind(int norm_kind, int kind) noexcept nogil:
    """PyTorch's total norm's kind after one more tensor of this kind (norm_kind
    < 0 before the first): float64 if any is, the one kind if all share it, else
    float32 (torch's promotion of the per-tensor norms)."""
    if norm_kind < 0 or norm_kind == kind:
        return kind
    return SEG_F64 if norm_kind == SEG_F64 or kind == SEG_F64 else SEG_F32

# What an object's memory is taken for: bits of a `use` (buffer_view, tensor_memory).
cdef enum:
    WRITES = 1       # written in place: autograd must not track it
    SIGNED = 2       # the op depends on the values' signs (not only a norm and a scaling)
    USE_NORM = 0                  # read by a norm
    USE_SCALE = WRITES            # read by a norm and scaled in place
    USE_READ = SIGNED             # read by any op
    USE_WRITE = WRITES | SIGNED   # written by any op

# tensor_refusal's answers: why a tensor's memory cannot serve a use as it is.
cdef enum:
    TENSOR_OK = 0
    NOT_CPU = 1
    REQUIRES_GRAD = 2    # to be written, but autograd tracks it
    SIGN_BIT = 3         # the negative or conjugate bit: the memory does not hold the values

cdef inline bint reads_as_is(cnp.ndarray arr) noexcept:
    """True when a kernel may read arr's memory as it is: native byte order and
    aligned for its dtype. Else it reads a working copy (as_native)."""
    return cnp.PyArray_ISNOTSWAPPED(arr) and cnp.PyArray_ISALIGNED(arr)

cpdef int tensor_refusal(object t, int use) except -1
cdef int segment_kind(cnp.ndarray arr) except -3
cdef void extent_of(Extent *e, cnp.ndarray arr, Py_ssize_t pos) noexcept
cpdef cnp.ndarray buffer_view(object obj, str name, bint writable)
cpdef object tensor_array(object t, str name, int use, object bf16=*)
cpdef cnp.ndarray as_native(cnp.ndarray arr)
cpdef int check_writable(cnp.ndarray arr, str name, Py_ssize_t index=*) except -1
cpdef tuple as_tuple(object t_list, str name)
cdef _Buffers collect(object t_list, bint in_place, str name)
cpdef object as_scalar(object value, str name, bint tf=*)
cdef double as_clip_norm(object value) except? -1.0
cpdef double as_norm_type(object value) except? -1.0
cpdef int as_threads(object value, int default=*) except? -1
