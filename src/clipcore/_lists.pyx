"""Global-norm clipping over lists of buffers: validation, layout, the Plan.

Validation runs here, in compiled code, because it runs once per buffer per
call: for a list of many small gradients Python-level checks would cost more
than the kernels. Every buffer is checked before any is written.

Also here, the one home of each argument rule of the package (the Python
layer calls them too): how memory is taken from an object (buffer_view;
tensor_array and tensor_refusal for PyTorch's tensors, which clipcore.torch's
fast path shares), when a kernel reads a working copy of it instead
(reads_as_is, as_native), when it may be written (check_writable), number
arguments (as_scalar), lists (as_tuple) and n_threads (as_threads).
"""
cimport numpy as cnp
from libc.limits cimport INT_MAX
from libc.math cimport isfinite, isnan, NAN
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from cpython.object cimport PyObject

from clipcore.kernels cimport (Segment, Layout, SEG_F32, SEG_F64, SEG_F64_COPY, SEG_F16,
                               SEG_BF16, clip_rule, layout_scale, layout_clip,
                               segment_itemsize)

import collections.abc
import numpy as np

cnp.import_array()

cdef type ndarray = np.ndarray

# What memory is taken for (tensor_memory, tensor_array): a norm (False), a
# norm and a scaling (True), any read, any write.
FOR_NORM = USE_NORM
FOR_SCALE = USE_SCALE
FOR_READ = USE_READ
FOR_WRITE = USE_WRITE

# The segment kinds, for plan_over_memory's callers.
KIND_F32 = SEG_F32
KIND_F64 = SEG_F64
KIND_F16 = SEG_F16
KIND_BF16 = SEG_BF16


cdef int sort_extents(Extent *a, Py_ssize_t n) except -1:
    """Sort extents by lo: LSD radix sort on lo - min(lo), 11 bits per pass,
    from the lowest bit that varies (buffers are aligned: their low bits are 0).

    Thousands of extents are sorted on every in-place call; this is faster
    than qsort's comparator calls.
    """
    cdef Py_ssize_t i, d
    cdef size_t base, key, varying = 0     # varying: every bit set in some key
    cdef int shift, passes = 0
    cdef Py_ssize_t *count
    cdef Extent *tmp
    cdef Extent *swap
    cdef Extent e
    if n < 64:         # a few buffers: insertion sort, no 2048-entry tables
        for i in range(1, n):
            e = a[i]
            d = i
            while d > 0 and a[d - 1].lo > e.lo:
                a[d] = a[d - 1]
                d -= 1
            a[d] = e
        return 0
    base = <size_t>a[0].lo
    for i in range(n):
        if <size_t>a[i].lo < base:
            base = <size_t>a[i].lo
    for i in range(n):
        varying |= <size_t>a[i].lo - base
    tmp = <Extent *>malloc(n * sizeof(Extent) + 2048 * sizeof(Py_ssize_t))
    if tmp == NULL:
        raise MemoryError()
    count = <Py_ssize_t *>(tmp + n)     # on the heap: callers may run on a small stack
    shift = 0
    while shift < 64 and varying and not (varying >> shift) & 1:
        shift += 1
    while passes == 0 or (shift < 64 and (varying >> shift) != 0):
        for d in range(2048):
            count[d] = 0
        for i in range(n):
            count[((<size_t>a[i].lo - base) >> shift) & 2047] += 1
        key = 0
        for d in range(2048):        # counts -> start positions
            key += count[d]
            count[d] = key - count[d]
        for i in range(n):
            d = ((<size_t>a[i].lo - base) >> shift) & 2047
            tmp[count[d]] = a[i]
            count[d] += 1
        swap = a
        a = tmp
        tmp = swap
        shift += 11
        passes += 1
    if passes % 2:                  # odd number of passes: the result is in the scratch
        memcpy(tmp, a, n * sizeof(Extent))
        free(a)
    else:
        free(tmp)
    return 0


# Interleaved strided views are told apart element by element up to this many
# elements in a group of overlapping extents (a sort of their addresses); a
# larger group is compared pair by pair with np.shares_memory.
cdef Py_ssize_t ELEMENT_CHECK_MAX = 1 << 22


def _element_addresses(arr):
    """The byte address of every element of arr, as int64."""
    offsets = np.zeros((), np.int64)
    for n, stride in zip(arr.shape, arr.strides):
        offsets = np.add.outer(offsets, np.arange(n, dtype=np.int64) * stride)
    return offsets.ravel() + arr.ctypes.data


def _first_clash(views):
    """(pos, pos) of two elements of views [(pos, array), ...] that share bytes, or None.

    The same pos twice: that array overlaps itself. O(E log E) in the elements.
    """
    starts = np.concatenate([_element_addresses(a) for _, a in views])
    ends = starts + np.concatenate([np.full(a.size, a.itemsize, np.int64) for _, a in views])
    owners = np.concatenate([np.full(a.size, pos, np.intp) for pos, a in views])
    order = np.argsort(starts, kind="stable")
    starts, ends, owners = starts[order], ends[order], owners[order]
    reach = np.maximum.accumulate(ends)
    clash = np.flatnonzero(starts[1:] < reach[:starts.size - 1])
    if clash.size == 0:
        return None
    i = int(clash[0]) + 1
    j = int(np.flatnonzero(ends[:i] > starts[i]).max())
    return int(owners[j]), int(owners[i])


cdef int raise_overlaps_itself(str label) except -1:
    raise ValueError(f"{label} overlaps itself (a view with a zero or overlapping stride): "
                     f"writing it in place would change its memory more than once")


cdef int raise_shared(str name, Py_ssize_t a, Py_ssize_t b) except -1:
    if a == b:
        raise_overlaps_itself(f"{name}[{a}]")
    raise ValueError(f"{name}[{min(a, b)}] and {name}[{max(a, b)}] share memory: "
                     f"clipping in place would scale it twice")


cdef bint may_overlap_itself(cnp.ndarray arr) noexcept:
    """False when no two elements of arr can share a byte (axes by |stride|,
    each stride beyond what the smaller axes span); True means: check."""
    cdef int nd = cnp.PyArray_NDIM(arr), d, k, m = 0
    cdef Py_ssize_t span = cnp.PyArray_ITEMSIZE(arr), stride
    cdef Py_ssize_t strides[64]
    cdef Py_ssize_t shape[64]
    for d in range(nd):
        if cnp.PyArray_DIM(arr, d) > 1:
            stride = abs(cnp.PyArray_STRIDE(arr, d))
            k = m
            while k > 0 and strides[k - 1] > stride:
                strides[k] = strides[k - 1]
                shape[k] = shape[k - 1]
                k -= 1
            strides[k] = stride
            shape[k] = cnp.PyArray_DIM(arr, d)
            m += 1
    for k in range(m):
        if strides[k] < span:
            return True
        span += (shape[k] - 1) * strides[k]
    return False


cpdef int check_writable(cnp.ndarray arr, str name, Py_ssize_t index=-1) except -1:
    """Raise ValueError unless arr's memory may be written in place: writable, and no
    two elements sharing a byte (too large to tell: raise too). The argument is
    name, or name[index] for index >= 0 (the label is made only to raise)."""
    if not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{label_of(name, index)}: expected a writable "
                         f"{(<object>arr).dtype} buffer, got a read-only array")
    if cnp.PyArray_SIZE(arr) == 0 or not may_overlap_itself(arr):
        return 0
    if cnp.PyArray_SIZE(arr) > ELEMENT_CHECK_MAX or _first_clash([(0, arr)]) is not None:
        raise_overlaps_itself(label_of(name, index))
    return 0


cdef str label_of(str name, Py_ssize_t index):
    return name if index < 0 else f"{name}[{index}]"


# ------------------------------------------------------------ memory of objects
#
# The one way clipcore gets memory from an object: NumPy arrays, PyTorch and
# TensorFlow tensors, DLPack, buffers. The rules live here: what is refused for
# writing (tensors autograd tracks, the negative and conjugate bits, masked
# arrays; read-only or self-overlapping memory: check_writable), what may be
# copied for reading, when a kernel reads a working copy (reads_as_is:
# byte-swapped or unaligned memory), and which objects' memory can move under
# a kept view (fingerprint). clipcore.torch's fast path takes tensors by the
# same rules (tensor_refusal), falling back to torch where these raise.

cpdef str framework(object obj):
    """'tf' or 'torch' for their tensors (by type module name), else None."""
    mod = type(obj).__module__ or ""
    if mod.startswith("tensorflow"):
        return "tf"
    if mod.startswith("torch"):
        return "torch"
    return None


cdef int refuse_masked(object obj, str name) except -1:
    if isinstance(obj, np.ma.MaskedArray):
        raise TypeError(f"{name}: masked arrays are not supported (the mask would be "
                        f"ignored); pass arr.filled(...) or the unmasked values")
    return 0


cpdef int tensor_refusal(object t, int use) except -1:
    """Why a PyTorch tensor's memory cannot serve use (USE_*) as it is
    (NOT_CPU, REQUIRES_GRAD, SIGN_BIT), or TENSOR_OK (0).

    The one decision on tensors: buffer_view raises for a refusal,
    clipcore.torch's fast path (tensor_memory, tensor_array's fallback mode)
    hands the call to torch. A tensor autograd tracks is never written behind
    its back; memory behind the negative or conjugate bit holds other values,
    which a norm and a scaling do not mind (they do not look at signs). The
    checks run once per tensor per call, the costly ones only when use needs them.
    """
    if not t.is_cpu:
        return NOT_CPU
    if use & WRITES and t.requires_grad:
        return REQUIRES_GRAD
    if use & SIGNED and (t.is_neg() or t.is_conj()):
        return SIGN_BIT
    return TENSOR_OK


cdef int raise_refusal(int why, object t, str name) except -1:
    if why == NOT_CPU:
        raise TypeError(f"{name}: expected a CPU tensor, got one on {t.device}")
    if why == REQUIRES_GRAD:
        raise ValueError(f"{name}: the tensor requires grad; modifying it in place "
                         f"behind autograd's back would give wrong gradients (clip "
                         f"its .grad, or a tensor that does not require grad)")
    raise TypeError(f"{name}: the tensor has its negative or conjugate bit set, "
                    f"so its memory does not hold its values; call "
                    f"t.resolve_neg() / t.resolve_conj() first")


cpdef object tensor_array(object t, str name, int use, object bf16=None):
    """An ndarray over a PyTorch tensor's memory, for use (USE_*; FOR_* in Python).

    The rules are tensor_refusal's; for reading, memory behind the negative or
    conjugate bit gives way to a resolved copy. name None is clipcore.torch's
    mode: None where the named form raises (torch's own function then takes
    the call). bf16: (torch.bfloat16, torch.int16) to view bfloat16 memory as
    ml_dtypes' bfloat16 (clipcore.torch's kernels read it; without ml_dtypes,
    torch's path takes them); without bf16 such tensors are refused, as the
    NumPy-based functions cannot compute in it.
    """
    cdef int why = tensor_refusal(t, use)
    if why == SIGN_BIT and not use & WRITES:
        t = t.resolve_neg().resolve_conj()      # reading: a resolved copy is harmless
        why = TENSOR_OK
    if why != TENSOR_OK:
        if name is None:
            return None
        raise_refusal(why, t, name)
    if not use & WRITES:
        t = t.detach()
    try:
        if bf16 is not None and t.dtype is bf16[0]:
            from ml_dtypes import bfloat16       # imported only then: it is optional
            return np.from_dlpack(t.view(bf16[1])).view(bfloat16)
        return np.from_dlpack(t)
    except (BufferError, RuntimeError, TypeError, ValueError, ImportError) as exc:
        if name is None:
            return None
        raise TypeError(f"{name}: cannot view this {t.dtype} tensor as an array "
                        f"without a copy ({exc})") from None


cdef object tf_values(object t, str name):
    """A TensorFlow eager tensor's values (a view of its memory)."""
    if not hasattr(t, "numpy"):
        raise TypeError(f"{name}: a symbolic TensorFlow tensor (inside tf.function) has no "
                        f"values for clipcore to clip; call clipcore eagerly")
    try:
        return np.asarray(t)
    except ValueError:                   # 0-d bfloat16: TF hands out a scalar
        return np.asarray(t.numpy())


cpdef cnp.ndarray buffer_view(object obj, str name, bint writable):
    """An ndarray over obj's memory (never a copy when writable).

    NumPy arrays come as they are (subclasses as base-class views, so no
    subclass code runs while clipcore writes); PyTorch tensors and other
    ``__dlpack__`` objects through DLPack (TensorFlow's, for reading, through
    NumPy's conversion); buffer-protocol objects through a memoryview. For
    reading, anything NumPy can convert is accepted (a copy is harmless
    there). The caller checks the dtype, and check_writable the memory.
    TypeError/ValueError name the argument.
    """
    if isinstance(obj, np.ndarray):
        refuse_masked(obj, name)
        return obj if type(obj) is ndarray else obj.view(ndarray)
    fw = framework(obj)
    if fw == "torch" and hasattr(obj, "requires_grad"):
        return tensor_array(obj, name, USE_WRITE if writable else USE_READ)
    if fw == "tf" and not writable:
        return tf_values(obj, name)
    arr = None
    if hasattr(obj, "__dlpack__"):
        try:
            arr = np.from_dlpack(obj)
        except (BufferError, RuntimeError, TypeError, ValueError) as exc:
            raise TypeError(f"{name}: cannot view this {type(obj).__name__} as a CPU "
                            f"array without a copy ({exc})") from None
    else:
        try:
            arr = np.asarray(memoryview(obj))
        except TypeError:          # not a buffer
            pass
    if arr is None and writable:
        try:
            arr = np.asarray(obj, copy=False)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: a {type(obj).__name__} cannot be modified in place "
                            f"(it exposes no writable memory)") from None
    if arr is None:
        try:
            arr = np.asarray(obj)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: expected a floating-point array or buffer, got "
                            f"{type(obj).__name__} ({exc})") from None
    refuse_masked(arr, name)
    return arr if type(arr) is ndarray else arr.view(ndarray)


cpdef object fingerprint(object obj):
    """What must stay the same for a kept view of obj's memory to stay valid.

    None for objects whose memory cannot move while a view holds it (NumPy
    arrays are checked by the kernels' own guard; buffer exports lock the
    memory). For a PyTorch tensor, its address, shape and strides: resize_,
    set_ and ``.data =`` change them and free the memory a view points to.
    """
    if framework(obj) == "torch" and hasattr(obj, "data_ptr"):
        return (obj.data_ptr(), obj.shape, obj.stride(), obj.requires_grad)
    return None


cdef void extent_of(Extent *e, cnp.ndarray arr, Py_ssize_t pos) noexcept:
    """The bytes a non-empty arr spans, as an Extent at position pos."""
    cdef Py_ssize_t d, ext
    e.lo = e.hi = <char *>cnp.PyArray_DATA(arr)
    for d in range(cnp.PyArray_NDIM(arr)):
        ext = (cnp.PyArray_DIM(arr, d) - 1) * cnp.PyArray_STRIDE(arr, d)
        if ext < 0:
            e.lo += ext
        else:
            e.hi += ext
    e.hi += cnp.PyArray_ITEMSIZE(arr)
    e.pos = pos
    e.dense = e.hi - e.lo == cnp.PyArray_NBYTES(arr)


def check_apart(outs, ins, str out_name, str in_name):
    """Raise ValueError naming the first outs[i] that shares memory with an ins[j].

    outs and ins are lists of ndarrays (None entries and empty arrays are
    skipped); sharing within one list is not looked at (the callers check
    their outputs with the in-place rules). Extents are sorted; only an output
    and an input whose extents meet are compared, element by element
    (np.shares_memory), so interleaved strided views may be disjoint.
    """
    cdef Py_ssize_t n_out = len(outs), n = n_out + len(ins), count = 0, j, k, a, b
    cdef Extent *exts = <Extent *>malloc((n + 1) * sizeof(Extent))
    cdef list arrays = list(outs) + list(ins)
    if exts == NULL:
        raise MemoryError()
    try:
        for j in range(n):
            arr = arrays[j]
            if arr is not None and cnp.PyArray_SIZE(<cnp.ndarray>arr) > 0:
                extent_of(&exts[count], <cnp.ndarray>arr, j)
                count += 1
        sort_extents(exts, count)
        j = 0
        while j < count:
            k = group_end(exts, j, count)
            for b in range(j + 1, k):          # a group of chained extents
                for a in range(j, b):
                    if ((exts[a].pos < n_out) != (exts[b].pos < n_out)
                            and exts[a].hi > exts[b].lo
                            and np.shares_memory(arrays[exts[a].pos], arrays[exts[b].pos])):
                        i_out = min(exts[a].pos, exts[b].pos)
                        i_in = max(exts[a].pos, exts[b].pos) - n_out
                        raise ValueError(f"{out_name}[{i_out}] shares memory with "
                                         f"{in_name}[{i_in}]: writing it would change "
                                         f"an input before it is read")
            j = k
    finally:
        free(exts)


cdef int check_group(Extent *exts, Py_ssize_t count, list arrays, str name) except -1:
    """Raise if any two of a group of chained overlapping extents share memory."""
    cdef Py_ssize_t i, j, total = 0
    cdef bint dense = True
    for i in range(count):
        dense = dense and exts[i].dense
    if dense:                         # exts[0] and exts[1] overlap, byte for byte
        raise_shared(name, exts[0].pos, exts[1].pos)
    for i in range(count):
        total += cnp.PyArray_SIZE(<cnp.ndarray>arrays[exts[i].pos])
    if total <= ELEMENT_CHECK_MAX:
        clash = _first_clash([(exts[i].pos, arrays[exts[i].pos]) for i in range(count)])
        if clash is not None:
            raise_shared(name, clash[0], clash[1])
        return 0
    for j in range(1, count):         # few, huge views: pairs whose extents meet
        for i in range(j):
            if exts[i].hi > exts[j].lo and np.shares_memory(arrays[exts[i].pos],
                                                            arrays[exts[j].pos]):
                raise_shared(name, exts[i].pos, exts[j].pos)
    return 0


cdef Py_ssize_t group_end(const Extent *exts, Py_ssize_t j, Py_ssize_t count) noexcept:
    """One past the last of the sorted extents from j on that chain-overlap exts[j]."""
    cdef Py_ssize_t k = j + 1
    cdef char *max_hi = exts[j].hi
    while k < count and exts[k].lo < max_hi:
        if exts[k].hi > max_hi:
            max_hi = exts[k].hi
        k += 1
    return k


cdef int report_overlap(Extent *exts, Py_ssize_t count, list arrays, str name) except -1:
    """Raise ValueError naming the first two buffers that share memory.

    Extents are sorted and cut into groups that chain-overlap; only a group of
    two or more needs a look at its elements (interleaved strided views may be
    disjoint). Without arrays the buffers are contiguous.
    """
    cdef Py_ssize_t j, k
    cdef bint is_sorted = True
    for j in range(1, count):
        if exts[j].lo < exts[j - 1].lo:
            is_sorted = False
            break
    if not is_sorted:
        sort_extents(exts, count)
    j = 0
    while j < count:
        k = group_end(exts, j, count)
        if k - j > 1:
            check_group(exts + j, k - j, arrays, name)
        j = k
    return 0


ctypedef struct ClipRule:
    double clip_norm
    bint error_if_nonfinite


cdef double tf_rule(double norm, const void *ctx) noexcept nogil:
    """clip_by_global_norm_'s factor: clip_norm / norm when the norm is above
    clip_norm, else 1 (write nothing); a NaN or inf norm gives NaN (TensorFlow's
    rule: every element becomes NaN), or 1 when that is an error."""
    cdef const ClipRule *r = <const ClipRule *>ctx
    if not isfinite(norm):
        return 1.0 if r.error_if_nonfinite else NAN
    if norm <= r.clip_norm:
        return 1.0
    return r.clip_norm / norm


cdef bint is_bfloat16(cnp.ndarray arr) except -1:
    """arr holds bfloat16 (ml_dtypes' type, or any user-defined type of that name
    and size: NumPy has no bfloat16 of its own, nor a float kind for it)."""
    return (cnp.PyArray_ISUSERDEF(arr) and cnp.PyArray_ITEMSIZE(arr) == 2
            and (<object>arr).dtype.name == "bfloat16")


cdef int segment_kind(cnp.ndarray arr) except -3:
    """The segment kind the kernels read arr's elements as (SEG_*); OTHER_FLOAT for
    the other floating-point types (long double), NOT_FLOAT for the rest."""
    cdef int type_num = cnp.PyArray_TYPE(arr)
    if type_num == cnp.NPY_FLOAT:
        return SEG_F32
    if type_num == cnp.NPY_DOUBLE:
        return SEG_F64
    if type_num == cnp.NPY_FLOAT16:
        return SEG_F16
    if is_bfloat16(arr):
        return SEG_BF16
    return OTHER_FLOAT if cnp.PyArray_ISFLOAT(arr) else NOT_FLOAT


def needs_copy(cnp.ndarray arr):
    """True when a kernel must read a working copy of arr (as_native): its
    memory is byte-swapped or unaligned (see reads_as_is). Which dtypes a
    kernel takes is the kernel's own question (segment_kind, TYPE_CODES)."""
    return not reads_as_is(arr)


cpdef cnp.ndarray as_native(cnp.ndarray arr):
    """arr, or its working copy (aligned, native byte order) when a kernel
    cannot read arr's memory as it is (reads_as_is)."""
    if reads_as_is(arr):
        return arr
    return np.array(arr, dtype=(<object>arr).dtype.newbyteorder("="))


def norm_kind(arrays):
    """The total norm's segment kind for float32/float64/float16/bfloat16 arrays, as
    promote_kind decides it for PyTorch's total norm."""
    cdef int kind = -1
    for arr in arrays:
        kind = promote_kind(kind, segment_kind(arr))
    return SEG_F32 if kind < 0 else kind


cdef inline Py_ssize_t n_elements(cnp.ndarray arr) noexcept:
    """arr's element count, without a call into NumPy (PyArray_SIZE's)."""
    cdef Py_ssize_t n = 1
    cdef int d
    for d in range(cnp.PyArray_NDIM(arr)):
        n *= cnp.PyArray_DIM(arr, d)
    return n


cdef class _Buffers:
    """The validated buffers of one t_list, laid out for the kernels."""

    def __cinit__(self):
        self.lay.segs = NULL
        self.lay.starts = NULL
        self.exts = NULL
        self.pins = NULL
        self.arrays = []
        self.generic = []
        self.sources = []

    def __dealloc__(self):
        free(self.lay.segs)
        free(self.lay.starts)
        free(self.exts)
        free(self.pins)

    cdef int push(self, char *data, Py_ssize_t n, Py_ssize_t stride, int kind) except -1:
        cdef Py_ssize_t cap
        cdef void *segs
        cdef void *starts
        if self.lay.n_segs == self.cap:
            cap = 2 * self.cap + 16
            segs = realloc(self.lay.segs, cap * sizeof(Segment))
            if segs == NULL:
                raise MemoryError()
            self.lay.segs = <Segment *>segs
            starts = realloc(self.lay.starts, cap * sizeof(Py_ssize_t))
            if starts == NULL:
                raise MemoryError()
            self.lay.starts = <Py_ssize_t *>starts
            self.cap = cap
        self.lay.segs[self.lay.n_segs].data = data
        self.lay.segs[self.lay.n_segs].n = n
        self.lay.segs[self.lay.n_segs].stride = stride
        self.lay.segs[self.lay.n_segs].kind = kind
        self.lay.starts[self.lay.n_segs] = self.lay.n_total
        self.lay.n_segs += 1
        self.lay.n_total += n
        return 0

    cdef int add_strided(self, cnp.ndarray arr, int kind) except -1:
        """Add a non-contiguous array as runs of equally spaced elements."""
        cdef int nd = 0, d, k
        cdef Py_ssize_t shape[64]
        cdef Py_ssize_t strides[64]
        cdef Py_ssize_t idx[64]
        cdef Py_ssize_t run_n, run_stride, n_runs = 1, r, itemsize = cnp.PyArray_ITEMSIZE(arr)
        cdef char *p
        # Axes of length > 1, sorted by decreasing |stride| (insertion sort).
        for d in range(cnp.PyArray_NDIM(arr)):
            if cnp.PyArray_DIM(arr, d) == 1:
                continue
            k = nd
            while k > 0 and abs(strides[k - 1]) < abs(cnp.PyArray_STRIDE(arr, d)):
                shape[k] = shape[k - 1]
                strides[k] = strides[k - 1]
                k -= 1
            shape[k] = cnp.PyArray_DIM(arr, d)
            strides[k] = cnp.PyArray_STRIDE(arr, d)
            nd += 1
        if nd == 0:      # a single element
            return self.push(<char *>cnp.PyArray_DATA(arr), 1, 1, kind)
        # The innermost run absorbs outer axes that continue it.
        run_n = shape[nd - 1]
        run_stride = strides[nd - 1]
        nd -= 1
        while nd > 0 and strides[nd - 1] == run_n * run_stride:
            run_n *= shape[nd - 1]
            nd -= 1
        for d in range(nd):
            n_runs *= shape[d]
            idx[d] = 0
        p = <char *>cnp.PyArray_DATA(arr)
        for r in range(n_runs):
            self.push(p, run_n, run_stride // itemsize, kind)
            d = nd - 1     # odometer over the outer axes
            while d >= 0:
                idx[d] += 1
                p += strides[d]
                if idx[d] < shape[d]:
                    break
                p -= shape[d] * strides[d]
                idx[d] = 0
                d -= 1
        return 0

    cdef int add(self, cnp.ndarray arr, Py_ssize_t index, str name, bint in_place) except -1:
        cdef int kind = segment_kind(arr)
        cdef Py_ssize_t n = n_elements(arr)
        if kind == NOT_FLOAT:
            raise TypeError(f"{name}[{index}]: expected a floating-point array or buffer, "
                            f"got an array of {(<object>arr).dtype}")
        if cnp.PyArray_NDIM(arr) > 64:
            raise ValueError(f"{name}[{index}]: more than 64 dimensions")
        if in_place:
            check_writable(arr, name, index)
        self.arrays[index] = arr
        if n == 0:
            return 0
        if self.exts != NULL:
            self.add_extent(arr, index)
        if kind < 0 or not reads_as_is(arr):
            # long double, byte-swapped or unaligned: the kernels read a float64
            # working copy (refreshed before every norm) and NumPy scales the
            # original in place (scale_generic).
            copy = np.empty((<object>arr).shape, dtype=np.float64)
            self.generic.append((index, arr, copy))
            self.push(<char *>cnp.PyArray_DATA(copy), n, 1, SEG_F64_COPY)
            return 0
        if cnp.PyArray_IS_C_CONTIGUOUS(arr) or cnp.PyArray_IS_F_CONTIGUOUS(arr):
            self.push(<char *>cnp.PyArray_DATA(arr), n, 1, kind)
        else:
            self.add_strided(arr, kind)
        return 0

    cdef void add_extent(self, cnp.ndarray arr, Py_ssize_t index) noexcept:
        """Record the bytes arr spans, for the overlap check (here, while arr is in cache)."""
        extent_of(&self.exts[self.n_exts], arr, index)
        self.n_exts += 1

    cdef int pin(self, tuple seq) except -1:
        """Record what check_pins compares: each array and the arrays its memory
        comes from (its bases; a base that several arrays share, once), and the
        fingerprint of each entry that is not an ndarray."""
        cdef Py_ssize_t i, count = 0
        cdef PyObject *obj
        cdef Pin *g
        cdef set bases = set()
        for recording in (False, True):
            bases.clear()
            for i in range(len(self.arrays)):
                obj = <PyObject *>self.arrays[i]
                while obj != NULL and cnp.PyArray_Check(<object>obj):
                    if obj != <PyObject *>self.arrays[i]:
                        if <size_t>obj in bases:
                            break
                        bases.add(<size_t>obj)
                    if recording:
                        g = &self.pins[self.n_pins]
                        g.arr = obj
                        g.data = <char *>cnp.PyArray_DATA(<cnp.ndarray>obj)
                        g.size = n_elements(<cnp.ndarray>obj)
                        g.pos = i
                        g.written = obj == <PyObject *>self.arrays[i]
                        self.n_pins += 1
                    else:
                        count += 1
                    obj = cnp.PyArray_BASE(<cnp.ndarray>obj)
            if not recording:
                self.pins = <Pin *>malloc((count + 1) * sizeof(Pin))
                if self.pins == NULL:
                    raise MemoryError()
        for i in range(len(seq)):
            if seq[i] is not None and not cnp.PyArray_Check(seq[i]):
                fp = fingerprint(seq[i])
                if fp is not None:
                    self.sources.append((i, seq[i], fp))
        return 0

    cdef int check_pins(self) except -1:
        """Raise unless every array still has the memory it had when pinned."""
        cdef Py_ssize_t k
        cdef const Pin *g
        for k in range(self.n_pins):
            g = &self.pins[k]
            if (<char *>cnp.PyArray_DATA(<cnp.ndarray>g.arr) != g.data
                    or n_elements(<cnp.ndarray>g.arr) != g.size):
                raise RuntimeError(f"t_list[{g.pos}]: its memory moved since the Plan was "
                                   f"built (resized or reallocated); build a new Plan")
            if g.written and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>g.arr):
                raise ValueError(f"t_list[{g.pos}]: the array was made read-only after the "
                                 f"Plan was built")
        for i, obj, fp in self.sources:
            if fingerprint(obj) != fp:
                raise RuntimeError(f"t_list[{i}]: the tensor's memory, shape or strides "
                                   f"changed since the Plan was built (resize_, set_, .data "
                                   f"=); build a new Plan")
        return 0

    cdef double norm(self, double norm_type, int n_threads) except? -1.0:
        return self.clip_with(NULL, NULL, norm_type, n_threads)

    cdef int scale_generic(self, double factor) except -1:
        """NumPy scales the buffers the kernels only read a float64 copy of.

        16-bit ones by the float32 factor, as the kernels scale them; the others
        by a float64 scalar, so that the product is taken in float64 (or long
        double) and rounded once (a Python float would be cast to the buffer's
        dtype first, and a small factor lose its digits).
        """
        cdef object f32 = np.float32(factor), f64 = np.float64(factor)
        for _, arr, copy in self.generic:
            np.multiply(arr, f32 if arr.dtype.itemsize == 2 else f64, out=arr, casting="unsafe")
        return 0

    cdef int scale(self, double factor, int n_threads) except -1:
        """Every buffer multiplied by factor, in place."""
        with nogil:
            layout_scale(&self.lay, factor, n_threads)
        return self.scale_generic(factor)

    cdef double clip_with(self, clip_rule rule, const void *ctx, double norm_type,
                          int n_threads) except? -1.0:
        """The norm, and every buffer multiplied by rule(norm, ctx) unless that is 1
        (rule NULL: the norm only)."""
        cdef double norm, factor = 1.0
        for i, arr, copy in self.generic:
            with np.errstate(over="ignore"):
                np.copyto(copy, arr, casting="unsafe")
            if arr.dtype.itemsize > 8 and np.isinf(copy).any() and np.isfinite(arr).any():
                bad = np.isinf(copy) & np.isfinite(arr)
                if bad.any():
                    raise ValueError(f"t_list[{i}]: {arr.dtype} values beyond float64's range "
                                     f"(such as {arr[bad].flat[0]!r}) cannot be clipped; "
                                     f"nothing was modified")
        with nogil:
            norm = layout_clip(&self.lay, norm_type, rule, ctx, n_threads)
        if rule != NULL:
            factor = rule(norm, ctx)
        if factor != 1.0:
            self.scale_generic(factor)
        return norm

    cdef double clip(self, double clip_norm, object use_norm, double norm_type,
                     bint error_if_nonfinite, int n_threads) except? -1.0:
        cdef ClipRule rule
        cdef double norm, scale
        rule.clip_norm = clip_norm
        rule.error_if_nonfinite = error_if_nonfinite
        if use_norm is None:
            norm = self.clip_with(tf_rule, &rule, norm_type, n_threads)
        else:
            norm = <double>use_norm
            scale = tf_rule(norm, &rule)
            if scale != 1.0:
                self.scale(scale, n_threads)
        if error_if_nonfinite and not isfinite(norm):
            raise ValueError(f"the global norm is {norm}, not finite: nothing was "
                             f"clipped (error_if_nonfinite=True)")
        return norm


cpdef tuple as_tuple(object t_list, str name):
    """t_list as a tuple: TensorFlow's check (any sequence but a string), nor an array or bytes."""
    if type(t_list) is tuple:
        return <tuple>t_list
    if type(t_list) is list:
        return tuple(t_list)     # our own references, whatever the caller does meanwhile
    if (isinstance(t_list, (str, bytes)) or isinstance(t_list, np.ndarray)
            or not isinstance(t_list, collections.abc.Sequence)):
        raise TypeError(f"{name} must be a list or tuple of arrays, got "
                        f"{type(t_list).__name__}")
    return tuple(t_list)


cdef _Buffers collect(object t_list, bint in_place, str name):
    """Validate every entry of t_list and lay the buffers out; None entries are skipped."""
    cdef tuple seq = as_tuple(t_list, name)
    cdef _Buffers buf = _Buffers.__new__(_Buffers)
    cdef Py_ssize_t i
    buf.arrays = [None] * len(seq)
    if in_place:
        buf.exts = <Extent *>malloc((len(seq) + 1) * sizeof(Extent))
        if buf.exts == NULL:
            raise MemoryError()
    for i in range(len(seq)):
        obj = seq[i]
        if obj is None:
            continue
        if type(obj) is not ndarray:
            obj = buffer_view(obj, f"{name}[{i}]", writable=in_place)
        buf.add(<cnp.ndarray>obj, i, name, in_place)
    if in_place:
        report_overlap(buf.exts, buf.n_exts, buf.arrays, name)
        free(buf.exts)
        buf.exts = NULL
    return buf


def writable_arrays(object t_list, str name):
    """The arrays of a list of buffers to write (None entries stay None), each
    checked as the in-place clip checks its entries: floating point,
    writable, not overlapping itself or another. Nothing is written."""
    return collect(t_list, True, name).arrays


cpdef object as_scalar(object value, str name, bint tf=False):
    """The value of a real-number argument: clip_norm, use_norm, norm_type, eps...

    The one parser of number arguments: a Python or NumPy number, or a 0-d
    array or tensor (its memory taken as buffer_view takes it). Strings,
    bytes and complex numbers are refused. The core's rules (tf False): a
    float within float64's range, from a real number or anything else
    float() takes; a bool, or an array or tensor of another shape, is a
    TypeError.
    TensorFlow's rules (tf True), for the TF-named functions: the NumPy
    scalar of the argument's own dtype (a bool is a number, as TF converts
    it); a value of another shape is a ValueError.
    """
    cdef cnp.ndarray arr
    if isinstance(value, (str, bytes, complex, np.complexfloating)) or (
            not tf and isinstance(value, (bool, np.bool_))):
        raise not_real(name, value)
    if not tf and (type(value) is float or type(value) is int):
        return real_float(value, name)
    try:
        arr = value if type(value) is ndarray else buffer_view(value, name, False)
    except TypeError:
        if tf:
            raise
        if getattr(value, "ndim", 0) != 0:
            raise not_real(name, value) from None
        return real_float(value, name)    # a 0-d tensor NumPy cannot view (bfloat16, GPU)
    if cnp.PyArray_NDIM(arr) != 0:
        if tf:
            raise ValueError(f"{name} must be a scalar, got shape {(<object>arr).shape}")
        raise not_real(name, value)
    kind = (<object>arr).dtype.kind
    if kind in "fiu" or (tf and kind == "b") or is_bfloat16(arr):
        return (<object>arr)[()] if tf else float(arr)
    if kind == "O" and not tf:        # Decimal, Fraction, ints beyond int64
        return real_float(value, name)
    raise not_real(name, (<object>arr).dtype if tf else value)


cdef double real_float(object value, str name) except? -1.0:
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a real number within float64's range, "
                         f"got {value!r:.40}") from None
    except (TypeError, ValueError):
        raise not_real(name, value) from None


cdef object not_real(str name, object what):
    """The TypeError for a value (or a dtype) that is not a real number."""
    if not isinstance(what, np.dtype):
        what = type(what).__name__
    return TypeError(f"{name} must be a real number, got {what}")


cdef double as_clip_norm(object value) except? -1.0:
    cdef double c = as_scalar(value, "clip_norm")
    if isnan(c) or c < 0:
        raise ValueError(f"clip_norm must be a number >= 0, got {value!r}")
    return c


cpdef double as_norm_type(object value) except? -1.0:
    """norm_type, p of the p-norm: a real number > 0 (inf for the max norm)."""
    cdef double p = as_scalar(value, "norm_type")
    if isnan(p) or p <= 0:
        raise ValueError(f"norm_type must be > 0 (inf for the max norm), got {value!r}")
    return p


cpdef int as_threads(object value, int default=0) except? -1:
    """An n_threads argument as the kernels take it (kernels.resolve_threads).

    The one conversion of n_threads: None gives default (0: what OpenMP may
    use; -k: an adapter's count k, which late teams back off as they do the
    default); else an int >= 1, kept within a C int (the policy caps it at the
    team it can have).
    """
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"n_threads must be None or an int >= 1, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"n_threads must be None or an int >= 1, got {value}")
    return min(value, INT_MAX)


def clip_by_global_norm_(t_list, clip_norm, *, use_norm=None, norm_type=2.0,
                         error_if_nonfinite=False, n_threads=None):
    """Rescale every buffer in place by ``clip_norm / max(norm, clip_norm)``.

    Parameters
    ----------
    t_list : list or tuple of arrays
        Writable float32/float64 arrays or objects exposing such memory
        (PyTorch CPU tensors, buffer-protocol objects); None entries are
        skipped. No copy is ever made: views, slices and transposes are
        scaled in the caller's memory.
    clip_norm : float
        The norm to clip to, >= 0 (inf: never clip).
    use_norm : float, optional
        Use this global norm instead of computing it.
    norm_type : float, default 2.0
        p of the p-norm (2, 1, inf or any p > 0).
    error_if_nonfinite : bool, default False
        If the norm is NaN or inf: raise ValueError and modify nothing. If
        False, TensorFlow's rule applies: every element becomes NaN.
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    float
        The global norm before clipping. When it is <= clip_norm nothing is
        written.

    Raises
    ------
    TypeError
        If t_list is not a list or tuple, an entry is not a float buffer
        (integer arrays, strings, ...) or a number argument is not a number.
    ValueError
        If an entry is read-only, two entries share memory, clip_norm is
        negative or NaN, or (with error_if_nonfinite) the norm is not finite.
        Every buffer is checked before any is written.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> g = [np.array([3.0, 4.0], np.float32)]
    >>> clipcore.clip_by_global_norm_(g, 1.0)
    5.0
    >>> g[0]
    array([0.6, 0.8], dtype=float32)
    """
    cdef double c = as_clip_norm(clip_norm)
    cdef double p = as_norm_type(norm_type)
    cdef int nt = as_threads(n_threads)
    if use_norm is not None:
        use_norm = as_scalar(use_norm, "use_norm")
    return collect(t_list, True, "t_list").clip(c, use_norm, p, bool(error_if_nonfinite), nt)


cdef class Plan:
    """Buffers validated and laid out once, for clipping the same list every step.

    A trainer that clips the same gradient buffers at every step builds a
    Plan once; each call then goes straight to the kernels. The Plan keeps
    the buffers alive; their contents may change between calls. Each call
    first checks that every buffer still has the memory it had (a resized
    array or tensor, ``set_``, ``.data =``: RuntimeError) and is still
    writable (ValueError). A Plan holds the tensors it was given: after
    ``p.grad`` is rebound (``zero_grad(set_to_none=True)``) it still clips
    the old ones, so build a new Plan then (or use :mod:`clipcore.torch`,
    which takes the parameters at every call).

    Parameters
    ----------
    t_list : list or tuple of arrays
        As for :func:`clip_by_global_norm_`: writable, disjoint float buffers.
    n_threads : int or None
        Threads for every call; None uses what OpenMP may use.

    Raises
    ------
    TypeError, ValueError
        As :func:`clip_by_global_norm_`, at construction.
    RuntimeError
        At a call, when a buffer's memory moved since construction, or the
        Plan was never initialised (a subclass that skips ``__init__``).

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> grads = [np.array([3.0, 4.0], np.float32), np.zeros(2, np.float32)]
    >>> plan = clipcore.Plan(grads)
    >>> plan.global_norm()
    5.0
    >>> plan.clip_by_global_norm_(2.5)
    5.0
    >>> grads[0]
    array([1.5, 2. ], dtype=float32)
    """
    def __init__(self, t_list, *, n_threads=None):
        cdef tuple seq = as_tuple(t_list, "t_list")
        cdef _Buffers buffers = collect(seq, True, "t_list")
        buffers.pin(seq)
        self.n_threads = as_threads(n_threads)
        # A call running in another thread holds its own reference to the old
        # buffers: re-initialising never frees memory under a running kernel.
        self.buffers = buffers

    cdef _Buffers live(self):
        """The buffers, checked for moved memory (a local reference: see __init__)."""
        cdef _Buffers buffers = self.buffers
        if buffers is None:
            raise RuntimeError("this Plan was not initialised (a subclass must call "
                               "Plan.__init__)")
        buffers.check_pins()
        return buffers

    @property
    def size(self):
        """Number of elements over all buffers."""
        return self.live().lay.n_total

    def __len__(self):
        """Number of buffers (None entries excluded)."""
        return sum(a is not None for a in self.live().arrays)

    def global_norm(self, *, norm_type=2.0):
        """The norm over the plan's buffers now; see :func:`global_norm`."""
        cdef double p = as_norm_type(norm_type)
        return self.live().norm(p, self.n_threads)

    def clip_by_global_norm_(self, clip_norm, *, use_norm=None, norm_type=2.0,
                             error_if_nonfinite=False):
        """Clip the plan's buffers in place; see :func:`clip_by_global_norm_`."""
        cdef double c = as_clip_norm(clip_norm)
        cdef double p = as_norm_type(norm_type)
        if use_norm is not None:
            use_norm = as_scalar(use_norm, "use_norm")
        return self.live().clip(c, use_norm, p, bool(error_if_nonfinite), self.n_threads)


def plan_over_memory(addresses, lengths, kinds, *, bint writable, int n_threads):
    """A Plan over contiguous buffers given by address, length and kind.

    kinds[i] is the buffer's element type as a segment kind (KIND_F32,
    KIND_F64, KIND_F16, KIND_BF16). For adapters that check the buffers
    themselves (clipcore.torch): no reference is taken, so the caller keeps
    the memory alive while using the Plan. With writable, buffers that share
    memory raise ValueError (they would be scaled twice); for reading,
    sharing is fine. n_threads as as_threads gives it (an adapter passes
    its framework's count as its default).
    """
    cdef Py_ssize_t count = len(addresses), i, n_ext = 0, length
    cdef Plan plan = Plan.__new__(Plan)
    cdef _Buffers buf = _Buffers.__new__(_Buffers)
    cdef Extent *exts = NULL
    cdef char *data
    cdef int itemsize, kind
    if writable:
        exts = <Extent *>malloc((count + 1) * sizeof(Extent))
        if exts == NULL:
            raise MemoryError()
    try:
        for i in range(count):
            length = lengths[i]
            if length == 0:
                continue
            data = <char *><size_t>addresses[i]
            kind = kinds[i]
            if kind != SEG_F32 and kind != SEG_F64 and kind != SEG_F16 and kind != SEG_BF16:
                raise ValueError(f"kinds[{i}]: not a buffer kind: {kind!r}")
            itemsize = segment_itemsize(kind)
            buf.push(data, length, 1, kind)
            if writable:
                exts[n_ext].lo = data
                exts[n_ext].hi = data + length * itemsize
                exts[n_ext].pos = i
                exts[n_ext].dense = True
                n_ext += 1
        if writable:
            report_overlap(exts, n_ext, None, "tensors")
    finally:
        free(exts)
    plan.buffers = buf
    plan.n_threads = n_threads
    return plan


def scale_(Plan plan not None, double factor):
    """Multiply the plan's buffers by factor in place (clipcore.torch)."""
    plan.live().scale(factor, plan.n_threads)
