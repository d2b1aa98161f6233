"""TensorFlow's clipping ops with TensorFlow's semantics, on clipcore's kernels.

Each function validates and converts its arguments here (before anything is
written), then runs a kernel of clipcore._elementwise without the GIL, then
returns a result of the caller's type (see clipcore._adapt). Element types
without a kernel (float16, bfloat16) go through NumPy with the same rules.

Every TF-named function also works inside ``tf.function`` on symbolic
tensors, and under ``tf.GradientTape`` with TF's gradients: calls holding
TensorFlow objects go through clipcore._tf (see ``tf_aware``). Python
numbers and lists given as the tensor take TF's default dtypes (float32,
int32), as ``tf.convert_to_tensor`` gives them.
"""
import numbers
import operator

import numpy as np

from clipcore import _elementwise as _ew
from clipcore import _global
from clipcore._global import empty_like_many
from clipcore._adapt import (as_array, as_tensor_array, as_writable, is_float, is_real,
                             result_wrap, tf_aware, type_code)
from clipcore._lists import as_native, as_norm_type, as_scalar, as_threads, as_tuple, needs_copy

__all__ = ["maximum", "minimum", "relu", "relu_", "clip_by_value", "clip_by_value_",
           "clip_by_norm", "clip_by_norm_", "clip_by_average_norm", "norm",
           "global_norm", "clip_by_global_norm"]

_TENSOR, _ARRAY, _PYTHON = 0, 1, 2      # how strongly an operand fixes the dtype


# ------------------------------------------------------------------ arguments

def _typed(obj, name):
    """(ndarray, wrap, fw, rank): rank says how the operand's dtype counts."""
    arr, wrap, fw = as_array(obj, name)
    if fw is not None:
        rank = _TENSOR
    elif isinstance(obj, (np.ndarray, np.generic)):
        rank = _ARRAY
    else:
        rank = _PYTHON
    return arr, wrap, fw, rank


def _check_real(arr, name, floats_only=False):
    if floats_only and not is_float(arr.dtype):
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got {arr.dtype}")
    if not is_real(arr.dtype):
        raise TypeError(f"{name} must be a float or integer tensor, got {arr.dtype}")


def _convert(arr, rank, dtype, name):
    """An operand in dtype, converted as TensorFlow converts it.

    Tensors must already have dtype (TF refuses to mix tensor dtypes); NumPy
    arrays and scalars are cast; Python ints are cast (wrapping, as TF does:
    -1 becomes 255 in uint8) and Python floats are refused for integer dtypes.
    """
    if arr.dtype == dtype:
        return arr
    if not is_real(arr.dtype) and arr.dtype.kind != "b":
        raise TypeError(f"{name} must be a number or a real tensor, got {arr.dtype}")
    if rank == _TENSOR:
        raise TypeError(f"{name} has dtype {arr.dtype}, expected {dtype} (tensors of "
                        f"different dtypes are not converted)")
    if rank == _PYTHON and is_float(arr.dtype) and dtype.kind in "iu":
        raise TypeError(f"{name}: cannot convert the float value(s) {arr.tolist()!r:.60} "
                        f"to {dtype}")
    with np.errstate(all="ignore"):
        return arr.astype(dtype)


def _broadcast_into(arr, shape, name, tname="t"):
    """Raise ValueError unless arr broadcasts to shape without changing it."""
    if arr.ndim == 0:
        return
    try:
        full = np.broadcast_shapes(arr.shape, shape)
    except ValueError:
        full = None
    if full != tuple(shape):
        raise ValueError(f"{name} with shape {arr.shape} cannot be broadcast to {tname}'s "
                         f"shape {tuple(shape)}")


def _output(out, shape, dtype, fw, like=None):
    """A validated out= array, or a new one for the result."""
    if out is None:
        if like is None or like.shape != tuple(shape):
            return np.empty(shape, dtype)
        if dtype.isnative and dtype.kind in "fiu":
            # C order (F for F-ordered input); large results reuse the memory of
            # earlier ones nothing refers to any more (clipcore._global).
            return empty_like_many([like], [dtype.num])[0]
        return np.empty_like(like, dtype=dtype, order="C" if fw == "tf" else "K")
    arr = as_writable(out, "out")
    if arr.shape != tuple(shape):
        raise ValueError(f"out must have shape {tuple(shape)}, got {arr.shape}")
    if arr.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype}, got {arr.dtype}")
    return arr


def _axes(axes, ndim, name="axes"):
    """Sorted tuple of distinct non-negative axes; None means every axis."""
    if axes is None:
        return tuple(range(ndim))
    if not isinstance(axes, (list, tuple, numbers.Integral, np.integer)) and hasattr(
            axes, "__array__"):
        axes = np.asarray(axes)               # a tensor of axes, as TF takes them
    seq = [axes] if not isinstance(axes, (list, tuple, np.ndarray)) else list(np.ravel(axes))
    out = []
    for a in seq:
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, (numbers.Integral, np.integer)):
            raise TypeError(f"{name} must be an int or a list of ints, got {a!r}")
        a = operator.index(a)
        if not -ndim <= a < ndim:
            raise ValueError(f"{name}: axis {a} is out of range for a tensor of rank {ndim}")
        a %= ndim
        if a in out:
            raise ValueError(f"{name} contains the axis {a} twice")
        out.append(a)
    return tuple(sorted(out))


def _unalias(arr, out):
    """arr itself when it is out or does not overlap it; else a copy."""
    if arr is out or arr.size == 0 or not np.may_share_memory(arr, out):
        return arr
    return arr.copy()


# ---------------------------------------------------------------- elementwise

def _elementwise(op, inputs, out, nt):
    """out = op(*inputs): inputs have out's dtype and broadcast to its shape
    (the kernel broadcasts them itself)."""
    inputs = [_unalias(a, out) for a in inputs]
    tcode = type_code(out)
    if tcode is None:
        with np.errstate(all="ignore"):
            if op == _ew.OP_MAX:
                np.maximum(inputs[0], inputs[1], out=out)
            elif op == _ew.OP_MIN:
                np.minimum(inputs[0], inputs[1], out=out)
            elif op == _ew.OP_CLIP:
                np.minimum(inputs[0], inputs[2], out=out)
                np.maximum(out, inputs[1], out=out)
            else:
                np.multiply(inputs[0], inputs[1], out=out)
        return
    operands = [a if a is out else as_native(a) for a in inputs]
    operands.append(out)
    _ew.ew_apply(op, tcode, tuple(operands), nt)


def _minmax(op, x, y, out, n_threads):
    nt = as_threads(n_threads)
    xa, _, xfw, xr = _typed(x, "x")
    ya, _, yfw, yr = _typed(y, "y")
    # The dtype comes from the first tensor, else the first NumPy array or
    # scalar (the other operand is converted to it, as TF does); between
    # Python numbers and lists, the first one's default dtype in TF.
    if xr == yr == _PYTHON:              # TF: the first one's default dtype
        dtype = as_tensor_array(x, "x")[0].dtype
    else:
        dtype = xa.dtype if xr <= yr else ya.dtype
    if not is_real(dtype):
        raise TypeError(f"{'x' if xr <= yr else 'y'} must be a float or integer tensor, "
                        f"got {dtype}")
    xa = _convert(xa, xr, dtype, "x")
    ya = _convert(ya, yr, dtype, "y")
    try:
        shape = np.broadcast_shapes(xa.shape, ya.shape)
    except ValueError:
        raise ValueError(f"x and y cannot be broadcast together: shapes {xa.shape} and "
                         f"{ya.shape}") from None
    fw = xfw or yfw
    like = xa if xa.shape == shape else (ya if ya.shape == shape else None)
    res = _output(out, shape, dtype, fw, like)
    _elementwise(op, [xa, ya], res, nt)
    return out if out is not None else result_wrap(fw)(res)


@tf_aware
def maximum(x, y, name=None, *, out=None, n_threads=None):
    """Elementwise maximum of x and y, as ``tf.maximum``: NaN in either gives NaN.

    Parameters
    ----------
    x, y : array_like or tensor
        NumPy arrays, TensorFlow or PyTorch tensors, numbers or lists, of a
        float or integer dtype, broadcasting together (NumPy's rules).
    name : str, optional
        Accepted for TensorFlow compatibility; unused.
    out : ndarray, optional
        Where to write the result (shape and dtype of the result).
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    array or tensor
        Of the inputs' type (a TensorFlow or PyTorch input gives a tensor of
        that framework), or ``out``. The dtype is the first tensor's, else the
        first NumPy array's; the other operand is converted to it as
        TensorFlow converts (Python floats are not converted to integers).

    Raises
    ------
    TypeError
        Unsupported dtypes, tensors of different dtypes, a Python float for
        an integer dtype.
    ValueError
        Shapes that do not broadcast, an ``out`` of the wrong shape.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> clipcore.maximum(np.array([1.0, np.nan, -3.0], np.float32), 0.0)
    array([ 1., nan,  0.], dtype=float32)
    """
    return _minmax(_ew.OP_MAX, x, y, out, n_threads)


@tf_aware
def minimum(x, y, name=None, *, out=None, n_threads=None):
    """Elementwise minimum of x and y, as ``tf.minimum``: NaN in either gives NaN.

    Parameters and returns as :func:`maximum`.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> clipcore.minimum(np.array([[1, 5], [7, 2]]), np.array([3, 3]))
    array([[1, 3],
           [3, 2]])
    """
    return _minmax(_ew.OP_MIN, x, y, out, n_threads)


def _relu(arr, res, nt):
    _check_real(arr, "features")
    _elementwise(_ew.OP_MAX, [arr, np.zeros((), arr.dtype)], res, nt)


@tf_aware
def relu(features, name=None, *, out=None, n_threads=None):
    """``max(features, 0)`` elementwise, as ``tf.nn.relu``: NaN stays NaN.

    Parameters
    ----------
    features : array_like or tensor
        Float or integer values (NumPy, TensorFlow, PyTorch, numbers, lists).
    name : str, optional
        Accepted for TensorFlow compatibility; unused.
    out : ndarray, optional
        Where to write the result (features' shape and dtype); may be
        ``features`` itself.
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    array or tensor
        Of the input's type and dtype, or ``out``.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> clipcore.relu(np.array([-2.0, 0.5, np.nan]))
    array([0. , 0.5, nan])
    """
    nt = as_threads(n_threads)
    arr, wrap, fw = as_tensor_array(features, "features")
    _check_real(arr, "features")
    res = _output(out, arr.shape, arr.dtype, fw, arr)
    _relu(arr, res, nt)
    return out if out is not None else wrap(res)


def relu_(features, *, n_threads=None):
    """:func:`relu` in place: overwrites ``features`` and returns it.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> x = np.array([-1, 2, -3], np.int32)
    >>> clipcore.relu_(x) is x, x
    (True, array([0, 2, 0], dtype=int32))
    """
    nt = as_threads(n_threads)
    arr = as_writable(features, "features")
    _relu(arr, arr, nt)
    return features


def _clip_value_args(arr, clip_value_min, clip_value_max):
    _check_real(arr, "t")
    bounds = []
    for value, name in ((clip_value_min, "clip_value_min"), (clip_value_max, "clip_value_max")):
        b, _, _, rank = _typed(value, name)
        b = _convert(b, rank, arr.dtype, name)
        _broadcast_into(b, arr.shape, name)
        bounds.append(b)
    return bounds


@tf_aware
def clip_by_value(t, clip_value_min, clip_value_max, name=None, *, out=None, n_threads=None):
    """Clip t to [clip_value_min, clip_value_max], as ``tf.clip_by_value``.

    Computed as TensorFlow composes it, ``maximum(minimum(t, max), min)``: if
    min > max every element becomes min; NaN in t stays NaN, a NaN bound
    gives NaN, infinities are clipped.

    Parameters
    ----------
    t : array_like, tensor or IndexedSlices
        Float (float16/bfloat16/32/64) or integer (int8..64, uint8..64)
        values. IndexedSlices-like objects are clipped on their values.
    clip_value_min, clip_value_max : scalar or array_like
        Bounds, converted to t's dtype (Python floats are not converted to
        integer dtypes; tensors must have t's dtype). They broadcast to t's
        shape but may not change it.
    name : str, optional
        Accepted for TensorFlow compatibility; unused.
    out : ndarray, optional
        Where to write the result (t's shape and dtype); may be t itself.
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    array, tensor or IndexedSlices
        Of t's type and dtype (or ``out``); t is not modified.

    Raises
    ------
    TypeError
        t or a bound of an unsupported dtype, a Python float bound for an
        integer t, a tensor bound of another dtype.
    ValueError
        A bound that would change t's shape or does not broadcast to it.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> clipcore.clip_by_value(np.array([-5, 2, 9], np.int32), 0, 4)
    array([0, 2, 4], dtype=int32)
    >>> clipcore.clip_by_value(np.array([np.nan, np.inf, -np.inf]), -4.0, 4.0)
    array([nan,  4., -4.])
    """
    nt = as_threads(n_threads)
    arr, wrap, fw = as_tensor_array(t, "t")
    lo, hi = _clip_value_args(arr, clip_value_min, clip_value_max)
    res = _output(out, arr.shape, arr.dtype, fw, arr)
    _elementwise(_ew.OP_CLIP, [arr, lo, hi], res, nt)
    return out if out is not None else wrap(res)


def clip_by_value_(t, clip_value_min, clip_value_max, *, n_threads=None):
    """:func:`clip_by_value` in place: overwrites t (its values for IndexedSlices) and returns it.

    Every argument is checked before t is written.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> x = np.array([0.5, 3.0, -2.0], np.float32)
    >>> _ = clipcore.clip_by_value_(x, -1.0, 1.0)
    >>> x
    array([ 0.5,  1. , -1. ], dtype=float32)
    """
    nt = as_threads(n_threads)
    arr = as_writable(t, "t")
    lo, hi = _clip_value_args(arr, clip_value_min, clip_value_max)
    _elementwise(_ew.OP_CLIP, [arr, lo, hi], arr, nt)
    return t


# ------------------------------------------------------------------- per axis

def _work_dtype(dtype):
    """float32/float64 carry the kernels; float16/bfloat16 run on float32 copies."""
    return np.dtype(np.float64) if dtype.itemsize > 4 else np.dtype(np.float32)


def _arb(arr, axes):
    """A 3-d view (A, R, B) of arr reducing over axes, or None if none exists."""
    shape = arr.shape
    if not axes:
        dims = (arr.size, 1, 1)
    elif axes == tuple(range(axes[0], axes[-1] + 1)):
        dims = (int(np.prod(shape[:axes[0]])), int(np.prod(shape[axes[0]:axes[-1] + 1])),
                int(np.prod(shape[axes[-1] + 1:])))
    else:
        return None
    try:
        return np.reshape(arr, dims, copy=False)
    except ValueError:
        return None


def _flip(v):
    """True when v's kept axis should be read as the other one (A and B swapped).

    With one kept axis trivial, the kernels read fastest when the kept axis
    with the smaller stride is last (B): rows of an F-ordered matrix are
    then reduced like columns of a C-ordered one.
    """
    a, r, b = v.shape
    return ((b == 1 and a > 1 and abs(v.strides[0]) < abs(v.strides[1]))
            or (a == 1 and b > 1 and abs(v.strides[2]) > abs(v.strides[1])))


def _transposed_copy(arr, axes):
    """(copy, perm): a C-contiguous copy with the kept axes first, then axes."""
    perm = tuple(d for d in range(arr.ndim) if d not in axes) + tuple(axes)
    return np.array(arr.transpose(perm), order="C", copy=True), perm


def _blocks(axes):
    """Runs of consecutive axes: (0, 2, 3) -> [(0,), (2, 3)]."""
    runs = []
    for a in axes:
        if runs and runs[-1][-1] == a - 1:
            runs[-1] = runs[-1] + (a,)
        else:
            runs.append((a,))
    return runs


def _reduce_view(v, kind, nt):
    return _ew.axis_reduce(v.transpose(2, 1, 0) if _flip(v) else v, kind, nt)


def _reduce(arr, axes, kind, nt):
    """Float64 reduction of a float32/float64 array over axes, keepdims shape.

    Axes that are not one run are reduced run by run, the run with the
    smallest strides first (it reads the array in memory order); the later
    runs reduce the small float64 result. Without a view for a run (odd
    strides), a transposed copy is reduced instead.
    """
    keep = tuple(1 if d in axes else n for d, n in enumerate(arr.shape))
    cur, todo, k = arr, list(_blocks(axes)) or [()], kind
    while todo:
        run = min(todo, key=lambda r: min((abs(cur.strides[d]) for d in r), default=0))
        v = _arb(cur, run)
        if v is None:
            rest = tuple(sorted(d for r in todo for d in r))
            xt, _ = _transposed_copy(cur, rest)
            v = xt.reshape(-1, int(np.prod([cur.shape[d] for d in rest])), 1)
            cur = _reduce_view(v, k, nt).reshape(keep)
            break
        cur = _reduce_view(v, k, nt).reshape(
            tuple(1 if d in run else n for d, n in enumerate(cur.shape)))
        todo.remove(run)
        # Later runs add up sums of squares or |x| (non-negative) or take maxima.
        k = _ew.REDUCE_MAXABS if kind == _ew.REDUCE_MAXABS else _ew.REDUCE_SUMABS
    res = cur.reshape(keep)
    if kind == _ew.REDUCE_MAXABS and any(arr.shape[d] == 0 for d in axes):
        res.fill(-np.inf)        # TensorFlow's maximum over nothing
    return res


# A float64 sum of squares outside [2^-960, inf) may have lost the norm to
# overflow or underflow; those slices are summed again scaled by their maximum.
_SUMSQ_SAFE_MIN = 2.0 ** -960


def _l2(x, axes, nt):
    """The 2-norm over axes (keepdims shape), range-safe for float64 as the core's
    global norm is: float32 squares cannot leave float64's range."""
    with np.errstate(all="ignore"):
        sumsq = _reduce(x, axes, _ew.REDUCE_SUMSQ, nt)
        l2 = np.sqrt(sumsq, out=sumsq)        # an array, also 0-d
        if x.dtype.itemsize <= 4 or x.size == 0:
            return l2
        suspect = (l2 == np.inf) | (l2 < np.sqrt(_SUMSQ_SAFE_MIN))
        if not suspect.any():
            return l2
        m = _reduce(x, axes, _ew.REDUCE_MAXABS, nt)
        redo = suspect & (m > 0) & (m < np.inf)
        if redo.any():
            m_safe = np.where(redo, m, 1.0)
            scaled = np.sqrt(np.sum(np.square(x / m_safe), axis=axes, keepdims=True))
            l2 = np.where(redo, m_safe * scaled, l2)
    return l2


def _clip_norm_value(clip_norm, dtype):
    """Scalar clip_norm as TF uses it: negative becomes 0, then t's dtype."""
    c = float(as_scalar(clip_norm, "clip_norm", True))
    if c < 0:
        c = 0.0
    with np.errstate(over="ignore"):
        return float(dtype.type(c))


def _clip_by_norm(arr, clip_norm, axes, res, nt):
    """res = arr clipped by norm over axes; arr and res float, same shape."""
    if not is_float(arr.dtype):
        raise TypeError(f"t must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {arr.dtype}")
    axes = _axes(axes, arr.ndim)
    c_arr, _, _, rank = _typed(clip_norm, "clip_norm")
    if isinstance(clip_norm, (str, bytes)) or not (is_real(c_arr.dtype) or c_arr.dtype.kind == "b"):
        raise TypeError(f"clip_norm must be a real number or tensor, got "
                        f"{type(clip_norm).__name__}")
    if arr.size == 0:
        return
    work_dt = _work_dtype(arr.dtype)
    if c_arr.ndim:                                   # per-element clip norms
        _broadcast_into(c_arr, arr.shape, "clip_norm")
        with np.errstate(all="ignore"):
            c64 = np.maximum(c_arr.astype(np.float64), 0).astype(arr.dtype).astype(np.float64)
            x = as_native(arr).astype(work_dt, copy=False)
            l2 = _l2(x, axes, nt)
            np.copyto(res, x.astype(np.float64) * c64 / np.maximum(l2, c64), casting="unsafe")
        return
    c = _clip_norm_value(clip_norm, arr.dtype)
    if arr.dtype != work_dt or needs_copy(arr):
        work = arr.astype(work_dt)       # a private copy, clipped in place
        _clip_norm_kernel(work, work, axes, c, nt)
        np.copyto(res, work, casting="unsafe")
        return
    if res.dtype != work_dt or needs_copy(res):
        tmp = np.empty_like(arr)
        _clip_norm_kernel(arr, tmp, axes, c, nt)
        np.copyto(res, tmp, casting="unsafe")
        return
    _clip_norm_kernel(_unalias(arr, res), res, axes, c, nt)


def _clip_norm_kernel(x, o, axes, c, nt):
    """o = x clipped; x, o aligned native float32/float64 of one shape."""
    xv = _arb(x, axes)
    ov = xv if o is x else _arb(o, axes)
    # One pass, slices scaled in cache; float64 takes the norms first (_l2 is
    # range-safe, the fused kernel's float64 sum of squares is not).
    if xv is not None and ov is not None and x.dtype.itemsize <= 4:
        if _flip(xv):
            xv, ov = xv.transpose(2, 1, 0), ov.transpose(2, 1, 0)
        _ew.axis_clip(xv, ov, c, nt)
        return
    # The norms first (run by run), then one scaling pass.
    l2 = _l2(x, axes, nt)
    with np.errstate(all="ignore"):
        f = np.asarray(c / np.maximum(l2, c), x.dtype)   # as cc_norm_scale computes it
    _elementwise(_ew.OP_MUL, [x, f], o, nt)


@tf_aware
def clip_by_norm(t, clip_norm, axes=None, name=None, *, out=None, n_threads=None):
    """Clip t to a maximum L2 norm, as ``tf.clip_by_norm``.

    ``t * clip_norm / max(l2norm(t), clip_norm)``, the norm taken over
    ``axes`` (every slice along them clipped on its own). A negative
    ``clip_norm`` is treated as 0; a zero norm gives zeros (not NaN) when
    clip_norm > 0; NaN in a slice makes the slice NaN. Sums of squares are
    accumulated in float64, so where TensorFlow's float32 (or float16) sums
    overflow clipcore still gives the right answer: the one intended
    difference from TensorFlow.

    Parameters
    ----------
    t : array_like, tensor or IndexedSlices
        Floating-point values (float16, bfloat16, float32, float64).
        IndexedSlices-like objects are clipped on their values.
    clip_norm : float or array_like
        The maximum norm. An array (or tensor) broadcasting to t's shape
        without changing it gives per-element clip norms, as in TF.
    axes : int or list of ints, optional
        Axes to take the norm over (negative counts from the end); None:
        all of them. Empty list: every element is its own slice.
    name : str, optional
        Accepted for TensorFlow compatibility; unused.
    out : ndarray, optional
        Where to write the result (t's shape and dtype); may be t itself.
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    array, tensor or IndexedSlices
        Of t's type and dtype (or ``out``); t is not modified.

    Raises
    ------
    TypeError
        Integer or other non-float t, a non-number clip_norm, non-int axes.
    ValueError
        An axis out of range or repeated, a clip_norm array that does not
        broadcast to t's shape.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> x = np.array([[-3.0, 0.0, 0.0], [4.0, 0.0, 3.0]], np.float32)
    >>> clipcore.clip_by_norm(x, 4.0, axes=1)
    array([[-3. ,  0. ,  0. ],
           [ 3.2,  0. ,  2.4]], dtype=float32)
    """
    nt = as_threads(n_threads)
    arr, wrap, fw = as_tensor_array(t, "t")
    res = _output(out, arr.shape, arr.dtype, fw, arr)
    _clip_by_norm(arr, clip_norm, axes, res, nt)
    return out if out is not None else wrap(res)


def clip_by_norm_(t, clip_norm, axes=None, *, n_threads=None):
    """:func:`clip_by_norm` in place: overwrites t (its values for IndexedSlices) and returns it.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> g = np.array([3.0, 4.0])
    >>> _ = clipcore.clip_by_norm_(g, 1.0)
    >>> g
    array([0.6, 0.8])
    """
    nt = as_threads(n_threads)
    arr = as_writable(t, "t")
    _clip_by_norm(arr, clip_norm, axes, arr, nt)
    return t


@tf_aware
def clip_by_average_norm(t, clip_norm, name=None, *, out=None, n_threads=None):
    """Clip t to a maximum average L2 norm, as TF 1.x's ``tf.clip_by_average_norm``.

    ``t * clip_norm * min(size(t) / l2norm(t), 1 / clip_norm)``: the norm
    divided by the number of elements is at most clip_norm afterwards. As in
    TensorFlow, a negative clip_norm leaves t unchanged and a zero tensor
    with clip_norm 0 gives NaN. (TF accepts float32 only; float64 works here.)

    Parameters
    ----------
    t : array_like or tensor
        Floating-point values.
    clip_norm : float
        A scalar.
    name : str, optional
        Accepted for TensorFlow compatibility; unused.
    out : ndarray, optional
        Where to write the result (t's shape and dtype).
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    array or tensor
        Of t's type and dtype (or ``out``).

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> x = np.array([[-3.0, 0.0, 0.0], [4.0, 0.0, 0.0]], np.float32)
    >>> clipcore.clip_by_average_norm(x, 0.8)       # what TF gives, to the bit
    array([[-2.88     ,  0.       ,  0.       ],
           [ 3.8400002,  0.       ,  0.       ]], dtype=float32)
    """
    nt = as_threads(n_threads)
    arr, wrap, fw = as_tensor_array(t, "t")
    _check_real(arr, "t", floats_only=True)
    c = float(as_scalar(clip_norm, "clip_norm", True))
    res = _output(out, arr.shape, arr.dtype, fw, arr)
    if arr.size:
        x = as_native(arr).astype(_work_dtype(arr.dtype), copy=False)
        l2 = float(_l2(x, tuple(range(arr.ndim)), nt).reshape(()))
        t = arr.dtype.type
        with np.errstate(all="ignore"):
            # TF: t * clip_norm * minimum(rsqrt(l2sum) * float32(size), 1 / clip_norm),
            # in t's dtype and in this order, so that results match TF's.
            c = t(c)
            inv = t(np.float64(1.0) / np.float64(l2))
            m = np.minimum(inv * t(np.float32(arr.size)), t(1.0) / c)
        _elementwise(_ew.OP_MUL, [arr, np.asarray(c, arr.dtype)], res, nt)
        _elementwise(_ew.OP_MUL, [res, np.asarray(m, arr.dtype)], res, nt)
    return out if out is not None else wrap(res)


# ---------------------------------------------------------------- global norm

def _list_arrays(t_list):
    """(arrays, wraps, fw): t_list's entries as ndarrays (None kept), how to give
    each result its entry's type (wraps None: every entry is an ndarray or None),
    and 'tf' or 'torch' when an entry belongs to that framework (TF first)."""
    arrays = list(as_tuple(t_list, "t_list"))
    wraps, fw = None, None
    for i in _global.to_convert(arrays):
        arrays[i], wrap, f = as_tensor_array(arrays[i], f"t_list[{i}]")   # lists: TF's dtypes
        if wraps is None:
            wraps = [None] * len(arrays)
        wraps[i] = wrap
        if f == "tf" or (f == "torch" and fw is None):
            fw = f
    return arrays, wraps, fw


@tf_aware
def global_norm(t_list, name=None, *, norm_type=2.0, n_threads=None):
    """The norm of all elements of all tensors in t_list, as one vector.

    TensorFlow's ``tf.linalg.global_norm`` (``sqrt(sum(l2norm(t)**2))``) and
    the core's p-norms, on the core's deterministic float64 kernels.

    Parameters
    ----------
    t_list : list or tuple
        NumPy arrays, TensorFlow or PyTorch tensors, IndexedSlices (their
        values count), buffers, lists; None entries are skipped. A bare array
        or a string raises TypeError, as in TF.
    name : str, optional
        Accepted for TensorFlow compatibility; unused.
    norm_type : float, default 2.0
        p of the p-norm: 2 (TF's global norm), 1, ``inf`` or any p > 0.
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    float or tf.Tensor
        A Python float (computed in float64: no float32 overflow), except
        when t_list holds TensorFlow tensors: then, as TF returns it, a 0-d
        tensor of the entries' dtype (float32 for an empty list).
        A NaN element makes it NaN, an inf element (and no NaN) inf; an
        empty list gives 0.0.

    Raises
    ------
    TypeError
        t_list not a sequence; an entry that is not floating point.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> clipcore.global_norm([np.array([3.0, 4.0], np.float32), None, np.zeros(2)])
    5.0
    """
    p = as_norm_type(norm_type)
    nt = as_threads(n_threads)
    arrays, _, fw = _list_arrays(t_list)
    value = _global.global_norm(arrays, p, nt)
    if fw == "tf":
        return result_wrap(fw)(np.asarray(_global.norm_dtype(arrays).type(value)))
    return value


@tf_aware
def clip_by_global_norm(t_list, clip_norm, use_norm=None, name=None, *, n_threads=None):
    """Scale every tensor by ``clip_norm / max(global_norm, clip_norm)``, as TensorFlow does.

    ``tf.clip_by_global_norm``: out of place, returning new tensors. The
    scale is computed as TF computes it, ``clip_norm * min(1 / use_norm,
    1 / clip_norm)`` in the norm's dtype, so outputs equal TF's for the same
    norm; a non-finite norm makes every output NaN. The norm itself is
    accumulated in float64 (TF's float32 sum can overflow, clipcore's does
    not). Each output is written in one fused pass (read input, scale, write).
    The in-place form is :func:`clip_by_global_norm_`.

    Parameters
    ----------
    t_list : list or tuple
        NumPy arrays, TensorFlow or PyTorch tensors, IndexedSlices (clipped
        on their values), lists; None entries stay None. Not modified.
    clip_norm : float
        The clipping ratio (a number or a 0-d array or tensor).
    use_norm : scalar, optional
        The global norm to use instead of computing it; honoured as given
        (a negative or zero value gives what TF gives) and returned as given.
    name : str, optional
        Accepted for TensorFlow compatibility; unused.
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    list_clipped : list
        One output per entry, of the entry's type and dtype (None for None).
    global_norm : scalar
        ``use_norm`` if given; else the norm in the entries' dtype: a 0-d
        TensorFlow tensor if t_list holds TF tensors, a 0-d PyTorch tensor
        if it holds torch tensors, else a NumPy scalar.

    Raises
    ------
    TypeError
        t_list not a sequence (a bare array, a string); an entry that is
        not floating point; a clip_norm or use_norm that is not a number.
    ValueError
        A clip_norm or use_norm that is not a scalar.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> grads = [np.array([-2.0, 4.0], np.float32), None, np.array([1.0, -2.0], np.float32)]
    >>> clipped, norm = clipcore.clip_by_global_norm(grads, 4.0)
    >>> norm
    np.float32(5.0)
    >>> clipped
    [array([-1.6,  3.2], dtype=float32), None, array([ 0.8, -1.6], dtype=float32)]
    """
    nt = as_threads(n_threads)
    arrays, wraps, fw = _list_arrays(t_list)
    outs, un = _global.clip_by_global_norm(arrays, clip_norm, use_norm, nt)
    if wraps is not None:
        outs = [out if wrap is None else wrap(out) for out, wrap in zip(outs, wraps)]
    return outs, use_norm if use_norm is not None else result_wrap(fw)(np.asarray(un))


# ----------------------------------------------------------------------- norm

_VECTOR_ORDS = ("euclidean", 1, 2, np.inf)
_MATRIX_ORDS = ("euclidean", "fro", 1, 2, np.inf)


def _is_int(a):
    return isinstance(a, (numbers.Integral, np.integer)) and not isinstance(a, (bool, np.bool_))


def _ord_in(ord, choices):
    """ord in choices, comparing strings with strings and numbers with numbers."""
    if isinstance(ord, str):
        return ord in [c for c in choices if isinstance(c, str)]
    return any(not isinstance(c, str) and c == ord for c in choices)


@tf_aware
def norm(tensor, ord="euclidean", axis=None, keepdims=None, name=None, *, n_threads=None):
    """Vector and matrix norms, as ``tf.norm``.

    Parameters
    ----------
    tensor : array_like or tensor
        Floating-point values.
    ord : {'euclidean', 'fro', 1, 2, inf} or float > 0
        The order: for vectors 'euclidean' (= 2), 1, inf or any p > 0; for
        matrices (``axis`` a pair) 'euclidean'/'fro' (Frobenius), 1 (max
        column sum), 2 (largest singular value) or inf (max row sum).
    axis : None, int or pair of ints
        None: the norm of all elements as one vector. An int: vector norms
        along that axis. A pair: matrix norms over those two axes.
    keepdims : bool, optional
        Keep the reduced axes with length 1.
    name : str, optional
        Accepted for TensorFlow compatibility; unused.
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    scalar, array or tensor
        tensor's dtype; a NumPy scalar for a NumPy input reduced to 0-d.
        Orders 2/'euclidean', 1 and inf (and 'fro', and the matrix 1/inf
        norms) run on clipcore's float64-accumulating kernels; other p and
        the matrix 2-norm are computed by NumPy in float64. As in TF, the
        inf-norm of an empty slice is -inf.

    Raises
    ------
    ValueError
        An unsupported ord or axis, as TensorFlow raises it.
    TypeError
        A non-float tensor.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> x = np.array([[3.0, 4.0], [6.0, 8.0]], np.float32)
    >>> clipcore.norm(x, axis=1)
    array([ 5., 10.], dtype=float32)
    >>> float(clipcore.norm(x, ord=np.inf))
    8.0
    """
    nt = as_threads(n_threads)
    is_matrix = isinstance(axis, (tuple, list)) and len(axis) == 2
    if not (isinstance(ord, str) or isinstance(ord, numbers.Real)):
        raise ValueError(f"'ord' must be a supported vector norm, got {ord!r}")
    if is_matrix:
        if not (_is_int(axis[0]) and _is_int(axis[1])) or axis[0] == axis[1]:
            raise ValueError(f"'axis' must be None, an integer, or a tuple of 2 unique "
                             f"integers, got {axis}")
        if not _ord_in(ord, _MATRIX_ORDS):
            raise ValueError(f"'ord' must be a supported matrix norm in ['euclidean', 'fro', "
                             f"1, 2, inf], got {ord}")
    else:
        if not (axis is None or _is_int(axis)):
            raise ValueError(f"'axis' must be None, an integer, or a tuple of 2 unique "
                             f"integers, got {axis}")
        if not _ord_in(ord, _VECTOR_ORDS) and (isinstance(ord, str) or not ord > 0):
            raise ValueError(f"'ord' must be a supported vector norm, got {ord}")
    arr, wrap, fw = as_tensor_array(tensor, "tensor")
    _check_real(arr, "tensor", floats_only=True)
    x = as_native(arr).astype(_work_dtype(arr.dtype), copy=False)
    if is_matrix:
        a0, a1 = (_axes(a, arr.ndim, "axis")[0] for a in axis)
        if a0 == a1:
            raise ValueError(f"'axis' must name two different axes, got {axis}")
        axes = tuple(sorted((a0, a1)))
        if _ord_in(ord, ("euclidean", "fro")):
            res = _l2(x, axes, nt)
        elif ord == 2:
            res = _spectral_norm(x, a0, a1)
        else:
            first, second = (a0, a1) if ord == 1 else (a1, a0)
            sums = _reduce(x, (first,), _ew.REDUCE_SUMABS, nt)
            res = np.max(sums, axis=second, keepdims=True, initial=-np.inf)
    else:
        axes = _axes(axis, arr.ndim, "axis")
        if _ord_in(ord, ("euclidean", 2)):
            res = _l2(x, axes, nt)
        elif ord == 1:
            res = _reduce(x, axes, _ew.REDUCE_SUMABS, nt)
        elif ord == np.inf:
            res = _reduce(x, axes, _ew.REDUCE_MAXABS, nt)
        else:
            p = float(ord)
            with np.errstate(all="ignore"):
                res = np.sum(np.abs(x.astype(np.float64)) ** p, axis=axes,
                             keepdims=True) ** (1.0 / p)
    if not keepdims:
        res = np.squeeze(res, axis=axes)
    with np.errstate(all="ignore"):
        res = np.asarray(res).astype(arr.dtype)
    return wrap(res)


def _spectral_norm(x, a0, a1):
    """Largest singular value of the matrices over axes (a0, a1), keepdims shape."""
    m = np.moveaxis(x.astype(np.float64), (a0, a1), (-2, -1))
    finite = np.isfinite(m).all(axis=(-2, -1))
    if m.shape[-1] == 0 or m.shape[-2] == 0:
        sv = np.full(m.shape[:-2], -np.inf)
    else:
        sv = np.linalg.svd(np.where(finite[..., None, None], m, 0.0),
                           compute_uv=False).max(axis=-1)
        sv = np.where(finite, sv, np.nan)
    return np.expand_dims(sv, axis=tuple(sorted((a0, a1))))
