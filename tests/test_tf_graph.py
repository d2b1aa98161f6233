"""clipcore's TF-named ops inside tf.function and under tf.GradientTape, against TF itself.

Graph-mode results against TF's own ops run eagerly (on the cases of
test_tf_semantics.py plus a sweep drawn with test_tf_sweep.py's generator),
static shapes and dtypes against TF's own op traced on the same signature,
gradients against TF's (eager and graph, ties and zero norms included), the
XLA fallback, Keras's fit with clipcore's clipping, and TF's dtype rule for
Python lists. The global ops in each of graph mode's forms: clipcore's TF ops
(in place only where nothing else holds a tensor; without a compiler, one
warning and the numpy_function form) and the numpy_function forms.
"""
import collections
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

tf = pytest.importorskip("tensorflow")

import clipcore  # noqa: E402
from clipcore import _tf, _tf_ops  # noqa: E402


def _sibling(name):
    """A test module beside this one (pytest runs with --import-mode=importlib)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location(f"_clipcore_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_sem, _sweep = _sibling("test_tf_semantics"), _sibling("test_tf_sweep")
X_NORM, X_NORM_AXES = _sem.X_NORM, _sem.X_NORM_AXES          # their cases, reused
FLOATS, INTS, values, random_axes = _sweep.FLOATS, _sweep.INTS, _sweep.values, _sweep.random_axes

pytestmark = pytest.mark.requires_tf


def f64(x):
    if isinstance(x, tf.Tensor):
        x = x.numpy()
    return np.asarray(x).astype(np.float64)


def flat(res):
    """The tensors of a result: IndexedSlices as their values, None left out."""
    out = []
    for r in tf.nest.flatten(res, expand_composites=False):
        if isinstance(r, tf.IndexedSlices):
            r = r.values
        if r is not None:
            out.append(r)
    return out


def check(cc, ref, exact):
    cc, ref = flat(cc), flat(ref)
    assert len(cc) == len(ref)
    for c, r in zip(cc, ref):
        assert isinstance(c, tf.Tensor) and c.dtype == r.dtype and c.shape == r.shape
        if exact:
            np.testing.assert_array_equal(f64(c), f64(r))
        else:
            rtol = 3e-2 if r.dtype in (tf.float16, tf.bfloat16) else 2e-6
            np.testing.assert_allclose(f64(c), f64(r), rtol=rtol, atol=rtol * 1e-3)


def static(fn, args):
    """(shape, dtype) of fn's results traced on args' static shapes."""
    conc = tf.function(fn).get_concrete_function(
        *[tf.TensorSpec(a.shape, a.dtype) for a in args])
    return [(t.shape.as_list(), t.dtype) for t in flat(conc.structured_outputs)]


def _c(values_, shape=None, dtype=tf.float32):
    return tf.constant(values_, dtype=dtype, shape=shape)


_x = _c(X_NORM_AXES, [2, 3])
_slices = tf.IndexedSlices(_c([[1.0, -2.0, 0.0]]), tf.constant([1]), tf.constant([4, 3]))
# (id, call(module, *tensors), tensors, exact): the cases of test_tf_semantics.py.
CASES = [
    ("relu", lambda m, x: getattr(m, "nn", m).relu(x), [_x], True),
    ("relu-int", lambda m, x: getattr(m, "nn", m).relu(x), [_c([-1, 2], dtype=tf.int32)], True),
    ("maximum", lambda m, x, y: m.maximum(x, y), [_x, _c([[0.0], [3.5]])], True),
    ("maximum-scalar", lambda m, x: m.maximum(x, 0.5), [_x], True),
    ("minimum-first-scalar", lambda m, x: m.minimum(2.0, x), [_x], True),
    ("minimum-nan", lambda m, x: m.minimum(x, 1.0), [_c([np.nan, np.inf, -1.0])], True),
    ("clip_by_value", lambda m, x: m.clip_by_value(x, -4.4, 4.4),
     [_c([-5.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3])], True),
    ("clip_by_value-tensors", lambda m, x, lo, hi: m.clip_by_value(x, lo, hi),
     [_c([1, 2, 3, 4, 5, 6], [2, 3], tf.int32), _c([2, 2, 2, 5, 5, 5], [2, 3], tf.int32),
      _c([5, 5, 5, 7, 7, 7], [2, 3], tf.int32)], True),
    ("clip_by_value-f16", lambda m, x: m.clip_by_value(x, 2, 4),
     [_c([1, 2, 3, 4, 5, 6], [2, 3], tf.float16)], True),
    ("clip_by_value-bf16", lambda m, x: m.clip_by_value(x, 2.0, 4.0),
     [_c([1, 2, 3, 4, 5, 6], [2, 3], tf.bfloat16)], True),
    ("clip_by_value-nonfinite", lambda m, x: m.clip_by_value(x, -4.0, 4.0),
     [_c([np.nan, np.inf, -np.inf])], True),
    ("clip_by_value-empty", lambda m, x: m.clip_by_value(x, 1.0, 1.0), [_c([], [7, 0])], True),
    ("clip_by_value-slices", lambda m, s: m.clip_by_value(s, -1.0, 1.0), [_slices], True),
    ("clip_by_norm", lambda m, x: m.clip_by_norm(x, 4.0), [_c(X_NORM, [2, 3])], False),
    ("clip_by_norm-not", lambda m, x: m.clip_by_norm(x, 6.0), [_c(X_NORM, [2, 3])], False),
    ("clip_by_norm-zero", lambda m, x: m.clip_by_norm(x, 6.0), [_c([0.0] * 6, [2, 3])], False),
    ("clip_by_norm-dim0", lambda m, x: m.clip_by_norm(x, 4.0, [0]), [_x], False),
    ("clip_by_norm-dim1", lambda m, x: m.clip_by_norm(x, 4.0, [1]), [_x], False),
    ("clip_by_norm-tensor", lambda m, x, c: m.clip_by_norm(x, c, [1]), [_x, _c(4.0)], False),
    ("clip_by_norm-f64", lambda m, x: m.clip_by_norm(x, 1.0, -1),
     [_c(X_NORM_AXES, [2, 3], tf.float64)], False),
    ("clip_by_average_norm",
     lambda m, x: (m.compat.v1 if m is tf else m).clip_by_average_norm(x, 0.8),
     [_c(X_NORM, [2, 3])], False),
    ("norm", lambda m, x: m.norm(x), [_x], False),
    ("norm-axis", lambda m, x: m.norm(x, axis=1, keepdims=True), [_x], False),
    ("norm-1", lambda m, x: m.norm(x, ord=1, axis=0), [_x], False),
    ("norm-inf", lambda m, x: m.norm(x, ord=np.inf), [_x], False),
    ("norm-p3", lambda m, x: m.norm(x, ord=3.0, axis=-1), [_x], False),
    ("norm-fro", lambda m, x: m.norm(x, ord="fro", axis=(0, 1)), [_x], False),
    ("norm-matrix-1", lambda m, x: m.norm(x, ord=1, axis=(0, 1)), [_x], False),
    ("norm-matrix-2", lambda m, x: m.norm(x, ord=2, axis=(1, 0)), [_x], False),
    ("global_norm", lambda m, x, y: getattr(m, "linalg", m).global_norm([x, None, y]),
     [_x, _c([1.0, -2.0])], False),
    ("clip_by_global_norm", lambda m, x, y: m.clip_by_global_norm([x, None, y], 4.0),
     [_c([-2.0, 0.0, 0.0, 4.0, 0.0, 0.0], [2, 3]), _c([1.0, -2.0])], False),
    ("clip_by_global_norm-slices", lambda m, x, s: m.clip_by_global_norm([x, s], 1.0),
     [_x, _slices], False),
    ("clip_by_global_norm-use_norm", lambda m, x, u: m.clip_by_global_norm([x], 2.0, u)[0],
     [_x, _c(8.0)], True),
    ("clip_by_global_norm-inf", lambda m, x: m.clip_by_global_norm([x], 6.0),
     [_c([-2.0, np.inf, 1.0])], True),
]


@pytest.mark.parametrize("name,call,args,exact", CASES, ids=[c[0] for c in CASES])
def test_graph_mode_matches_tensorflow(name, call, args, exact):
    ref = call(tf, *args)                              # TF's own op, eagerly
    got = tf.function(lambda *a: call(clipcore, *a))(*args)
    check(got, ref, exact)
    dense = [a for a in args if isinstance(a, tf.Tensor)]
    if len(dense) == len(args):        # static shapes and dtypes, also of unknown dims
        assert static(lambda *a: call(clipcore, *a), args) == static(
            lambda *a: call(tf, *a), args)
        loose = [tf.TensorSpec([None] * a.shape.rank, a.dtype) for a in args]
        cc = tf.function(lambda *a: call(clipcore, *a)).get_concrete_function(*loose)
        # clipcore's kernels run in the graph (its op or a numpy_function), not TF's op
        types = {op.type for op in cc.graph.get_operations()}
        assert "PyFuncStateless" in types or any(t.startswith("Clipcore") for t in types)
        tfc = tf.function(lambda *a: call(tf, *a)).get_concrete_function(*loose)
        assert ([t.shape.as_list() for t in flat(cc.structured_outputs)]
                == [t.shape.as_list() for t in flat(tfc.structured_outputs)])


@pytest.mark.parametrize("seed", range(24))
def test_graph_mode_sweep(seed):
    rng = np.random.default_rng(5000 + seed)
    op = ["relu", "maximum", "clip_by_value", "clip_by_norm", "norm", "global_norm"][seed % 6]
    dtype = (FLOATS + INTS)[seed % 12] if op in ("relu", "maximum", "clip_by_value") \
        else FLOATS[seed % 4]
    shape = [(), (5,), (3, 4), (2, 3, 4), (0, 3), (300, 70)][int(rng.integers(6))]
    x = tf.constant(values(rng, shape, dtype))
    y = tf.constant(values(rng, shape[-1:], dtype))
    axes = random_axes(rng, len(shape))
    calls = {
        "relu": lambda m, a, b: getattr(m, "nn", m).relu(a),
        "maximum": lambda m, a, b: m.maximum(a, b),
        "clip_by_value": lambda m, a, b: m.clip_by_value(a, b, 50 if dtype.kind in "iu"
                                                         else 1.5),
        "clip_by_norm": lambda m, a, b: m.clip_by_norm(a, 2.0, axes),
        "norm": lambda m, a, b: m.norm(a, axis=None if not shape else -1),
        "global_norm": lambda m, a, b: getattr(m, "linalg", m).global_norm([a, b]),
    }
    ref = calls[op](tf, x, y)
    got = tf.function(lambda a, b: calls[op](clipcore, a, b))(x, y)
    check(got, ref, exact=op in ("relu", "maximum", "clip_by_value"))


def test_graph_errors_at_trace_time():
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        tf.function(lambda x: clipcore.maximum(x, tf.ones(4)))(tf.ones(3))
    with pytest.raises(TypeError, match="clip_value_min"):
        tf.function(lambda x: clipcore.clip_by_value(x, 0.5, 4))(tf.constant([1, 2]))
    with pytest.raises(TypeError, match="out"):
        tf.function(lambda x: clipcore.relu(x, out=np.zeros(3, np.float32)))(tf.ones(3))


# ---------------------------------------------------------------- gradients

_ties = _c([[-1.0, 0.0, 2.0], [4.0, -4.0, 0.5]])
GRAD_CASES = [
    # (id, call(module, *tensors), tensors): ties at bounds, zero norms, NaN.
    ("relu", lambda m, x: getattr(m, "nn", m).relu(x), [_c([-1.0, 0.0, 2.0, np.nan])]),
    ("maximum-ties", lambda m, x, y: m.maximum(x, y),
     [_c([1.0, 2.0, 3.0, np.nan]), _c([1.0, 5.0, 0.0, 1.0])]),
    ("minimum-ties", lambda m, x, y: m.minimum(x, y),
     [_c([1.0, 2.0, 3.0, 0.0]), _c([1.0, 5.0, 0.0, np.nan])]),
    ("maximum-broadcast", lambda m, x, y: m.maximum(x, y), [_ties, _c([[0.0], [0.5]])]),
    ("minimum-scalar", lambda m, x: m.minimum(x, 0.5), [_ties]),
    ("clip_by_value-at-bounds", lambda m, x: m.clip_by_value(x, -1.0, 2.0), [_ties]),
    ("clip_by_value-tensor-bounds", lambda m, x, lo, hi: m.clip_by_value(x, lo, hi),
     [_ties, _c(-1.0), _c([[0.0], [4.0]])]),
    ("clip_by_value-min>max", lambda m, x: m.clip_by_value(x, 1.0, 0.0), [_ties]),
    ("clip_by_norm", lambda m, x: m.clip_by_norm(x, 4.0), [_ties]),
    ("clip_by_norm-axes", lambda m, x: m.clip_by_norm(x, 3.0, [1]), [_ties]),
    ("clip_by_norm-at-norm", lambda m, x: m.clip_by_norm(x, 5.0), [_c([3.0, 4.0])]),
    ("clip_by_norm-zero", lambda m, x: m.clip_by_norm(x, 1.0, 0), [_c([[0.0, 1.0], [0.0, 2.0]])]),
    ("clip_by_norm-zero-clip", lambda m, x: m.clip_by_norm(x, 0.0), [_c([3.0, 4.0])]),
    ("clip_by_norm-tensor-clip", lambda m, x, c: m.clip_by_norm(x, c, [1]), [_ties, _c(2.0)]),
    ("clip_by_norm-negative-clip", lambda m, x, c: m.clip_by_norm(x, c), [_ties, _c(-1.0)]),
    ("norm", lambda m, x: m.norm(x), [_ties]),
    ("norm-zero", lambda m, x: m.norm(x, axis=0), [_c([[0.0, 1.0], [0.0, 2.0]])]),
    ("norm-1", lambda m, x: m.norm(x, ord=1, axis=1), [_ties]),
    ("norm-inf-ties", lambda m, x: m.norm(x, ord=np.inf, axis=1, keepdims=True), [_ties]),
    ("norm-p3", lambda m, x: m.norm(x, ord=3, axis=0), [_ties]),
    ("norm-p0.5", lambda m, x: m.norm(x, ord=0.5), [_c([1.0, -2.0, 3.0])]),
    ("norm-fro", lambda m, x: m.norm(x, ord="fro", axis=(0, 1)), [_ties]),
    ("norm-matrix-1", lambda m, x: m.norm(x, ord=1, axis=(0, 1)), [_ties]),
    ("norm-matrix-inf", lambda m, x: m.norm(x, ord=np.inf, axis=(1, 0)), [_ties]),
    ("norm-matrix-2", lambda m, x: m.norm(x, ord=2, axis=(0, 1)), [_ties]),
    ("global_norm", lambda m, x, y: getattr(m, "linalg", m).global_norm([x, None, y]),
     [_ties, _c([0.0, 3.0])]),
    ("global_norm-zero", lambda m, x: getattr(m, "linalg", m).global_norm([x]), [_c([0.0, 0.0])]),
]


def _grads(call, module, args, weights):
    with tf.GradientTape() as tape:
        tape.watch(args)
        y = call(module, *args)
        loss = tf.reduce_sum(y * weights) if y.shape.rank else y * 3.0
    return tape.gradient(loss, args)


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("name,call,args", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_match_tensorflow(name, call, args, mode):
    out = call(tf, *args)
    weights = tf.reshape(tf.range(1.0, 1.0 + tf.cast(tf.size(out), tf.float32)), tf.shape(out))
    ref = _grads(call, tf, args, weights)
    fn = _grads if mode == "eager" else tf.function(_grads, reduce_retracing=True)
    got = fn(call, clipcore, args, weights)
    for g, r in zip(got, ref):
        assert (g is None) == (r is None)
        if r is not None:
            assert g.dtype == r.dtype and g.shape == r.shape
            np.testing.assert_allclose(f64(g), f64(r), rtol=2e-6, atol=1e-6, equal_nan=True)


def test_training_step_in_tf_function():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(16, 8)), tf.float32)

    def run(m):
        w1 = tf.Variable(rng_w.normal(size=(8, 6)).astype(np.float32))
        w2 = tf.Variable(rng_w.normal(size=(6, 1)).astype(np.float32))

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                h = getattr(m, "nn", m).relu(x @ w1)
                h = m.clip_by_value(h, 0.0, 2.0)
                loss = tf.reduce_mean(m.maximum(h @ w2, -0.5) ** 2) + 0.1 * m.norm(w1)
            grads = tape.gradient(loss, [w1, w2])
            grads, _ = m.clip_by_global_norm(grads, 1.0)
            for v, g in zip([w1, w2], grads):
                v.assign_sub(0.1 * g)
            return loss
        for _ in range(5):
            step()
        return w1.numpy(), w2.numpy()

    rng_w = np.random.default_rng(1)
    ref = run(tf)
    rng_w = np.random.default_rng(1)
    got = run(clipcore)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def _ragged_list(dtype):
    rng = np.random.default_rng(11)
    shapes = [(300, 701), (), (0, 3), (5,), (129, 3, 67), (70001,), (1,)]
    return [tf.constant(rng.normal(size=s).astype(dtype) * 3) for s in shapes]


def tf_ops():
    """clipcore's TF ops; a skip where they cannot be built (a failure in CI)."""
    ops = _tf_ops.load()
    if ops is None:
        if os.environ.get("CLIPCORE_REQUIRE_TEST_DEPS") == "1":
            pytest.fail("clipcore's TF ops could not be built, and CLIPCORE_REQUIRE_TEST_DEPS=1")
        pytest.skip("clipcore's TF ops could not be built here (no C++ compiler?)")
    return ops


# The three forms graph mode can take for the global ops: clipcore's TF ops
# (clipcore._tf_ops), and where they cannot be had a numpy_function of the
# tensors end to end or of each tensor.
FORMS = ["op", "end-to-end", "one-by-one"]


def use_form(form, monkeypatch):
    if form == "op":
        tf_ops()
        return
    monkeypatch.setattr(_tf_ops, "_ops", False)          # as if they could not be built
    monkeypatch.setattr(_tf, "FLAT_MAX_MEAN_BYTES", 1 << 40 if form == "end-to-end" else 0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_graph_global_ops_bitwise_equal_eager(dtype, form, monkeypatch):
    # The op and the end-to-end buffer give the core the same elements in the
    # same order as the list: the same chunks and the same bits.
    use_form(form, monkeypatch)
    ts = _ragged_list(dtype)
    arrays = [t.numpy() for t in ts]
    ref_outs, ref_norm = clipcore.clip_by_global_norm(arrays, 1.0)
    ref_gn = clipcore.global_norm(arrays)
    got_outs, got_norm = tf.function(lambda l: clipcore.clip_by_global_norm(l, 1.0))(ts)
    assert got_norm.numpy().tobytes() == np.asarray(ref_norm).tobytes()
    for g, r, t in zip(got_outs, ref_outs, ts):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert g.numpy().tobytes() == r.tobytes()
    gn = tf.function(lambda l: clipcore.global_norm(l))(ts)
    assert gn.numpy() == dtype(ref_gn)
    # unknown dimensions and ranks: shapes come back from the tensors at run time
    loose = [tf.TensorSpec([None] * t.shape.rank, t.dtype) for t in ts[:-1]] + [
        tf.TensorSpec(None, ts[-1].dtype)]
    fn = tf.function(lambda *l: clipcore.clip_by_global_norm(list(l), 1.0),
                     input_signature=loose)
    got_outs, got_norm = fn(*ts)
    assert got_norm.numpy() == ref_norm
    for g, r in zip(got_outs, ref_outs):
        assert g.shape == r.shape and g.numpy().tobytes() == r.tobytes()
    for p in (1.0, np.inf, 3.0):
        got = tf.function(lambda l: clipcore.global_norm(l, norm_type=p))(ts)
        assert got.numpy() == dtype(clipcore.global_norm(arrays, norm_type=p))


@pytest.mark.parametrize("form", FORMS)
def test_graph_global_clip_keeps_subnormals_as_eager_does(form, monkeypatch):
    # TF runs its kernels, numpy_function's too, flushing subnormals to zero:
    # a subnormal factor (1e-3 / 3e38) would make the output 0.
    use_form(form, monkeypatch)
    ts = [tf.constant([3e38, -1e38], tf.float32), tf.constant([2e-45, 1.0], tf.float32)]
    ref_outs, _ = clipcore.clip_by_global_norm([t.numpy() for t in ts], 1e-3)
    assert ref_outs[0][0] > 9e-4
    got_outs, _ = tf.function(lambda l: clipcore.clip_by_global_norm(l, 1e-3))(ts)
    for g, r in zip(got_outs, ref_outs):
        assert g.numpy().tobytes() == r.tobytes()


def test_graph_op_scales_in_place_only_what_nothing_else_holds():
    # Tensors made inside the function are scaled in their own memory; the
    # captured ones, a variable's value and a tensor given twice are not
    # written: each output is right and every input keeps its values.
    tf_ops()
    rng = np.random.default_rng(5)
    a = tf.constant(rng.normal(size=(40, 30)).astype(np.float32))
    b = tf.constant(rng.normal(size=70001).astype(np.float32))
    v = tf.Variable(rng.normal(size=33).astype(np.float32))
    kept = [a.numpy().copy(), b.numpy().copy(), v.numpy().copy()]

    @tf.function
    def f(c):
        made = a * 3.0
        return clipcore.clip_by_global_norm([made, b, v.read_value(), made, b * 1.0, c], c)

    c = tf.constant(0.5)
    outs, norm = f(c)
    parts = [kept[0] * np.float32(3), kept[1], kept[2], kept[0] * np.float32(3),
             kept[1] * np.float32(1), np.float32(0.5)]
    ref_outs, ref_norm = clipcore.clip_by_global_norm(parts, 0.5)
    assert norm.numpy() == ref_norm
    for g, r in zip(outs, ref_outs):
        assert g.numpy().tobytes() == np.asarray(r).tobytes()
    for now, before in zip([a, b, v], kept):
        assert now.numpy().tobytes() == before.tobytes()
    # nothing to clip: the outputs are the inputs (bit for bit, -0.0 included)
    z = tf.constant([-0.0, 1.0, -2.0])
    same, n = tf.function(lambda: clipcore.clip_by_global_norm([z, a], 1e30))()
    assert same[0].numpy().tobytes() == z.numpy().tobytes()
    assert same[1].numpy().tobytes() == a.numpy().tobytes()
    # a non-finite norm makes every element NaN (TensorFlow's rule)
    bad, n = tf.function(lambda: clipcore.clip_by_global_norm([z, tf.constant([np.inf])], 1.0))()
    assert n.numpy() == np.inf and all(np.isnan(t.numpy()).all() for t in bad)


def test_graph_op_chain_takes_over_only_the_outputs_nothing_else_holds():
    # A clip of a clip's outputs: the first clips captured tensors (not its
    # to take over), so its small outputs share one allocation, each its own
    # buffer, which the second clip may scale in place. An output the function
    # also returns keeps the first clip's values, the others get the second's;
    # and an output kept alone stays valid after the rest are freed.
    tf_ops()
    rng = np.random.default_rng(11)
    arrays = [rng.normal(size=s).astype(np.float32) for s in [(600,), (3, 5), (70001,), (9,)]]
    ts = [tf.constant(a) for a in arrays]

    @tf.function
    def chain():
        first, n1 = clipcore.clip_by_global_norm(ts, 1.0)
        second, n2 = clipcore.clip_by_global_norm(first, 0.5)
        return first[1], second, n1, n2

    kept_first, second, n1, n2 = chain()
    ref_first, ref_n1 = clipcore.clip_by_global_norm(arrays, 1.0)
    ref_second, ref_n2 = clipcore.clip_by_global_norm(ref_first, 0.5)
    assert n1.numpy() == ref_n1 and n2.numpy() == ref_n2
    assert kept_first.numpy().tobytes() == ref_first[1].tobytes()
    for g, r in zip(second, ref_second):
        assert g.numpy().tobytes() == r.tobytes()
    alone = tf.function(lambda: clipcore.clip_by_global_norm(ts, 1.0)[0][3])()
    for _ in range(3):
        chain()                   # reuses the memory of whatever was freed
    assert alone.numpy().tobytes() == ref_first[3].tobytes()


_SPECIAL = [0.0, -0.0, 1e-45, 3e38, -3e38, np.inf, -np.inf, np.nan]


@settings(deadline=None)
@given(dtype=st.sampled_from([np.float32, np.float64]),
       shapes=st.lists(st.sampled_from([(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (600,),
                                        (65536,)]),
                       min_size=1, max_size=6),
       special=st.lists(st.sampled_from(_SPECIAL), max_size=3),
       clip=st.sampled_from([0.0, 1e-3, 1.0, 1e30, np.inf, -1.0, np.nan]),
       seed=st.integers(0, 2 ** 16))
def test_fuzz_graph_op_equals_eager_and_keeps_its_inputs(dtype, shapes, special, clip, seed):
    # The op against the eager function, bit for bit, on lists with zeros,
    # subnormals, huge values, infinities and NaNs, for any clip_norm; a
    # tensor made in the function (scaled in place) and captured ones (not).
    tf_ops()
    rng = np.random.default_rng(seed)
    arrays = [(rng.standard_normal(s) * 10.0 ** rng.integers(-3, 4)).astype(dtype)
              for s in shapes]
    for value in special:
        a = arrays[int(rng.integers(len(arrays)))]
        if a.size:
            a.flat[int(rng.integers(a.size))] = value
    kept = [a.copy() for a in arrays]
    ts = [tf.constant(a) for a in arrays]
    fn = tf.function(lambda: clipcore.clip_by_global_norm([ts[0] * 1.0] + ts[1:], clip))
    outs, norm = fn()
    ref_outs, ref_norm = clipcore.clip_by_global_norm(arrays, clip)
    assert np.asarray(norm).tobytes() == np.asarray(ref_norm).tobytes()
    for g, r in zip(outs, ref_outs):
        # the same bits, but of a NaN only NaN-ness: a NaN factor's sign comes
        # from the order NumPy and the compiler add two NaNs in
        g, nan = g.numpy(), np.isnan(r)
        assert (np.isnan(g) == nan).all() and g[~nan].tobytes() == r[~nan].tobytes()
    for t, a, k in zip(ts, arrays, kept):
        assert t.numpy().tobytes() == k.tobytes() == a.tobytes()
    gn = tf.function(lambda: clipcore.global_norm(ts))()
    assert np.asarray(gn).tobytes() == dtype(clipcore.global_norm(arrays)).tobytes()


def test_graph_op_takes_clip_norm_as_the_eager_function_does():
    tf_ops()
    ts = [tf.constant(np.arange(1.0, 7.0, dtype=np.float32)), tf.constant([3.0, -4.0])]
    arrays = [t.numpy() for t in ts]
    for clip in (tf.constant(2.5, tf.float64), tf.constant(3, tf.int32), 2.5, 3,
                 np.float64(1e-3), tf.constant(-1.0)):
        fn = tf.function(lambda l, c=clip: clipcore.clip_by_global_norm(l, c))
        outs, norm = fn(ts)
        ops = {op.type for op in fn.get_concrete_function(ts).graph.get_operations()}
        assert "ClipcoreClipByGlobalNorm" in ops
        value = clip.numpy() if isinstance(clip, tf.Tensor) else clip
        ref_outs, ref_norm = clipcore.clip_by_global_norm(arrays, value)
        assert norm.numpy() == ref_norm
        for g, r in zip(outs, ref_outs):
            assert g.numpy().tobytes() == r.tobytes()
    with pytest.raises(TypeError, match="clip_norm"):
        tf.function(lambda l: clipcore.clip_by_global_norm(l, "2"))(ts)
    with pytest.raises(TypeError, match="n_threads"):
        tf.function(lambda l: clipcore.clip_by_global_norm(l, 1.0, n_threads=1.5))(ts)
    with pytest.raises(ValueError, match="norm_type"):
        tf.function(lambda l: clipcore.global_norm(l, norm_type=-1))(ts)


def test_functions_given_to_tf_function_as_arguments_keep_graph_mode():
    # tf.function unwraps a function argument down __wrapped__: clipcore's
    # public functions must not lead it past their TF dispatch.
    ts = [tf.constant([3.0, 4.0]), tf.constant([[12.0]])]

    @tf.function
    def call(fn, *args):
        return fn(*args)
    assert call(clipcore.global_norm, ts).numpy() == np.float32(13.0)
    outs, norm = call(clipcore.clip_by_global_norm, ts, 6.5)
    assert norm.numpy() == np.float32(13.0)
    np.testing.assert_array_equal(outs[0].numpy(), np.float32([1.5, 2.0]))
    np.testing.assert_array_equal(call(clipcore.relu, tf.constant([-1.0, 2.0])).numpy(), [0, 2])
    assert "t_list" in str(inspect.signature(clipcore.clip_by_global_norm))


def test_tf_ops_called_directly_check_their_scalars():
    ops = tf_ops()
    ts = [tf.constant([3.0, 4.0])]
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="rank 0|scalar"):
        ops.clipcore_clip_by_global_norm(ts, tf.constant([1.0, 2.0]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="norm_type must be > 0"):
        ops.clipcore_global_norm(ts, tf.constant(-1.0, tf.float64))
    assert ops.clipcore_global_norm(ts, tf.constant(1.0, tf.float64)).numpy() == 7.0


def test_tf_ops_refuse_kernels_of_another_signature(monkeypatch):
    monkeypatch.setitem(_tf_ops.BINDINGS, "layout_norm", "double (int)")
    with pytest.raises(RuntimeError, match="layout_norm"):
        _tf_ops.addresses()


@pytest.mark.parametrize("env,warns", [({"CXX": "false"}, True), ({_tf_ops.ENV: "0"}, False)],
                         ids=["no-compiler", "turned-off"])
def test_graph_mode_without_the_ops(tmp_path, env, warns):
    # A build that fails warns once and keeps the numpy_function form; turned
    # off, nothing is built and nothing warns. Same results either way.
    code = textwrap.dedent("""
        import warnings, numpy as np, tensorflow as tf, clipcore
        ts = [tf.constant(np.arange(5.0, dtype=np.float32)), tf.constant([3.0, 4.0])]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn = tf.function(lambda l: clipcore.clip_by_global_norm(l, 1.0))
            outs, norm = fn(ts)
            n2 = tf.function(lambda l: clipcore.global_norm(l))(ts)
        ops = {op.type for op in fn.get_concrete_function(ts).graph.get_operations()}
        ref, ref_norm = clipcore.clip_by_global_norm([t.numpy() for t in ts], 1.0)
        assert norm.numpy() == ref_norm == n2.numpy()
        assert all(o.numpy().tobytes() == r.tobytes() for o, r in zip(outs, ref))
        assert "PyFuncStateless" in ops and "ClipcoreClipByGlobalNorm" not in ops
        mine = [w for w in caught if "TensorFlow ops are not available" in str(w.message)]
        print(len(mine))
    """)
    run_env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PYTHONPATH=os.pathsep.join(sys.path),
                   TF_CPP_MIN_LOG_LEVEL="3", **env)
    done = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == ("1" if warns else "0")
    assert not list(tmp_path.glob("clipcore/*.so"))


def _added_ops(fn, tensors):
    """Op types (and counts) fn's graph adds besides its inputs, constants and returned values."""
    graph = tf.function(fn).get_concrete_function(
        [tf.TensorSpec(t.shape, t.dtype) for t in tensors]).graph
    returned = {t.op.name for t in graph.outputs}
    return collections.Counter(op.type for op in graph.get_operations()
                               if op.type not in ("Placeholder", "Const")
                               and op.name not in returned)


def _lists(n):
    return [tf.ones([5]) * i for i in range(n)], [tf.ones([2, 3]) * i for i in range(n)]


def _clip(l):
    return clipcore.clip_by_global_norm(l, 1.0)


@pytest.mark.parametrize("n", [3, 40])
def test_graph_global_ops_are_one_op_each(n):
    # clipcore's TF op: one op whatever the list's length and shapes (its
    # gradient is registered: no wrapper)
    tf_ops()
    for ts in _lists(n):
        assert _added_ops(_clip, ts) == {"ClipcoreClipByGlobalNorm": 1}
        assert _added_ops(clipcore.global_norm, ts) == {"ClipcoreGlobalNorm": 1}


@pytest.mark.parametrize("n", [3, 40])
def test_graph_global_ops_without_the_op_have_a_fixed_number_of_ops(n, monkeypatch):
    # One ConcatV2, one numpy_function, one SplitV, and a Reshape for a tensor
    # that is not a vector (in, and out again).
    vectors, matrices = _lists(n)
    monkeypatch.setattr(_tf_ops, "_ops", False)
    assert _added_ops(_clip, vectors) == {"ConcatV2": 1, "PyFuncStateless": 1, "SplitV": 1}
    assert _added_ops(_clip, matrices) == {"ConcatV2": 1, "PyFuncStateless": 1, "SplitV": 1,
                                          "Reshape": 2 * n}
    # global_norm's gradient is taken on the flat vector (tf.custom_gradient's
    # IdentityN and Identity, once)
    norm_ops = {"ConcatV2": 1, "PyFuncStateless": 1, "IdentityN": 1, "Identity": 1}
    assert _added_ops(clipcore.global_norm, vectors) == norm_ops
    assert _added_ops(clipcore.global_norm, matrices) == dict(norm_ops, Reshape=n)


@pytest.mark.parametrize("form", FORMS)
def test_graph_global_norm_gradient_bitwise_equal_eager(form, monkeypatch):
    use_form(form, monkeypatch)
    ts = [t for t in _ragged_list(np.float32) if t.shape.num_elements()]

    def grads(l, m=clipcore):
        with tf.GradientTape() as tape:
            tape.watch(l)
            n = getattr(m, "linalg", m).global_norm(l)
        return tape.gradient(n, l, output_gradients=tf.constant(0.75))
    eager, graph = grads(ts), tf.function(grads)(ts)
    ref = tf.function(lambda l: grads(l, tf))(ts)
    for e, g, r, t in zip(eager, graph, ref, ts):
        assert g.shape == t.shape and g.numpy().tobytes() == e.numpy().tobytes()
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=2e-6, atol=1e-7)


# ---------------------------------------------------------------- fallback

def test_jit_compile_falls_back_with_one_warning():
    _tf._warned.discard("clip_by_norm")
    x = _c(X_NORM_AXES, [2, 3])

    @tf.function(jit_compile=True)
    def f(x):
        return clipcore.clip_by_norm(x, 4.0, [1]) + clipcore.clip_by_norm(x, 2.0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = f(x)
        got2 = f(x * 2.0)               # traced again: no second warning
    mine = [w for w in caught if "clipcore.clip_by_norm" in str(w.message)]
    assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning)
    np.testing.assert_allclose(got.numpy(), (tf.clip_by_norm(x, 4.0, [1])
                                             + tf.clip_by_norm(x, 2.0)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(got2.numpy(), (tf.clip_by_norm(2 * x, 4.0, [1])
                                              + tf.clip_by_norm(2 * x, 2.0)).numpy(), rtol=1e-6)


# -------------------------------------------------------- Python inputs

def test_python_lists_take_tensorflows_dtypes():
    # TF's clip_ops_test passes nested lists: TF makes float32 tensors of them.
    lists = [[-2.0, 0.0, 0.0, 4.0, 0.0, 0.0], [1.0, -2.0]]
    ref_list, ref_norm = tf.clip_by_global_norm(lists, 4.0)
    got_list, got_norm = clipcore.clip_by_global_norm(lists, 4.0)
    assert isinstance(got_norm, np.float32) and got_norm == ref_norm.numpy()
    for g, r in zip(got_list, ref_list):
        assert isinstance(g, np.ndarray) and g.dtype == np.float32
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-6)
    for value in ([1, 5, 9], [[1.5, 2.0]], 3, 2.5, [1, 2 ** 40]):
        ref = tf.convert_to_tensor(value)
        assert clipcore.clip_by_value(value, 1, 2).dtype == ref.dtype.as_numpy_dtype
        assert isinstance(clipcore.relu(value), (np.ndarray, np.generic))
    assert clipcore.maximum(2.5, 1).dtype == tf.maximum(2.5, 1).dtype.as_numpy_dtype


def test_import_clipcore_does_not_import_tensorflow():
    code = ("import sys, numpy as np, clipcore; clipcore.relu(np.ones(3)); "
            "clipcore.clip_by_global_norm([np.ones(3)], 1.0); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------------------ Keras

def _fit(optimizer, x, y):
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(256, activation="relu"),
                              keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)   # 20 steps
    return [w.numpy() for w in model.weights]


def test_keras_fit_with_global_clipnorm(monkeypatch):
    keras = pytest.importorskip("keras")
    import clipcore.keras as cck
    rng = np.random.default_rng(0)
    # Inputs scaled so that early gradients have global norms above 15.
    x = (rng.normal(size=(640, 784)) * 2.5).astype(np.float32)
    y = rng.integers(0, 10, 640)
    calls = []
    original = clipcore.clip_by_global_norm

    def counting(t_list, clip_norm, *args, **kwargs):
        calls.append(len(t_list))
        return original(t_list, clip_norm, *args, **kwargs)
    monkeypatch.setattr(clipcore, "clip_by_global_norm", counting)
    opt = cck.with_global_clipnorm(keras.optimizers.SGD(1.0), 15)
    assert isinstance(opt, keras.optimizers.SGD) and not opt.global_clipnorm
    got = _fit(opt, x, y)
    assert calls and calls[0] == 6          # clipcore clipped the 6 gradients in the step
    ref = _fit(keras.optimizers.SGD(1.0, global_clipnorm=15), x, y)
    unclipped = _fit(keras.optimizers.SGD(1.0), x, y)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
    assert any(not np.allclose(u, r, rtol=1e-3) for u, r in zip(unclipped, ref))
    with pytest.raises(ValueError, match="global_clipnorm"):
        cck.with_global_clipnorm(keras.optimizers.SGD(1.0, global_clipnorm=1.0), 15)
    with pytest.raises(ValueError, match="clip_norm"):
        cck.with_global_clipnorm(keras.optimizers.SGD(1.0), -1)
