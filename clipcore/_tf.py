"""The TF-named ops on symbolic tensors (``tf.function``) and under ``tf.GradientTape``.

The public TF-named functions come here (through ``clipcore._adapt.tf_aware``)
when a TensorFlow object is among their arguments; this module is imported
only then, so ``import clipcore`` never imports TensorFlow.

* **Graph mode** (inside ``tf.function``): the op becomes one
  ``tf.numpy_function(..., stateful=False)`` that runs clipcore's own eager
  function, kernels included, on the arrays TF hands it at run time. Its
  results get the static shapes and dtypes TF's own op gives: TF's op is
  traced once on placeholders of the inputs' static shapes in a scratch graph
  (nothing of it enters the caller's graph), which also raises TF's own
  trace-time errors for bad shapes and dtypes.
* **Off the CPU kernels** (XLA: ``jit_compile=True``, detected from the
  graph's XLA context; a tensor placed on a GPU/TPU): TF's own op, with a
  warning the first time per op, never an error.
* **Gradients** of the ops on a forward path (relu, maximum, minimum,
  clip_by_value, clip_by_norm, norm, global_norm): ``tf.custom_gradient``
  with TF's gradient formulas, written out from TF's definitions (clip_ops.py,
  math_grad.py, nn_grad.py, linalg_ops.norm) in TF ops. Graph mode always has
  them; eager mode records the op on the tapes only while a tape may be
  recording: TF has no public test for that, so TF's internal
  ``record.could_possibly_record`` is used when it exists (else every eager
  call is recorded: correct, but slower), and the op is recorded with TF's
  internal ``record.record_operation`` (what tf.custom_gradient does eagerly,
  without its wrapping; tf.custom_gradient where it is missing).
* **global_norm, clip_by_global_norm in graph mode** of float32 or float64
  tensors are clipcore's own TF ops (clipcore._tf_ops: N tensors in, N out,
  the kernels' bits; global_norm's gradient registered for its op). Where
  those cannot be had, or for other dtypes, they pass the tensors end to
  end (one ConcatV2; a Reshape to a vector only for a tensor that is not one)
  as the numpy_function's one input and get one flat output back (one SplitV;
  a Reshape only where the shape needs it): numpy_function converts every
  input and output on its own, which cost more than the clipping. Besides
  those Reshapes the graph has a fixed number of ops whatever the list's
  length (global_norm's gradient is taken on the flat vector). The core sees
  the same elements in the same order, so its results are bitwise the list's.
  clip_by_global_norm and clip_by_average_norm have no gradient (they clip
  gradients; TF's would flow, clipcore's results are constants to a tape).
"""
import warnings

import numpy as np
import tensorflow as tf

from clipcore import _ops, _tf_ops, kernels
from clipcore._adapt import as_tensor_array
from clipcore._lists import as_norm_type, as_scalar, as_threads, framework

try:       # TF's internal test for "some tape is recording" (no public one)
    from tensorflow.python.eager.record import could_possibly_record as _may_record
except ImportError:           # pragma: no cover - other TF versions
    def _may_record():
        return True
try:       # TF's internal recording of an op with its gradient (tf.custom_gradient's)
    from tensorflow.python.eager.record import record_operation as _record_op
except ImportError:           # pragma: no cover - other TF versions
    _record_op = None
try:       # TF's internal test for an XLA context (jit_compile=True)
    from tensorflow.python.framework import ops as _framework_ops
    from tensorflow.python.ops.control_flow_util import GraphOrParentsInXlaContext as _in_xla

    def _xla():
        return _in_xla(_framework_ops.get_default_graph())
except ImportError:           # pragma: no cover
    def _xla():
        return False

_warned = set()


# ------------------------------------------------------------------ plumbing

def _is_tf(obj):
    return framework(obj) == "tf"


def _no_out(out):
    if out is not None:
        raise TypeError("out: not supported with TensorFlow tensors (they are immutable)")


def _tensor(obj, name):
    """A TF object as a tf.Tensor (variables read), or TypeError naming it."""
    try:
        return tf.convert_to_tensor(obj)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: cannot use this {type(obj).__name__} as a tensor "
                        f"({exc})") from None


def _operand(obj, dtype, name):
    """obj as a tensor of dtype, converted by clipcore's (TF's) rules."""
    if _is_tf(obj):
        t = _tensor(obj, name)
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype.name}, expected {dtype.name} (tensors "
                            f"of different dtypes are not converted)")
        return t
    arr, _, _, rank = _ops._typed(obj, name)
    return tf.constant(_ops._convert(arr, rank, np.dtype(dtype.as_numpy_dtype), name))


def _off_cpu(tensors):
    """Why clipcore's CPU kernels cannot run this step, or None."""
    if not tf.executing_eagerly() and _xla():
        return "XLA (jit_compile=True) cannot compile a Python call"
    for t in tensors:
        dev = t.device or ""
        if dev and ":CPU:" not in dev.upper():
            return f"a tensor is on {dev}"
    return None


def _fallback(op, why, reference, tensors):
    if op not in _warned:
        _warned.add(op)
        warnings.warn(f"clipcore.{op}: {why}; using TensorFlow's own op instead (warned "
                      f"once)", RuntimeWarning, stacklevel=4)
    return reference(*tensors)


def _static_specs(reference, tensors):
    """[(shape, dtype)] of TF's own op's results for inputs of these static shapes."""
    with tf.Graph().as_default():
        phs = [tf.compat.v1.placeholder(t.dtype, t.shape) for t in tensors]
        out = reference(*phs)
    return [(o.shape, o.dtype) for o in tf.nest.flatten(out)]


def _graph_call(eager, specs, tensors):
    """clipcore's eager function as one numpy_function of the graph, results shaped."""
    dtypes = [d for _, d in specs]

    def run(*arrays):
        with kernels.fp_flush(False):    # TF's threads flush subnormals; eager keeps them
            res = eager(*arrays)
            res = res if isinstance(res, (list, tuple)) else [res]
            return [np.asarray(r, dtype=d.as_numpy_dtype) for r, d in zip(res, dtypes)]

    outs = tf.numpy_function(run, list(tensors), dtypes, stateful=False)
    for o, (shape, _) in zip(outs, specs):
        o.set_shape(shape)
    return outs


def _flatten(tensors):
    """The tensors' elements end to end, in order, as one vector (a view for one vector)."""
    parts = [t if t.shape.rank == 1 else tf.reshape(t, [-1]) for t in tensors]
    return parts[0] if len(parts) == 1 else tf.concat(parts, 0)


def _unflatten(flat, tensors):
    """flat (as _flatten made it) cut back into tensors shaped like `tensors`."""
    if len(tensors) == 1:
        parts = [flat]
    else:
        sizes = [t.shape.num_elements() for t in tensors]
        if None in sizes:
            sizes = tf.stack([tf.size(t) for t in tensors])
        parts = tf.split(flat, sizes, 0)
    outs = []
    for p, t in zip(parts, tensors):
        if t.shape.rank != 1:
            p = tf.reshape(p, t.shape if t.shape.is_fully_defined() else tf.shape(t))
        p.set_shape(t.shape)
        outs.append(p)
    return outs


# numpy_function converts each input and each output on its own; the
# concatenation copies every byte. Tensors end to end are cheaper when they
# average less than this (or sizes unknown).
FLAT_MAX_MEAN_BYTES = 128 << 10


def _graph_ops(tensors):
    """clipcore's TF ops (clipcore._tf_ops) when building a graph of tensors they
    take (one dtype, float32 or float64) and they can be had; else None."""
    if (tf.executing_eagerly() or not tensors or len({t.dtype for t in tensors}) != 1
            or tensors[0].dtype not in (tf.float32, tf.float64)):
        return None
    return _tf_ops.load()


def _op_clip_norm(clip_norm, dtype):
    """clip_norm as clipcore's op takes it: a scalar tensor of dtype, converted as
    the eager function converts it; None for a tensor of no real dtype or not
    a scalar (the numpy_function form decides)."""
    if not _is_tf(clip_norm):
        return tf.constant(as_scalar(clip_norm, "clip_norm", True).astype(dtype.as_numpy_dtype))
    if clip_norm.shape.rank != 0 or not (clip_norm.dtype.is_floating or clip_norm.dtype.is_integer
                                         or clip_norm.dtype.is_bool):
        return None
    return tf.cast(clip_norm, dtype)


def _flat_pays(tensors):
    """One dtype, and small tensors on average (or sizes not known statically)."""
    if len({t.dtype for t in tensors}) != 1:
        return False
    sizes = [t.shape.num_elements() for t in tensors]
    if None in sizes:
        return True
    return sum(sizes) * tensors[0].dtype.size <= FLAT_MAX_MEAN_BYTES * len(tensors)


def _run(op, tensors, eager, reference, grad=None, specs=None, single=True, graph=None):
    """The op on tensors: clipcore's kernels (graph or eager), or TF's own op.

    eager(*values) runs clipcore eagerly (values are NumPy arrays in graph
    mode, eager tensors in eager mode); reference(*tensors) is TF's own op;
    grad(tensors, result, upstream) gives TF's gradients of the tensors.
    single: one result (else a list of them). graph(*tensors), if given,
    builds the whole graph-mode op (its gradient included) in place of one
    numpy_function of eager under tf.custom_gradient.
    """
    why = _off_cpu(tensors)
    if why:
        return _fallback(op, why, reference, tensors)
    differentiable = grad is not None and any(t.dtype.is_floating for t in tensors)
    if tf.executing_eagerly() and _record_op is not None:
        res = eager(*tensors)
        if differentiable and _may_record():
            # What tf.custom_gradient does eagerly, without its wrapping (which
            # costs more than the op): record the op with TF's gradient on the tapes
            # (each tape keeps it only if it watches an input).
            outs = [res] if single else list(res)
            for i, o in enumerate(outs):
                if any(o is t for t in tensors):
                    outs[i] = tf.identity(o)
            res = outs[0] if single else outs

            def backward(*dys):
                return list(grad(tensors, res, dys[0] if single else dys))
            _record_op(f"clipcore.{op}", outs, tensors, backward)
        return res
    elif tf.executing_eagerly():
        if not (differentiable and _may_record()):
            return eager(*tensors)
        forward = eager
    elif graph is not None:
        return graph(*tensors)
    else:
        specs = specs if specs is not None else _static_specs(reference, tensors)

        def forward(*ts):
            outs = _graph_call(eager, specs, ts)
            return outs[0] if single else outs
        if not differentiable:
            return forward(*tensors)

    @tf.custom_gradient
    def with_grad(*ts):
        res = forward(*ts)

        def backward(*dys):
            return list(grad(ts, res, dys[0] if single else dys))
        return res, backward
    return with_grad(*tensors)


# ------------------------------------------------------- gradient helpers

def _sum_to(g, x):
    """g summed over the axes broadcasting added to x's shape (TF's rule)."""
    if g.shape.is_fully_defined() and g.shape == x.shape:
        return g
    sx = tf.shape(x)
    rx, _ = tf.raw_ops.BroadcastGradientArgs(s0=sx, s1=tf.shape(g))
    return tf.reshape(tf.reduce_sum(g, rx), sx)


def _minmax_grad(x, y, dz, selector):
    """TF's Maximum/Minimum gradient: ties (selector true) go to x, NaN to y."""
    zeros = tf.zeros_like(dz)
    mask = selector(x, y)
    return _sum_to(tf.where(mask, dz, zeros), x), _sum_to(tf.where(mask, zeros, dz), y)


def _max_grad(a, r, dr, axis):
    """TF's reduce_max gradient (keepdims r, dr): shared between ties."""
    ind = tf.cast(tf.equal(r, a), dr.dtype)
    return ind / tf.reduce_sum(ind, axis, keepdims=True) * dr


# ------------------------------------------------------------- elementwise

def _relu_grad(ts, y, dy):
    return [tf.raw_ops.ReluGrad(gradients=dy, features=y)]


def relu(features, name=None, *, out=None, n_threads=None):
    _no_out(out)
    if isinstance(features, tf.IndexedSlices):
        return tf.IndexedSlices(relu(features.values, n_threads=n_threads),
                                features.indices, features.dense_shape)
    x = _tensor(features, "features")
    return _run("relu", [x], lambda a: _ops.relu.eager(a, n_threads=n_threads),
                tf.nn.relu, _relu_grad)


def _minmax(op, x, y, out, n_threads):
    _no_out(out)
    first = x if _is_tf(x) else y
    dtype = _tensor(first, "x" if first is x else "y").dtype
    xt, yt = _operand(x, dtype, "x"), _operand(y, dtype, "y")
    eager_fn = getattr(_ops, op).eager
    reference = getattr(tf, op)
    selector = tf.greater_equal if op == "maximum" else tf.less_equal
    return _run(op, [xt, yt], lambda a, b: eager_fn(a, b, n_threads=n_threads), reference,
                lambda ts, z, dz: _minmax_grad(ts[0], ts[1], dz, selector))


def maximum(x, y, name=None, *, out=None, n_threads=None):
    return _minmax("maximum", x, y, out, n_threads)


def minimum(x, y, name=None, *, out=None, n_threads=None):
    return _minmax("minimum", x, y, out, n_threads)


def _clip_value_grad(ts, y, dy):
    t, lo, hi = ts
    t_min = tf.minimum(t, hi)                  # TF: maximum(minimum(t, hi), lo)
    d_tmin, d_lo = _minmax_grad(t_min, lo, dy, tf.greater_equal)
    d_t, d_hi = _minmax_grad(t, hi, d_tmin, tf.less_equal)
    return [d_t, d_lo, d_hi]


def clip_by_value(t, clip_value_min, clip_value_max, name=None, *, out=None, n_threads=None):
    _no_out(out)
    if isinstance(t, tf.IndexedSlices):
        return tf.IndexedSlices(clip_by_value(t.values, clip_value_min, clip_value_max,
                                              n_threads=n_threads), t.indices, t.dense_shape)
    x = _tensor(t, "t")
    _ops._check_real(np.zeros(0, x.dtype.as_numpy_dtype), "t")
    lo = _operand(clip_value_min, x.dtype, "clip_value_min")
    hi = _operand(clip_value_max, x.dtype, "clip_value_max")
    return _run("clip_by_value", [x, lo, hi],
                lambda a, b, c: _ops.clip_by_value.eager(a, b, c, n_threads=n_threads),
                tf.clip_by_value, _clip_value_grad)


# ------------------------------------------------------------------- norms

def _static_axes(axes, name):
    if _is_tf(axes):
        value = tf.get_static_value(axes)
        if value is None:
            raise TypeError(f"{name}: must be known when the function is traced, got a "
                            f"tensor whose value depends on the inputs")
        return value.tolist()
    return axes


def _clip_norm_grad(axes, c_tensor, c_value):
    """TF's clip_by_norm gradient, step by step backwards through clip_ops.py."""
    def grad(ts, y, dy):
        v = ts[0]
        if c_tensor:
            c_in = ts[1]
            c = tf.cast(tf.maximum(c_in, 0), v.dtype)
        else:
            c = tf.constant(c_value, v.dtype)
        l2sum = tf.reduce_sum(v * v, axes, keepdims=True)
        pred = l2sum > 0
        safe = tf.where(pred, l2sum, tf.ones_like(l2sum))
        root = tf.sqrt(safe)
        l2norm = tf.where(pred, root, l2sum)
        inter = v * c
        m = tf.maximum(l2norm, c)
        d_inter = dy / m
        d_m = _sum_to(dy * (-inter / m / m), m)
        d_l2norm, d_c_m = _minmax_grad(l2norm, c, d_m, tf.greater_equal)
        zeros = tf.zeros_like(d_l2norm)
        d_root = tf.where(pred, d_l2norm, zeros)
        d_l2sum = tf.where(pred, zeros, d_l2norm)
        d_l2sum += tf.where(pred, d_root * 0.5 / root, zeros)     # SqrtGrad, then where
        d_sq = tf.broadcast_to(d_l2sum, tf.shape(v))
        d_v = d_inter * c + (d_sq * v + d_sq * v)
        if not c_tensor:
            return [d_v]
        d_c = _sum_to(d_inter * v, c) + d_c_m
        d_c = tf.cast(d_c, c_in.dtype)
        return [d_v, _minmax_grad(c_in, tf.zeros((), c_in.dtype), d_c, tf.greater_equal)[0]]
    return grad


def clip_by_norm(t, clip_norm, axes=None, name=None, *, out=None, n_threads=None):
    _no_out(out)
    if isinstance(t, tf.IndexedSlices):
        return tf.IndexedSlices(clip_by_norm(t.values, clip_norm, axes, n_threads=n_threads),
                                t.indices, t.dense_shape)
    x = _tensor(t, "t")
    axes = _static_axes(axes, "axes")
    ax = None if axes is None else list(_ops._axes(axes, x.shape.rank))
    eager_fn = _ops.clip_by_norm.eager
    if _is_tf(clip_norm):
        c = _tensor(clip_norm, "clip_norm")
        return _run("clip_by_norm", [x, c],
                    lambda a, b: eager_fn(a, b, axes, n_threads=n_threads),
                    lambda a, b: tf.clip_by_norm(a, b, axes), _clip_norm_grad(ax, True, None))
    c_value = _ops._clip_norm_value(clip_norm, np.dtype(x.dtype.as_numpy_dtype)) \
        if np.ndim(clip_norm) == 0 else None
    if c_value is None:          # per-element clip norms (an array): constant
        return clip_by_norm(t, _operand(clip_norm, x.dtype, "clip_norm"), axes,
                            n_threads=n_threads)
    return _run("clip_by_norm", [x], lambda a: eager_fn(a, clip_norm, axes, n_threads=n_threads),
                lambda a: tf.clip_by_norm(a, clip_norm, axes), _clip_norm_grad(ax, False, c_value))


def clip_by_average_norm(t, clip_norm, name=None, *, out=None, n_threads=None):
    _no_out(out)
    x = _tensor(t, "t")
    tensors, eager_fn = [x], _ops.clip_by_average_norm.eager
    if _is_tf(clip_norm):
        tensors.append(_tensor(clip_norm, "clip_norm"))
        return _run("clip_by_average_norm", tensors,
                    lambda a, b: eager_fn(a, b, n_threads=n_threads),
                    tf.compat.v1.clip_by_average_norm)
    return _run("clip_by_average_norm", tensors,
                lambda a: eager_fn(a, clip_norm, n_threads=n_threads),
                lambda a: tf.compat.v1.clip_by_average_norm(a, clip_norm))


def _norm_grad(ord, axis, keepdims):
    """TF's gradient of tf.norm (linalg_ops.norm's chain of ops, backwards)."""
    matrix = isinstance(axis, (tuple, list)) and len(axis) == 2
    axes = None if axis is None else (tuple(axis) if matrix else (axis,))

    def grad(ts, r, dr):
        x = ts[0]
        if matrix and ord == 2:     # through the SVD: TF's own gradient of its op
            with tf.GradientTape() as tape:
                tape.watch(x)
                ref = tf.norm(x, ord=ord, axis=axis, keepdims=keepdims)
            return [tape.gradient(ref, x, output_gradients=dr)]
        a = tf.abs(x)
        if ord in ("euclidean", "fro", 2, 2.0):
            rk = tf.sqrt(tf.reduce_sum(x * x, axes, keepdims=True))
        elif ord == 1:
            s = tf.reduce_sum(a, None if axes is None else axes[0], keepdims=True)
            rk = tf.reduce_max(s, axes[-1], keepdims=True) if matrix else s
        elif ord == np.inf:
            s = tf.reduce_sum(a, axes[1], keepdims=True) if matrix else a
            rk = tf.reduce_max(s, None if axes is None else axes[0], keepdims=True)
        else:
            pa = tf.pow(a, ord)
            sp = tf.reduce_sum(pa, axes, keepdims=True)
            rk = tf.pow(sp, 1.0 / ord)
        d = tf.reshape(dr, tf.shape(rk))
        if ord in ("euclidean", "fro", 2, 2.0):
            d_sum = tf.broadcast_to(d * 0.5 / rk, tf.shape(x))      # SqrtGrad
            return [d_sum * x + d_sum * x]                          # x * conj(x)
        if ord == 1:
            if matrix:
                d = _max_grad(s, rk, d, axes[-1])
            d_a = tf.broadcast_to(d, tf.shape(x))
        elif ord == np.inf:
            d_s = _max_grad(s, rk, d, None if axes is None else axes[0])
            d_a = tf.broadcast_to(d_s, tf.shape(x))
        else:
            inv = tf.constant(1.0 / ord, x.dtype)
            d_sp = d * inv * tf.pow(sp, inv - 1)                   # PowGrad
            p = tf.constant(ord, x.dtype)
            d_a = tf.broadcast_to(d_sp, tf.shape(x)) * p * tf.pow(a, p - 1)
        return [tf.sign(x) * d_a]                                   # AbsGrad
    return grad


def norm(tensor, ord="euclidean", axis=None, keepdims=None, name=None, *, n_threads=None):
    x = _tensor(tensor, "tensor")
    eager_fn = _ops.norm.eager
    return _run("norm", [x],
                lambda a: eager_fn(a, ord, axis, keepdims, n_threads=n_threads),
                lambda a: tf.norm(a, ord=ord, axis=axis, keepdims=keepdims),
                _norm_grad(ord, axis, keepdims))


# ------------------------------------------------------------------ global

def _entries(t_list):
    """(tensors, where, rebuild): the entries' (values') tensors and how to put them back."""
    items = list(t_list)
    tensors, where = [], []
    for i, obj in enumerate(items):
        if obj is None:
            continue
        v = obj.values if isinstance(obj, tf.IndexedSlices) else obj
        tensors.append(_tensor(v, f"t_list[{i}]") if _is_tf(v) else _operand_any(v, i))
        where.append(i)

    def rebuild(outs):
        res = [None] * len(items)
        for i, o in zip(where, outs):
            obj = items[i]
            res[i] = (tf.IndexedSlices(o, obj.indices, obj.dense_shape)
                      if isinstance(obj, tf.IndexedSlices) else o)
        return res
    return tensors, rebuild


def _operand_any(v, i):
    arr, _, _ = as_tensor_array(v, f"t_list[{i}]")
    return tf.constant(arr)


def _norm_spec(tensors):
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return dtypes.pop()
    return tf.as_dtype(np.result_type(*[t.dtype.as_numpy_dtype for t in tensors]))


def _global_norm_grad(ts, n, dn):
    d_h = (dn * 0.5 / n) * 2.0          # sqrt(h * 2), h = sum(l2_loss(v))
    return [v * tf.cast(d_h, v.dtype) for v in ts]


def global_norm(t_list, name=None, *, norm_type=2.0, n_threads=None):
    as_norm_type(norm_type)                                # the core's check, first
    tensors, _ = _entries(t_list)
    if not tensors:
        return tf.constant(0.0)
    eager_fn = _ops.global_norm.eager
    dtype = _norm_spec(tensors)

    def eager(*vals):
        value = eager_fn(list(vals), norm_type=norm_type, n_threads=n_threads)
        if tf.executing_eagerly() and isinstance(value, tf.Tensor):
            return value
        return np.asarray(value, dtype.as_numpy_dtype)
    if norm_type == 2.0:
        grad, reference = _global_norm_grad, lambda *ts: tf.linalg.global_norm(list(ts))
    else:
        grad = None

        def reference(*ts):
            flat = tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in ts], 0)
            return tf.norm(flat, ord=norm_type)
    graph = None
    ops = _graph_ops(tensors)
    if ops is not None:
        # clipcore's op: the tensors in, the norm out; its gradient is registered.
        p, nt = tf.constant(as_norm_type(norm_type), tf.float64), as_threads(n_threads)

        def graph(*ts):
            n = ops.clipcore_global_norm(list(ts), p, n_threads=nt)
            return n if grad is not None else tf.stop_gradient(n)
    elif _flat_pays(tensors):
        # One input (the tensors end to end), one scalar output: numpy_function's
        # per-tensor conversions cost more than the norm. Same elements in the
        # same order: the core's chunks and so its bits are the list's. The
        # gradient is taken on the flat vector (Concat's gradient cuts it back),
        # so the graph holds no per-tensor op for it.
        def norm_of(flat):
            return _graph_call(eager, [(tf.TensorShape([]), dtype)], [flat])[0]

        @tf.custom_gradient
        def norm_with_grad(flat):
            n = norm_of(flat)
            return n, lambda dn: grad([flat], n, dn)[0]

        def graph(*ts):
            return (norm_with_grad if grad is not None else norm_of)(_flatten(ts))
    return _run("global_norm", tensors, eager, reference, grad,
                specs=[(tf.TensorShape([]), dtype)], graph=graph)


def clip_by_global_norm(t_list, clip_norm, use_norm=None, name=None, *, n_threads=None):
    items = t_list
    tensors, rebuild = _entries(items)
    n = len(tensors)
    extra, names = [], []
    for value, nm in ((clip_norm, "clip_norm"), (use_norm, "use_norm")):
        if value is not None and _is_tf(value):
            extra.append(_tensor(value, nm))
            names.append(nm)
    if not tensors and not extra:
        return _ops.clip_by_global_norm.eager(items, clip_norm, use_norm,
                                                    n_threads=n_threads)
    eager_fn = _ops.clip_by_global_norm.eager

    def args(vals):
        kw = {"clip_norm": clip_norm, "use_norm": use_norm}
        kw.update(zip(names, vals[n:]))
        return list(vals[:n]), kw

    def eager(*vals):
        lst, kw = args(vals)
        outs, norm_ = eager_fn(lst, kw["clip_norm"], kw["use_norm"], n_threads=n_threads)
        if use_norm is not None:
            return outs
        return list(outs) + [norm_]

    def eager_flat(flat, *ex):
        kw = {"clip_norm": clip_norm, "use_norm": use_norm}
        kw.update(zip(names, ex))
        outs, norm_ = eager_fn([flat], kw["clip_norm"], kw["use_norm"], n_threads=n_threads)
        return [outs[0]] if use_norm is not None else [outs[0], norm_]

    def reference(*vals):
        lst, kw = args(vals)
        outs, norm_ = tf.clip_by_global_norm(lst, kw["clip_norm"], kw["use_norm"])
        return list(outs) if use_norm is not None else list(outs) + [norm_]

    graph = None
    ops = _graph_ops(tensors) if use_norm is None else None
    c = ops and _op_clip_norm(dict(zip(names, extra)).get("clip_norm", clip_norm),
                              tensors[0].dtype)
    if c is not None:
        # clipcore's op: each output is its input (nothing to clip), the input
        # scaled in place (nothing else holds it) or a new tensor.
        nt = as_threads(n_threads)

        def graph(*vals):
            outs, norm_ = ops.clipcore_clip_by_global_norm(list(vals[:n]), c, n_threads=nt)
            return list(outs) + [norm_]
    elif tensors and _flat_pays(tensors):
        # One flat input and one flat output, cut back with Split and Reshape
        # (metadata): numpy_function converts each input and output on its own.
        # No tf.custom_gradient around it (no gradient): its IdentityN and
        # Identity ops would be per tensor.
        def graph(*vals):
            flat = _flatten(vals[:n])
            fspecs = [(flat.shape, flat.dtype)]
            if use_norm is None:
                fspecs.append((tf.TensorShape([]), tensors[0].dtype))
            res = _graph_call(eager_flat, fspecs, [flat] + list(vals[n:]))
            return _unflatten(res[0], vals[:n]) + list(res[1:])

    specs = [(t.shape, t.dtype) for t in tensors]
    if use_norm is None:
        specs.append((tf.TensorShape([]), _norm_spec(tensors) if tensors else tf.float32))
    res = _run("clip_by_global_norm", tensors + extra, eager, reference, specs=specs,
               single=False, graph=graph)
    res = list(res)
    norm_out = use_norm if use_norm is not None else res[n]
    return rebuild(res[:n]), norm_out


OPS = {f.__name__: f for f in (relu, maximum, minimum, clip_by_value, clip_by_norm,
                               clip_by_average_norm, norm, global_norm, clip_by_global_norm)}


# The ops whose results a tape differentiates (eager mode needs the wrapper).
_DIFFERENTIABLE = {"relu", "maximum", "minimum", "clip_by_value", "clip_by_norm", "norm",
                   "global_norm"}
_ACCELERATORS = bool(tf.config.list_logical_devices("GPU") or
                     tf.config.list_logical_devices("TPU"))


def call(name, fn, args, kwargs):
    """The public function `name` (eager body fn) on arguments holding TF objects."""
    if (tf.executing_eagerly() and not _ACCELERATORS
            and (name not in _DIFFERENTIABLE or not _may_record())):
        return fn(*args, **kwargs)          # eager, CPU, nothing to differentiate
    if name in ("global_norm", "clip_by_global_norm") and (
            type(args[0] if args else kwargs.get("t_list")) not in (list, tuple)):
        return fn(*args, **kwargs)          # the core raises TF's TypeError
    return OPS[name](*args, **kwargs)
