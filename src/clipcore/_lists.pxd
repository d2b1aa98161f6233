# Validated lists of buffers, for other clipcore modules that run the kernels.
cimport numpy as cnp
from cpython.object cimport PyObject
from clipcore.kernels cimport Layout, clip_rule

ctypedef struct Extent:
    char *lo          # lowest byte of the array
    char *hi          # one past its highest byte
    Py_ssize_t pos    # position in _Buffers.arrays, which is the index in t_list
    bint dense        # every byte in [lo, hi) belongs to the array: overlapping extents share memory

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

cdef void extent_of(Extent *e, cnp.ndarray arr, Py_ssize_t pos) noexcept
cdef tuple as_tuple(object t_list, str name)
cdef _Buffers collect(object t_list, bint in_place, str name)
cdef double as_real(object value, str name) except? -1.0
cdef double as_clip_norm(object value) except? -1.0
cdef double as_norm_type(object value) except? -1.0
cdef int as_threads(object value) except -1
