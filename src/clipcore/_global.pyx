"""TensorFlow's global_norm and clip_by_global_norm (out of place) on the core.

Arrays in, arrays out: clipcore._ops validates the arguments it converts
(framework tensors become arrays there, and results go back to the caller's
type there). The norm is the core's (clipcore._lists: float64 accumulation,
deterministic chunks). The out-of-place clip allocates one output per input
and scales in one fused pass that reads each input once and writes its output
once; the scale is computed as TensorFlow computes it, in the norm's dtype, so
that outputs equal TensorFlow's for the same norm.
"""
cimport cython
from libc.stdlib cimport malloc, free
cimport numpy as cnp

from clipcore._lists cimport _Buffers, collect, as_scalar, reads_as_is
from clipcore.kernels cimport Pair, scale_into

import numpy as np

cnp.import_array()

cdef type ndarray = np.ndarray

# ------------------------------------------------------------ output memory
#
# Fresh memory from the OS costs a page fault and a zero-fill per page: for
# large results, more than the clipping itself. TensorFlow's allocator hands
# the memory of dropped tensors to the next op; clipcore does the same,
# boundedly. The results of one call are carved from one block, owned by a
# _Block that is their base (and so of every view of them); when the last of
# them dies, the _Block gives the block back to the pool. The pool keeps the
# POOL_SLOTS most recently freed blocks of POOL_MIN_BYTES or more, at most
# POOL_MAX_BYTES in all: room for two result sets of a GPT-2-sized model, so
# that a loop holding the last results while it makes the next ones
# alternates between two blocks. A block is in the pool only while nothing
# uses it: no reference count is looked at, and a lock guards the pool (so it
# holds under free-threaded CPython too).

cdef enum:
    POOL_MIN_BYTES = 8 << 20
    POOL_SLOTS = 2
    ALIGN = 64
cdef Py_ssize_t POOL_MAX_BYTES = 1 << 30

cdef list _free = []                 # free uint8 blocks, the most recently freed first
cdef cython.pymutex _pool_lock


@cython.final
@cython.no_gc                        # it refers to a uint8 array, which refers to nothing
cdef class _Block:
    """The memory of one call's results (their base); back to the pool when they die."""
    cdef object memory

    def __dealloc__(self):
        if self.memory is not None:
            give_back(self.memory)


cdef int give_back(object memory) except -1:
    """Put a block nothing uses any more in the pool (or let it go)."""
    cdef Py_ssize_t total = 0, keep = 0
    cdef list dropped
    if cnp.PyArray_NBYTES(<cnp.ndarray>memory) > POOL_MAX_BYTES:
        return 0
    with _pool_lock:
        _free.insert(0, memory)
        while keep < len(_free) and keep < POOL_SLOTS:
            total += cnp.PyArray_NBYTES(<cnp.ndarray>_free[keep])
            if total > POOL_MAX_BYTES:
                break
            keep += 1
        dropped = _free[keep:]
        del _free[keep:]
    return 0                         # the dropped blocks are freed here, unlocked


cdef _Block take_block(Py_ssize_t nbytes):
    """A _Block of nbytes (and ALIGN to spare): a free one of that size, or new."""
    cdef Py_ssize_t i
    cdef _Block block
    memory = None
    with _pool_lock:
        for i in range(len(_free)):
            if cnp.PyArray_NBYTES(<cnp.ndarray>_free[i]) == nbytes + ALIGN:
                memory = _free.pop(i)
                break
    if memory is None:
        memory = np.empty(nbytes + ALIGN, np.uint8)
    block = _Block.__new__(_Block)
    block.memory = memory
    return block


cdef object carve(_Block block, Py_ssize_t offset, cnp.ndarray like, int type_num,
                  bint fortran):
    """An array shaped like `like`, of type_num, in block's memory at offset."""
    cdef cnp.ndarray out = cnp.PyArray_New(
        <type>np.ndarray, cnp.PyArray_NDIM(like), cnp.PyArray_DIMS(like), type_num, NULL,
        <char *>cnp.PyArray_DATA(<cnp.ndarray>block.memory) + offset, 0,
        cnp.NPY_ARRAY_FARRAY if fortran else cnp.NPY_ARRAY_CARRAY, None)
    cnp.set_array_base(out, block)
    return out


def empty_like_many(list arrays, list type_nums):
    """New arrays shaped like `arrays` (C order, or F order for F-only-contiguous ones).

    When they hold POOL_MIN_BYTES or more together they are carved from one
    block, from the pool when it has a free one of that size (see above).
    """
    cdef Py_ssize_t i, n = len(arrays), total = 0, off = 0, nbytes
    cdef cnp.ndarray arr
    cdef _Block block
    cdef list sizes = [0] * n
    for i in range(n):
        arr = <cnp.ndarray>arrays[i]
        nbytes = cnp.PyArray_SIZE(arr) * cnp.PyArray_DescrFromType(type_nums[i]).itemsize
        sizes[i] = nbytes
        total += (nbytes + ALIGN - 1) // ALIGN * ALIGN
    outs = [None] * n
    if total < POOL_MIN_BYTES:
        for i in range(n):
            arr = <cnp.ndarray>arrays[i]
            outs[i] = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(arr), cnp.PyArray_DIMS(arr),
                                        type_nums[i], fortran_only(arr))
        return outs
    block = take_block(total)
    off = <Py_ssize_t>(<size_t>cnp.PyArray_DATA(<cnp.ndarray>block.memory) % ALIGN)
    off = (ALIGN - off) % ALIGN                 # the first output starts aligned
    for i in range(n):
        arr = <cnp.ndarray>arrays[i]
        outs[i] = carve(block, off, arr, type_nums[i], fortran_only(arr))
        off += (<Py_ssize_t>sizes[i] + ALIGN - 1) // ALIGN * ALIGN
    return outs


cdef inline bint fortran_only(cnp.ndarray arr) noexcept:
    return cnp.PyArray_IS_F_CONTIGUOUS(arr) and not cnp.PyArray_IS_C_CONTIGUOUS(arr)


cdef class _Pairs:
    """Contiguous float32/float64 (input, output) pairs laid end to end."""
    cdef Pair *pairs
    cdef Py_ssize_t *starts
    cdef Py_ssize_t count, cap, total

    def __dealloc__(self):
        free(self.pairs)
        free(self.starts)

    cdef int reserve(self, Py_ssize_t cap) except -1:
        self.pairs = <Pair *>malloc((cap + 1) * sizeof(Pair))
        self.starts = <Py_ssize_t *>malloc((cap + 1) * sizeof(Py_ssize_t))
        if self.pairs == NULL or self.starts == NULL:
            raise MemoryError()
        self.cap = cap
        return 0

    cdef void push(self, cnp.ndarray src, cnp.ndarray dst) noexcept:
        cdef Pair *p = &self.pairs[self.count]
        p.src = <char *>cnp.PyArray_DATA(src)
        p.dst = <char *>cnp.PyArray_DATA(dst)
        p.n = cnp.PyArray_SIZE(src)
        p.f64 = cnp.PyArray_TYPE(src) == cnp.NPY_DOUBLE
        self.starts[self.count] = self.total
        self.total += p.n
        self.count += 1


def to_convert(list items):
    """The positions of the entries that are neither None nor an ndarray: the
    ones clipcore._ops converts before a call."""
    cdef Py_ssize_t i
    return [i for i in range(len(items))
            if items[i] is not None and type(items[i]) is not ndarray]


def norm_dtype(list arrays):
    """The dtype of the global norm: the entries' (promoted); float32 if none."""
    cdef cnp.ndarray arr, first = None
    cdef bint mixed = False
    for obj in arrays:
        if obj is None:
            continue
        arr = <cnp.ndarray>obj
        if first is None:
            first = arr
        elif (cnp.PyArray_TYPE(arr) != cnp.PyArray_TYPE(first)
              or cnp.PyArray_ISUSERDEF(arr)):
            mixed = True
    if first is None:
        return np.dtype(np.float32)
    if mixed:
        return np.result_type(*[a.dtype for a in arrays if a is not None])
    return first.dtype


def global_norm(list arrays, double norm_type, int n_threads):
    """The norm of all elements of the arrays (None entries skipped), as a float.

    Examples
    --------
    >>> import numpy as np
    >>> global_norm([np.array([3.0, 4.0], np.float32), None], 2.0, 1)
    5.0
    """
    return collect(arrays, False, "t_list").norm(norm_type, n_threads)


def clip_by_global_norm(list arrays, clip_norm, use_norm, int n_threads):
    """(outputs, norm): each array scaled as TensorFlow scales it, and the norm used.

    arrays: ndarrays or None; clip_norm and use_norm (None: the arrays'
    norm) as the caller gave them, tensors as arrays. The norm comes in the
    arrays' dtype (use_norm in its own when it has one).

    Examples
    --------
    >>> import numpy as np
    >>> clip_by_global_norm([np.array([3.0, 4.0], np.float32), None], 1.0, None, 1)
    ([array([0.6, 0.8], dtype=float32), None], np.float32(5.0))
    """
    cdef Py_ssize_t i, n = len(arrays)
    cdef cnp.ndarray arr, out
    cdef _Pairs pairs = _Pairs.__new__(_Pairs)
    cdef int tnum
    cdef Py_ssize_t k
    cdef _Buffers buffers
    c = as_scalar(clip_norm, "clip_norm", True)
    # Validates every entry (floating point) whether or not the norm is needed;
    # float16 and bfloat16 entries are read at their own width.
    buffers = collect(arrays, False, "t_list")
    if use_norm is None:
        un = norm_dtype(arrays).type(buffers.norm(2.0, n_threads))
    else:
        un = as_scalar(use_norm, "use_norm", True)
        if type(use_norm) in (int, float, bool) or not (un.dtype.kind == "f"
                                                        or un.dtype.name == "bfloat16"):
            un = norm_dtype(arrays).type(un)   # a plain number: the entries' dtype
    with np.errstate(all="ignore"):
        # TF: clip_norm * minimum(1.0 / use_norm, constant(1.0, norm dtype) / clip_norm),
        # plus (use_norm - use_norm) so that a non-finite norm gives NaN.
        c = un.dtype.type(c)
        one = un.dtype.type(1.0)
        scale = c * np.minimum(one / un, one / c) + (un - un)
    cdef float s32 = np.float32(scale)
    cdef double s64 = np.float64(scale)
    pairs.reserve(n)
    slow = []
    outs = [None] * n
    fast = []
    fast_at = []
    fast_types = []
    for i in range(n):
        if arrays[i] is None:
            continue
        arr = <cnp.ndarray>arrays[i]
        tnum = cnp.PyArray_TYPE(arr)
        if ((tnum == cnp.NPY_FLOAT or tnum == cnp.NPY_DOUBLE) and reads_as_is(arr)
                and (cnp.PyArray_IS_C_CONTIGUOUS(arr) or cnp.PyArray_IS_F_CONTIGUOUS(arr))):
            fast.append(arr)
            fast_at.append(i)
            fast_types.append(tnum)
        else:
            outs[i] = np.empty_like(arr)
            slow.append((arr, outs[i]))
    fast_outs = empty_like_many(fast, fast_types)
    for k in range(len(fast)):
        outs[<Py_ssize_t>fast_at[k]] = fast_outs[k]
        if cnp.PyArray_SIZE(<cnp.ndarray>fast[k]):
            pairs.push(<cnp.ndarray>fast[k], <cnp.ndarray>fast_outs[k])
    with nogil:
        scale_into(pairs.pairs, pairs.starts, pairs.count, s32, s64, n_threads)
    with np.errstate(all="ignore"):
        for arr, out in slow:            # TF: v * cast(scale, v.dtype)
            np.multiply(arr, arr.dtype.type(scale), out=out)
    return outs, un
