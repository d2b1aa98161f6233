"""clipcore against TensorFlow on the cases of TF's own ClipTest (clip_ops_test.py).

Each case runs TensorFlow itself, clipcore on TF tensors (the result must be
a TF tensor of the same dtype) and clipcore on NumPy arrays, and checks all
three against each other and against the answer in TF's test. Graph mode
(tf.function) and gradients are tested in test_tf_graph.py.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
import ml_dtypes  # noqa: E402  (installed with TensorFlow: its bfloat16)

import clipcore  # noqa: E402

ALL_VALUE_DTYPES = [tf.float16, tf.float32, tf.float64, tf.bfloat16,
                    tf.int16, tf.int32, tf.int64, tf.uint8]


def np_dtype(tf_dtype):
    return ml_dtypes.bfloat16 if tf_dtype == tf.bfloat16 else tf_dtype.as_numpy_dtype


def f64(x):
    return np.asarray(x).astype(np.float64)


def assert_same(cc, ref, expected=None, *, rtol=1e-6, atol=1e-6):
    """cc (clipcore on TF input) is a TF tensor equal to ref (TF's own result)."""
    assert isinstance(cc, tf.Tensor), type(cc)
    assert cc.dtype == ref.dtype
    assert cc.shape == ref.shape
    np.testing.assert_allclose(f64(cc), f64(ref), rtol=rtol, atol=atol)
    if expected is not None:
        np.testing.assert_allclose(f64(cc), np.asarray(expected, np.float64),
                                   rtol=max(rtol, 1e-2 if cc.dtype in (tf.float16, tf.bfloat16)
                                            else rtol), atol=atol)


def assert_numpy(cc, ref, dtype):
    """cc (clipcore on NumPy input) is an ndarray equal to ref."""
    assert isinstance(cc, np.ndarray), type(cc)
    assert cc.dtype == np.dtype(dtype)
    np.testing.assert_allclose(f64(cc), f64(ref), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- clip_by_value

def test_clip_by_value():
    x = tf.constant([-5.0, 2.0, 3.0, 4.0, 5.0, 6.0], shape=[2, 3])
    np_ans = [[-4.4, 2.0, 3.0], [4.0, 4.4, 4.4]]
    ref = tf.clip_by_value(x, -4.4, 4.4)
    assert_same(clipcore.clip_by_value(x, -4.4, 4.4), ref, np_ans)
    assert_numpy(clipcore.clip_by_value(x.numpy(), -4.4, 4.4), ref, np.float32)


@pytest.mark.parametrize("dtype", ALL_VALUE_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("lo,hi,np_ans", [
    (2, 4, [[2, 2, 3], [4, 4, 4]]),                                        # [Tensor, Scalar, Scalar]
    ([2, 2, 2, 3, 3, 3], 4, [[2, 2, 3], [4, 4, 4]]),                       # [Tensor, Tensor, Scalar]
    (4, [6, 6, 6, 6, 6, 6], [[4, 4, 4], [4, 5, 6]]),                       # [Tensor, Scalar, Tensor]
    ([2, 2, 2, 5, 5, 5], [5, 5, 5, 7, 7, 7], [[2, 2, 3], [5, 5, 6]]),      # [Tensor, Tensor, Tensor]
], ids=["0Type", "1Type", "2Type", "3Type"])
def test_clip_by_value_types(dtype, lo, hi, np_ans):
    x = tf.constant([1, 2, 3, 4, 5, 6], shape=[2, 3], dtype=dtype)
    lo = tf.constant(lo, shape=[2, 3], dtype=dtype) if isinstance(lo, list) else lo
    hi = tf.constant(hi, shape=[2, 3], dtype=dtype) if isinstance(hi, list) else hi
    ref = tf.clip_by_value(x, lo, hi)
    got = clipcore.clip_by_value(x, lo, hi)
    assert_same(got, ref, np_ans)
    np.testing.assert_array_equal(f64(got), f64(ref))       # min/max are exact
    nlo = lo.numpy() if isinstance(lo, tf.Tensor) else lo
    nhi = hi.numpy() if isinstance(hi, tf.Tensor) else hi
    got_np = clipcore.clip_by_value(x.numpy(), nlo, nhi)
    assert got_np.dtype == np.dtype(np_dtype(dtype))
    np.testing.assert_array_equal(f64(got_np), np.asarray(np_ans, np.float64))


def test_clip_by_value_bad_shape():
    x = tf.constant([-5.0, 2.0, 3.0, 4.0, 5.0, 6.0], shape=[2, 3, 1])
    clip = tf.constant([1.0, 2.0])
    for lo, hi in [(-clip, clip), (1.0, clip)]:
        with pytest.raises(ValueError):
            tf.clip_by_value(x, lo, hi)
        with pytest.raises(ValueError, match="clip_value_m"):
            clipcore.clip_by_value(x, lo, hi)
        with pytest.raises(ValueError, match="clip_value_m"):
            clipcore.clip_by_value(x.numpy(), np.asarray(lo), np.asarray(hi))


def test_clip_by_value_non_finite():
    x = tf.constant([float("NaN"), float("Inf"), -float("Inf")])
    np_ans = [float("NaN"), 4.0, -4.0]
    ref = tf.clip_by_value(x, -4.0, 4.0)
    assert_same(clipcore.clip_by_value(x, -4.0, 4.0), ref, np_ans)
    assert_numpy(clipcore.clip_by_value(x.numpy(), -4.0, 4.0), ref, np.float32)


@pytest.mark.parametrize("lo,hi,expected", [
    (-2.0, 2.0, [[[-2.0, 0.0, 0.0], [2.0, 0.0, 0.0]], [[0.0, 2.0, 0.0], [0.0, 0.0, -1.0]]]),
    (1.0, 2.0, [[[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]], [[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]]),
    (-2.0, -1.0, [[[-2.0, -1.0, -1.0], [-1.0, -1.0, -1.0]],
                  [[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]]]),
])
def test_clip_indexed_slices_by_value(lo, hi, expected):
    values = tf.constant([[[-3.0, 0.0, 0.0], [4.0, 0.0, 0.0]], [[0.0, 2.0, 0.0], [0.0, 0.0, -1.0]]])
    slices = tf.IndexedSlices(values, tf.constant([2, 6]), tf.constant([10, 2, 3]))
    ref = tf.clip_by_value(slices, lo, hi)
    got = clipcore.clip_by_value(slices, lo, hi)
    assert isinstance(got, tf.IndexedSlices)
    assert_same(got.values, ref.values, expected)
    np.testing.assert_array_equal(got.indices.numpy(), [2, 6])
    np.testing.assert_array_equal(got.dense_shape.numpy(), [10, 2, 3])


def test_clip_by_value_empty_tensor():
    # GitHub issue 19337: empty tensors with empty or scalar bounds.
    zero = np.zeros((7, 0), np.float32)
    for lo, hi in [(zero, zero), (1.0, 1.0), (zero, 1.0), (1.0, zero)]:
        ref = tf.clip_by_value(tf.constant(zero), lo, hi)
        got = clipcore.clip_by_value(tf.constant(zero), lo, hi)
        assert_same(got, ref)
        assert clipcore.clip_by_value(zero, lo, hi).shape == (7, 0)


# -------------------------------------------------------------- clip_by_norm

X_NORM = [-3.0, 0.0, 0.0, 4.0, 0.0, 0.0]
X_NORM_AXES = [-3.0, 0.0, 0.0, 4.0, 0.0, 3.0]


@pytest.mark.parametrize("values,clip_norm,axes,np_ans", [
    (X_NORM, 4.0, None, [[-2.4, 0.0, 0.0], [3.2, 0.0, 0.0]]),           # Clipped
    (X_NORM, 6.0, None, [[-3.0, 0.0, 0.0], [4.0, 0.0, 0.0]]),           # NotClipped
    ([0.0] * 6, 6.0, None, [[0.0] * 3] * 2),                             # Zero
    (X_NORM_AXES, 4.0, [0], [[-2.4, 0.0, 0.0], [3.2, 0.0, 3.0]]),       # ClippedWithDim0
    (X_NORM_AXES, 4.0, [1], [[-3.0, 0.0, 0.0], [3.2, 0.0, 2.4]]),       # ClippedWithDim1
    (X_NORM_AXES, 6.0, [1], [[-3.0, 0.0, 0.0], [4.0, 0.0, 3.0]]),       # NotClippedWithAxes
], ids=["Clipped", "NotClipped", "Zero", "ClippedWithDim0", "ClippedWithDim1",
        "NotClippedWithAxes"])
def test_clip_by_norm(values, clip_norm, axes, np_ans):
    x = tf.constant(values, shape=[2, 3])
    ref = tf.clip_by_norm(x, clip_norm, axes)
    assert_same(clipcore.clip_by_norm(x, clip_norm, axes), ref, np_ans)
    assert_same(clipcore.clip_by_norm(x, tf.constant(clip_norm), axes), ref, np_ans)
    if axes is not None:                      # axes as a tensor, too
        assert_same(clipcore.clip_by_norm(x, clip_norm, tf.constant(axes)), ref, np_ans)
    assert_numpy(clipcore.clip_by_norm(x.numpy(), clip_norm, axes), ref, np.float32)


def test_clip_by_norm_bad_shape():
    x = tf.constant(X_NORM, shape=[2, 3, 1])
    clip = tf.constant([1.0, 2.0])
    with pytest.raises(ValueError):
        tf.clip_by_norm(x, clip)
    with pytest.raises(ValueError, match="clip_norm"):
        clipcore.clip_by_norm(x, clip)


# ------------------------------------------------------- clip_by_global_norm

def _global_case():
    x0 = tf.constant([-2.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3])
    x1 = tf.constant([1.0, -2.0])
    return x0, x1


def _check_global(got, ref, norm_expected):
    (cc_list, cc_norm), (tf_list, tf_norm) = got, ref
    assert isinstance(cc_list, list) and len(cc_list) == len(tf_list)
    assert isinstance(cc_norm, tf.Tensor) and cc_norm.dtype == tf_norm.dtype
    np.testing.assert_allclose(f64(cc_norm), f64(tf_norm), rtol=1e-6)
    np.testing.assert_allclose(f64(cc_norm), norm_expected, rtol=1e-6)
    for c, t in zip(cc_list, tf_list):
        if t is None:
            assert c is None
        elif isinstance(t, tf.IndexedSlices):
            assert isinstance(c, tf.IndexedSlices)
            assert_same(c.values, t.values)
        else:
            assert_same(c, t)


@pytest.mark.parametrize("clip_norm", [4.0, "tensor"], ids=["Clipped", "ClippedTensor"])
def test_clip_by_global_norm_clipped(clip_norm):
    x0, x1 = _global_case()
    c = tf.constant(4.0) if clip_norm == "tensor" else clip_norm
    ref = tf.clip_by_global_norm((x0, x1), c)
    got = clipcore.clip_by_global_norm((x0, x1), c)
    _check_global(got, ref, 5.0)
    np.testing.assert_allclose(f64(got[0][0]), [[-1.6, 0.0, 0.0], [3.2, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(f64(got[0][1]), [0.8, -1.6], rtol=1e-6)


def test_clip_by_global_norm_supports_none():
    x0, x1 = _global_case()
    ref = tf.clip_by_global_norm((x0, None, x1, None), 4.0)
    got = clipcore.clip_by_global_norm((x0, None, x1, None), 4.0)
    assert got[0][1] is None and got[0][3] is None
    _check_global(got, ref, 5.0)


def test_clip_by_global_norm_with_indexed_slices_clipped():
    x0, _ = _global_case()
    x1 = tf.IndexedSlices(tf.constant([1.0, -2.0]), tf.constant([3, 4]))
    ref = tf.clip_by_global_norm([x0, x1], 4.0)
    got = clipcore.clip_by_global_norm([x0, x1], 4.0)
    _check_global(got, ref, 5.0)
    np.testing.assert_allclose(f64(got[0][1].values), [0.8, -1.6], rtol=1e-6)
    np.testing.assert_array_equal(got[0][1].indices.numpy(), [3, 4])


def test_clip_by_global_norm_preserves_dense_shape():
    slices = tf.IndexedSlices(tf.constant([1.0]), tf.constant([0]), dense_shape=(1,))
    ans, _ = clipcore.clip_by_global_norm([slices], 1.0)
    assert slices.dense_shape == (1,)
    assert ans[0].dense_shape == (1,)


@pytest.mark.parametrize("zero", [False, True], ids=["NotClipped", "Zero"])
def test_clip_by_global_norm_not_clipped(zero):
    x0, x1 = _global_case()
    if zero:
        x0, x1 = tf.zeros_like(x0), tf.zeros_like(x1)
    ref = tf.clip_by_global_norm([x0, x1], 6.0)
    got = clipcore.clip_by_global_norm([x0, x1], 6.0)
    _check_global(got, ref, 0.0 if zero else 5.0)
    np.testing.assert_array_equal(f64(got[0][0]), f64(x0))
    np.testing.assert_array_equal(f64(got[0][1]), f64(x1))


def test_clip_by_global_norm_inf():
    x0 = tf.constant([-2.0, 0.0, np.inf, 4.0, 0.0, 0.0], shape=[2, 3])
    x1 = tf.constant([1.0, -2.0])
    ref = tf.clip_by_global_norm([x0, x1], 6.0)
    got = clipcore.clip_by_global_norm([x0, x1], 6.0)
    assert got[1].numpy() == np.inf
    np.testing.assert_array_equal(got[0][0].numpy(), np.full([2, 3], np.nan))
    np.testing.assert_array_equal(got[0][1].numpy(), np.full([2], np.nan))
    _check_global(got, ref, np.inf)
    # NumPy in: NumPy out, norm in the inputs' dtype.
    out, norm = clipcore.clip_by_global_norm([x0.numpy(), x1.numpy()], 6.0)
    assert isinstance(norm, np.float32) and norm == np.inf
    assert all(np.isnan(o).all() for o in out)


def test_global_norm():
    x0, x1 = _global_case()
    ref = tf.linalg.global_norm([x0, None, x1])
    got = clipcore.global_norm([x0, None, x1])
    assert isinstance(got, tf.Tensor) and got.dtype == ref.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6)
    # The core's contract for NumPy input: a Python float.
    assert clipcore.global_norm([x0.numpy(), None, x1.numpy()]) == pytest.approx(5.0)


# ------------------------------------------------------ clip_by_average_norm

@pytest.mark.parametrize("values,clip_norm,np_ans", [
    (X_NORM, 0.8, [[-2.88, 0.0, 0.0], [3.84, 0.0, 0.0]]),        # Clipped
    (X_NORM, "tensor", [[-2.88, 0.0, 0.0], [3.84, 0.0, 0.0]]),   # ClippedTensor
    (X_NORM, 0.9, [[-3.0, 0.0, 0.0], [4.0, 0.0, 0.0]]),          # NotClipped
    ([0.0] * 6, 0.9, [[0.0] * 3] * 2),                            # Zero
], ids=["Clipped", "ClippedTensor", "NotClipped", "Zero"])
def test_clip_by_average_norm(values, clip_norm, np_ans):
    x = tf.constant(values, shape=[2, 3])
    c = tf.constant(0.8) if clip_norm == "tensor" else clip_norm
    ref = tf.compat.v1.clip_by_average_norm(x, c)
    assert_same(clipcore.clip_by_average_norm(x, c), ref, np_ans)
    assert_numpy(clipcore.clip_by_average_norm(x.numpy(), c), ref, np.float32)


def test_clip_by_average_norm_replaced_with_clip_by_norm():
    x = tf.constant(X_NORM, shape=[2, 3])
    with_norm = clipcore.clip_by_average_norm(x, 0.8)
    without_norm = clipcore.clip_by_norm(x, 0.8 * 6)
    np.testing.assert_allclose(with_norm.numpy(), without_norm.numpy(), rtol=1e-6)


# ------------------------------------------------------------------ errors

_x = tf.constant([[-3.0, 0.0, 0.0], [4.0, 0.0, 3.0]])
_i = tf.constant([3, 4])
BAD_INPUTS = [
    # (what, expected class, TF call, clipcore call): where TF raises its own
    # InvalidArgumentError, clipcore raises the matching Python class.
    ("bounds do not broadcast", ValueError,
     lambda m: m.clip_by_value(_x, tf.zeros((3, 3)), 1.0)),
    ("bound changes t's shape", ValueError,
     lambda m: m.clip_by_value(tf.ones(3), tf.zeros((2, 3)), 1.0)),
    ("bound tensor of another dtype", TypeError,
     lambda m: m.clip_by_value(_x, tf.constant(0.0, tf.float64), 1.0)),
    ("float bound for an int tensor", TypeError, lambda m: m.clip_by_value(_i, 2.5, 4)),
    ("bool tensor", TypeError, lambda m: m.clip_by_value(tf.constant([True]), False, True)),
    ("int tensor for clip_by_norm", TypeError, lambda m: m.clip_by_norm(_i, 1.0)),
    ("axis out of range", ValueError, lambda m: m.clip_by_norm(_x, 1.0, axes=2)),
    ("repeated axis", ValueError, lambda m: m.clip_by_norm(_x, 1.0, axes=[1, 1])),
    ("float axis", TypeError, lambda m: m.clip_by_norm(_x, 1.0, axes=1.0)),
    ("string clip_norm", TypeError, lambda m: m.clip_by_norm(_x, "a")),
    ("bare array as t_list", TypeError, lambda m: getattr(m, "linalg", m).global_norm(np.ones(3))),
    ("string as t_list", TypeError, lambda m: getattr(m, "linalg", m).global_norm("abc")),
    ("generator as t_list", TypeError,
     lambda m: getattr(m, "linalg", m).global_norm(t for t in [_x])),
    ("int tensor in t_list", TypeError, lambda m: getattr(m, "linalg", m).global_norm([_i])),
    ("vector clip_norm for the global norm", ValueError,
     lambda m: m.clip_by_global_norm([_x], np.array([1.0, 2.0]))),
    ("'fro' for a vector norm", ValueError, lambda m: m.norm(_x, "fro")),
    ("negative ord", ValueError, lambda m: m.norm(_x, -1)),
    ("list of one axis", ValueError, lambda m: m.norm(_x, axis=[1])),
    ("norm axis out of range", ValueError, lambda m: m.norm(_x, axis=5)),
    ("int tensor for norm", TypeError, lambda m: m.norm(_i)),
    ("shapes do not broadcast", ValueError, lambda m: m.maximum(tf.ones(3), tf.zeros(4))),
    ("tensors of different dtypes", TypeError, lambda m: m.maximum(_i, tf.constant([1.0]))),
    ("float for an int tensor", TypeError, lambda m: m.minimum(_i, 2.5)),
]


@pytest.mark.parametrize("what,expected,call", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_like_tensorflow(what, expected, call):
    with pytest.raises(Exception) as tf_error:
        call(tf)
    assert isinstance(tf_error.value, (expected, tf.errors.InvalidArgumentError,
                                       tf.errors.NotFoundError)), tf_error.value
    with pytest.raises(expected):
        call(clipcore)


def test_variables_symbolic_tensors_and_immutability():
    # (symbolic tensors: clipcore runs inside tf.function, see test_tf_graph.py)
    v = tf.Variable([[-3.0, 0.5], [4.0, 2.0]])
    got = clipcore.clip_by_norm(v, 1.0, axes=1)
    assert isinstance(got, tf.Tensor)
    np.testing.assert_allclose(got.numpy(), tf.clip_by_norm(v, 1.0, axes=1).numpy(), rtol=1e-6)
    with pytest.raises(TypeError, match="immutable"):
        clipcore.clip_by_value_(tf.constant([1.0]), 0.0, 0.5)

    @tf.function
    def traced(x):
        return clipcore.relu(x)

    np.testing.assert_array_equal(traced(tf.constant([1.0, -1.0])).numpy(), [1.0, 0.0])


@pytest.mark.parametrize("n", [20_000, 300_000, 3_000_000])
def test_tf_results_are_usable_by_tf_kernels(n):
    # TF's kernels need 64-byte aligned memory and do not check what DLPack hands
    # them: a zero-copy result on 16-byte aligned memory aborted the process.
    grads = [tf.random.normal([n]), tf.random.normal([n // 3, 3])]
    clipped, norm = clipcore.clip_by_global_norm(grads, 1.0)
    for t in clipped:
        assert np.asarray(t).ctypes.data % 64 == 0
        assert float(tf.reduce_sum(t * 2.0 + t)) == pytest.approx(3 * float(tf.reduce_sum(t)), rel=1e-4, abs=1e-3)
    out = clipcore.relu(grads[0])
    assert np.asarray(out).ctypes.data % 64 == 0
    assert float(tf.reduce_max(out - 1.0)) >= -1.0
