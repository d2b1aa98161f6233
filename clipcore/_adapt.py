"""Inputs of any framework in, results of the same framework out.

The TensorFlow-semantics functions accept NumPy arrays, TensorFlow eager
tensors, PyTorch CPU tensors, objects with ``values``/``indices``/
``dense_shape`` (TensorFlow's ``IndexedSlices``), Python numbers and lists.
Everything becomes an ndarray here (a view where the framework allows one),
and the result goes back to the caller's type. TensorFlow and PyTorch are
recognised by the module name of the object's type and imported only then,
when they are necessarily imported already.

Python numbers and lists given where they fix the dtype (a tensor argument,
a t_list entry) take TensorFlow's default dtypes, as ``tf.convert_to_tensor``
gives them (float32 for floats, int32 for ints that fit): see
:func:`as_tensor_array`. Where an operand is converted to another's dtype (a
bound, a clip norm) its exact value is kept until then.

Symbolic tensors (inside ``tf.function``) and tensors a ``tf.GradientTape``
records go to ``clipcore._tf``: :func:`tf_aware` decorates each TF-named
function with that check.
"""
import functools
import importlib
import inspect
import sys

import numpy as np

from clipcore._elementwise import TYPE_CODES
from clipcore._lists import buffer_view, check_writable, framework, needs_copy

# Results larger than this go to TensorFlow through DLPack (no copy); smaller
# ones are copied, which is faster than setting up the capsule. (Bytes: not
# the kernels' 65536-element ITEM_ELEMENTS or PARALLEL_MIN, another idea.)
_TF_DLPACK_MIN_BYTES = 1 << 16


def is_slices(obj):
    """True for IndexedSlices-like objects (values, indices, dense_shape)."""
    return (not isinstance(obj, np.ndarray) and hasattr(obj, "values")
            and hasattr(obj, "indices") and hasattr(obj, "dense_shape"))


def is_float(dtype):
    return dtype.kind == "f" or dtype.name == "bfloat16"


def is_real(dtype):
    """Float or integer: the types TensorFlow's clip ops and maximum/minimum take."""
    return dtype.kind in "fiu" or dtype.name == "bfloat16"


def type_code(arr):
    """The elementwise kernels' type code for arr (clipcore._elementwise.TYPE_CODES),
    or None when NumPy must do the work (also for memory the kernels cannot
    read as it is: clipcore._lists.needs_copy)."""
    if needs_copy(arr):
        return None
    dt = arr.dtype
    return TYPE_CODES.get((dt.kind, dt.itemsize))


def numpy_result(res):
    """What NumPy returns: a NumPy scalar for a 0-d result."""
    return res[()] if res.ndim == 0 else res


_TF_ALIGN = 64


def to_tf(res):
    tf = importlib.import_module("tensorflow")
    # Zero-copy only for memory aligned as TF's kernels require (64 bytes):
    # TF does not check what DLPack hands it and aborts later otherwise.
    if (res.nbytes >= _TF_DLPACK_MIN_BYTES and res.flags.c_contiguous
            and res.ctypes.data % _TF_ALIGN == 0):
        try:
            return tf.experimental.dlpack.from_dlpack(res.__dlpack__())
        except (AttributeError, BufferError, TypeError, ValueError, RuntimeError):
            pass         # dtypes DLPack lacks (bfloat16): copy below
    return tf.convert_to_tensor(res)


def to_torch(res):
    torch = importlib.import_module("torch")
    return torch.from_numpy(res)


_PYTHON_SCALARS = (int, float, bool, complex)
_INT32 = np.iinfo(np.int32)


def _python_leaves(obj):
    """True when obj is a Python number or a (nested) list/tuple of them only."""
    if type(obj) in _PYTHON_SCALARS:
        return True
    return type(obj) in (list, tuple) and all(_python_leaves(o) for o in obj)


def as_tensor_array(obj, name):
    """:func:`as_array`, with Python numbers and lists in TF's default dtypes.

    ``tf.convert_to_tensor`` makes Python floats float32 and Python ints
    int32 (int64 when one does not fit); NumPy would make both 64-bit.
    """
    arr, wrap, fw = as_array(obj, name)
    if type(obj) in _PYTHON_SCALARS + (list, tuple) and _python_leaves(obj):
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        elif arr.dtype == np.int64 and (arr.size == 0 or (
                arr.min() >= _INT32.min and arr.max() <= _INT32.max)):
            arr = arr.astype(np.int32)
    return arr, wrap, fw


def _holds_tf(values):
    """True when a value (or an entry of a list/tuple value) is a TensorFlow object."""
    for v in values:
        t = type(v)
        if t is np.ndarray or v is None:
            continue
        for k in (set(map(type, v)) if (t is list or t is tuple) else (t,)):
            if (k.__module__ or "").startswith("tensorflow"):
                return True
    return False


def tf_aware(fn):
    """fn, handing calls with TensorFlow objects to ``clipcore._tf`` first.

    Without TF imported (then no TF object can exist) the check costs a
    dictionary lookup; with it, a look at the type of each argument and of
    each entry of list arguments. ``clipcore._tf`` runs fn itself for eager
    calls no tape records.
    """
    name = fn.__name__

    @functools.wraps(fn)
    def tf_aware_fn(*args, **kwargs):
        if "tensorflow" in sys.modules and (_holds_tf(args) or _holds_tf(kwargs.values())):
            from clipcore import _tf
            return _tf.call(name, fn, args, kwargs)
        return fn(*args, **kwargs)
    # What tf.autograph.experimental.do_not_convert sets (without importing TF):
    # inside tf.function AutoGraph then calls this as it is, instead of trying
    # (and failing, noisily, for the compiled ones) to convert its code.
    tf_aware_fn.autograph_info__ = None
    # tf.function unwraps a function given as an argument down __wrapped__,
    # which would hand it fn without this dispatch: fn goes under another name,
    # and the signature is kept for help() and the docs.
    del tf_aware_fn.__wrapped__
    tf_aware_fn.__signature__ = inspect.signature(fn)
    tf_aware_fn.eager = fn
    return tf_aware_fn


def _rebuild(obj, values):
    return type(obj)(values=values, indices=obj.indices, dense_shape=obj.dense_shape)


def as_array(obj, name):
    """(ndarray, wrap, fw): obj as an array and how to give a result obj's type.

    The array is a view of obj's memory when obj is an ndarray, a tensor or
    an IndexedSlices' values; Python numbers and lists become new arrays.
    fw is 'tf' or 'torch' when obj (or its values) belongs to one of them.
    """
    if type(obj) is np.ndarray:
        return obj, numpy_result, None
    if is_slices(obj):
        arr, wrap, fw = as_array(obj.values, f"{name}.values")
        return arr, (lambda res: _rebuild(obj, wrap(res))), fw
    fw = framework(obj)
    return buffer_view(obj, name, writable=False), result_wrap(fw), fw


def as_writable(obj, name):
    """An ndarray over obj's own memory, for the in-place functions."""
    if is_slices(obj):
        return as_writable(obj.values, f"{name}.values")
    fw = framework(obj)
    if fw == "tf":
        raise TypeError(f"{name}: TensorFlow tensors are immutable; use the function "
                        f"without the trailing underscore")
    if isinstance(obj, (int, float, complex, str, bytes, list, tuple, np.generic)):
        raise TypeError(f"{name}: a {type(obj).__name__} cannot be modified in place; "
                        f"expected a NumPy array, a PyTorch tensor or a writable buffer")
    arr = buffer_view(obj, name, writable=True)
    check_writable(arr, name)
    return arr


def result_wrap(fw):
    """The wrap function for results of framework fw (None: NumPy)."""
    if fw == "tf":
        return to_tf
    if fw == "torch":
        return to_torch
    return numpy_result
