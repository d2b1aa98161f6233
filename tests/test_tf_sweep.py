"""Randomized sweep: clipcore against TensorFlow itself.

Shapes (empty, 0-d, broadcasting, large enough for the threaded and the
pieced kernel paths), dtypes (float16, bfloat16, float32, float64, signed and
unsigned integers), axes (int, lists, negative, empty), NaN/inf/zeros and
signed zeros, negative and zero clip norms. Every case also runs clipcore on
TF tensors (the result must be a TF tensor of the same dtype) and on NumPy
arrays (an ndarray of the same dtype). Min/max ops must match bit for bit;
norm ops within float rounding (clipcore sums in float64, TF in the dtype).
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
import ml_dtypes  # noqa: E402

import clipcore  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.dtype(np.float16), BF16, np.dtype(np.float32), np.dtype(np.float64)]
INTS = [np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64,
                              np.uint8, np.uint16, np.uint32, np.uint64)]
SMALL_SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (4, 1, 5), (2, 0, 3), (3, 4, 5, 2)]
BIG_SHAPES = [(300, 257), (2, 70000), (70000, 3), (40, 30, 70)]
# Relative tolerance of norm-based results, per dtype (TF rounds in the dtype).
RTOL = {np.dtype(np.float16): 4e-3, BF16: 3e-2, np.dtype(np.float32): 2e-5,
        np.dtype(np.float64): 1e-10}


def f64(x):
    if isinstance(x, tf.Tensor):
        x = x.numpy()        # (np.asarray fails on 0-d bfloat16 tensors)
    return np.asarray(x).astype(np.float64)


def values(rng, shape, dtype, special=True):
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -120), min(info.max, 120) + 1, size=shape).astype(dtype)
    x = rng.normal(0.0, rng.choice([0.25, 1.0, 3.0]), size=shape)
    if special and x.size:
        u = rng.random(shape)
        x[u < 0.04] = 0.0
        x[(u >= 0.04) & (u < 0.06)] = -0.0
        if rng.random() < 0.3:
            x[(u >= 0.06) & (u < 0.07)] = np.nan
        if rng.random() < 0.3:
            x[(u >= 0.07) & (u < 0.08)] = np.inf
            x[(u >= 0.08) & (u < 0.09)] = -np.inf
    return x.astype(dtype)


def shape_for(rng, dtype):
    shapes = SMALL_SHAPES + (BIG_SHAPES if dtype in (np.float32, np.float64) else [])
    return shapes[rng.integers(len(shapes))]


def broadcastable(rng, shape):
    """A shape that broadcasts to shape without changing it."""
    k = int(rng.integers(0, len(shape) + 1))
    return tuple(1 if rng.random() < 0.4 else n for n in shape[len(shape) - k:])


def tf_tensor(x):
    return tf.constant(x) if isinstance(x, np.ndarray) else x


def assert_bitwise(cc, ref, dtype):
    """Equal values, NaN where TF has NaN (signed zeros are not compared: TF's own
    vectorized and scalar loops disagree on which zero max(-0.0, 0.0) returns)."""
    cc, ref = np.asarray(f64(cc)), f64(ref)
    assert cc.shape == ref.shape
    np.testing.assert_array_equal(cc, ref)


def assert_close(cc, ref, dtype):
    assert (cc.dtype == tf.as_dtype(dtype)) if isinstance(cc, tf.Tensor) else (cc.dtype == dtype)
    ref = f64(ref)
    assert tuple(np.shape(cc)) == ref.shape
    r = f64(ref)
    finite = np.abs(r[np.isfinite(r)])
    scale = finite.max() if finite.size else 1.0
    np.testing.assert_allclose(f64(cc), r, rtol=RTOL[dtype], atol=RTOL[dtype] * max(scale, 1e-30))


# ------------------------------------------------------------ elementwise

@pytest.mark.parametrize("seed", range(80))
def test_clip_by_value_sweep(seed):
    rng = np.random.default_rng(seed)
    dtype = (FLOATS + INTS)[seed % 12]
    shape = shape_for(rng, dtype)
    x = values(rng, shape, dtype)
    bounds = []
    for _ in range(2):
        kind = rng.integers(3)
        v = values(rng, broadcastable(rng, shape) if kind == 2 else (), dtype,
                   special=rng.random() < 0.2)
        if kind == 0:                     # a Python number
            v = v.item() if dtype.kind in "iu" else float(v)
        bounds.append(v)
    if rng.random() < 0.2:
        bounds.reverse()                  # often min > max
    ref = tf.clip_by_value(tf.constant(x), *[tf_tensor(b) for b in bounds])
    got_tf = clipcore.clip_by_value(tf.constant(x), *[tf_tensor(b) for b in bounds])
    assert isinstance(got_tf, tf.Tensor) and got_tf.dtype == ref.dtype
    assert_bitwise(got_tf, ref, dtype)
    x_before = x.copy()
    got = clipcore.clip_by_value(x, *bounds)
    assert np.asarray(got).dtype == dtype
    assert_bitwise(got, ref, dtype)
    np.testing.assert_array_equal(x, x_before)
    if x.ndim:
        assert clipcore.clip_by_value_(x, *bounds) is x
        assert_bitwise(x, ref, dtype)


@pytest.mark.parametrize("op", ["maximum", "minimum"])
@pytest.mark.parametrize("seed", range(40))
def test_maximum_minimum_sweep(op, seed):
    rng = np.random.default_rng(seed)
    dtype = (FLOATS + INTS)[seed % 12]
    shape = shape_for(rng, dtype)
    x = values(rng, shape, dtype)
    case = rng.integers(4)
    if case == 0:
        y = values(rng, (), dtype)
        y = y.item() if dtype.kind in "iu" else float(y)
    elif case == 1:
        y = values(rng, broadcastable(rng, shape), dtype)
    elif case == 2:                       # both operands broadcast
        y = values(rng, shape[:-1] + (1,) if shape else (), dtype)
        x = values(rng, (1,) if shape else (), dtype)
    else:
        y = values(rng, shape, dtype)
    ref = getattr(tf, op)(tf_tensor(x), tf_tensor(y))
    got_tf = getattr(clipcore, op)(tf_tensor(x), tf_tensor(y))
    assert isinstance(got_tf, tf.Tensor) and got_tf.dtype == ref.dtype
    assert_bitwise(got_tf, ref, dtype)
    got = getattr(clipcore, op)(x, y)
    assert np.asarray(got).dtype == dtype
    assert_bitwise(got, ref, dtype)
    # The scalar first, too.
    if case == 0:
        ref2 = getattr(tf, op)(y, tf.constant(x))
        assert_bitwise(getattr(clipcore, op)(y, x), ref2, dtype)


@pytest.mark.parametrize("seed", range(40))
def test_relu_sweep(seed):
    rng = np.random.default_rng(seed)
    dtype = (FLOATS + INTS)[seed % 12]
    x = values(rng, shape_for(rng, dtype), dtype)
    ref = tf.nn.relu(tf.constant(x))
    got_tf = clipcore.relu(tf.constant(x))
    assert isinstance(got_tf, tf.Tensor) and got_tf.dtype == ref.dtype
    assert_bitwise(got_tf, ref, dtype)
    got = clipcore.relu(x)
    assert np.asarray(got).dtype == dtype
    assert_bitwise(got, ref, dtype)
    if x.ndim:
        clipcore.relu_(x)
        assert_bitwise(x, ref, dtype)


# ----------------------------------------------------------------- norms

def random_axes(rng, ndim):
    if ndim == 0 or rng.random() < 0.25:
        return None
    k = int(rng.integers(0, ndim + 1))
    axes = sorted(rng.choice(ndim, size=k, replace=False).tolist())
    axes = [a - ndim if rng.random() < 0.5 else a for a in axes]   # negative axes
    if len(axes) == 1 and rng.random() < 0.5:
        return axes[0]
    return axes


def random_clip_norm(rng, x, dtype):
    u = rng.random()
    if u < 0.1:
        return 0.0
    if u < 0.2:
        return -float(rng.uniform(0.1, 3.0))
    if u < 0.25:
        return np.inf
    scale = np.sqrt(max(np.nansum(f64(x)[np.isfinite(f64(x))] ** 2), 1e-3))
    return float(rng.uniform(0.05, 1.5) * scale)


@pytest.mark.parametrize("seed", range(100))
def test_clip_by_norm_sweep(seed):
    rng = np.random.default_rng(1000 + seed)
    dtype = FLOATS[seed % 4]
    shape = shape_for(rng, dtype)
    x = values(rng, shape, dtype, special=rng.random() < 0.4)
    axes = random_axes(rng, len(shape))
    clip_norm = random_clip_norm(rng, x, dtype)
    if rng.random() < 0.1 and shape:           # per-element clip norms
        clip_norm = np.abs(values(rng, broadcastable(rng, shape), dtype, special=False))
    ref = tf.clip_by_norm(tf.constant(x), tf_tensor(clip_norm), axes)
    got_tf = clipcore.clip_by_norm(tf.constant(x), tf_tensor(clip_norm), axes)
    assert isinstance(got_tf, tf.Tensor) and got_tf.dtype == ref.dtype
    assert_close(got_tf, ref, dtype)
    x_before = x.copy()
    got = clipcore.clip_by_norm(x, clip_norm, axes)
    assert_close(got, ref, dtype)
    np.testing.assert_array_equal(f64(x), f64(x_before))
    if x.ndim:
        assert clipcore.clip_by_norm_(x, clip_norm, axes) is x
        np.testing.assert_array_equal(f64(x), f64(got))


NORM_ORDS = ["euclidean", 1, 2, np.inf, 3.0, 0.5]
MATRIX_ORDS = ["euclidean", "fro", 1, 2, np.inf]


@pytest.mark.parametrize("seed", range(80))
def test_norm_sweep(seed):
    rng = np.random.default_rng(2000 + seed)
    dtype = FLOATS[seed % 4]
    shape = shape_for(rng, dtype)
    matrix = len(shape) >= 2 and rng.random() < 0.4
    if matrix:
        a0, a1 = rng.choice(len(shape), size=2, replace=False).tolist()
        axis = (a0 - len(shape) if rng.random() < 0.3 else a0, a1)
        ord = MATRIX_ORDS[int(rng.integers(len(MATRIX_ORDS)))]
        if ord == 2 and dtype not in (np.float32, np.float64):
            dtype = np.dtype(np.float32)      # TF has no float16/bfloat16 SVD
    else:
        axis = None if not shape or rng.random() < 0.3 else int(rng.integers(-len(shape), len(shape)))
        ord = NORM_ORDS[int(rng.integers(len(NORM_ORDS)))]
    special = ord != 2 and rng.random() < 0.3
    x = values(rng, shape, dtype, special=special)
    keepdims = bool(rng.random() < 0.5)
    ref = tf.norm(tf.constant(x), ord=ord, axis=axis, keepdims=keepdims)
    got_tf = clipcore.norm(tf.constant(x), ord=ord, axis=axis, keepdims=keepdims)
    assert isinstance(got_tf, tf.Tensor) and got_tf.dtype == ref.dtype
    rtol = RTOL[dtype] * (5 if ord not in ("euclidean", "fro", 1, np.inf) else 1)
    np.testing.assert_allclose(f64(got_tf), f64(ref), rtol=max(rtol, 1e-6), atol=1e-30)
    got = clipcore.norm(x, ord=ord, axis=axis, keepdims=keepdims)
    np.testing.assert_allclose(f64(got), f64(ref), rtol=max(rtol, 1e-6), atol=1e-30)
    assert np.asarray(got).dtype == dtype


def random_list(rng, dtype):
    items = []
    for _ in range(int(rng.integers(0, 6))):
        u = rng.random()
        if u < 0.15:
            items.append(None)
            continue
        shape = SMALL_SHAPES[int(rng.integers(len(SMALL_SHAPES)))]
        if dtype in (np.float32, np.float64) and rng.random() < 0.2:
            shape = BIG_SHAPES[int(rng.integers(len(BIG_SHAPES)))]
        v = values(rng, shape, dtype, special=rng.random() < 0.15)
        if u > 0.9 and v.ndim:
            items.append(("slices", v))
        else:
            items.append(v)
    return items


def as_tf(item):
    if item is None:
        return None
    if isinstance(item, tuple):
        v = item[1]
        return tf.IndexedSlices(tf.constant(v), tf.range(v.shape[0]), tf.constant(v.shape))
    return tf.constant(item)


@pytest.mark.parametrize("seed", range(60))
def test_clip_by_global_norm_sweep(seed):
    rng = np.random.default_rng(3000 + seed)
    dtype = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)][seed % 3]
    items = random_list(rng, dtype)
    tf_list = [as_tf(i) for i in items]
    np_list = [i[1] if isinstance(i, tuple) else i for i in items]
    flat = np.concatenate([f64(v).ravel() for v in np_list if v is not None] + [np.zeros(0)])
    finite = flat[np.isfinite(flat)]
    clip_norm = [0.0, -1.0, np.inf, float(rng.uniform(0.05, 1.5)) *
                 max(np.sqrt(np.sum(finite ** 2)), 1e-3)][min(int(rng.integers(0, 7)), 3)]
    use_norm = None
    if rng.random() < 0.3:
        use_norm = tf.constant(dtype.type(rng.choice([0.0, -2.0, rng.uniform(0.1, 10)])))
    ref_list, ref_norm = tf.clip_by_global_norm(tf_list, clip_norm, use_norm)
    got_list, got_norm = clipcore.clip_by_global_norm(tf_list, clip_norm, use_norm)
    has_tf = any(t is not None for t in tf_list)
    if use_norm is None:
        gn = clipcore.global_norm(tf_list)
        for value in (got_norm, gn):
            if has_tf:       # TF tensors in: a TF tensor of their dtype
                assert isinstance(value, tf.Tensor) and value.dtype == ref_norm.dtype
            np.testing.assert_allclose(f64(value), f64(ref_norm), rtol=RTOL[dtype])
    else:
        assert got_norm is use_norm
    for got, ref in zip(got_list, ref_list):
        if ref is None:
            assert got is None
            continue
        if isinstance(ref, tf.IndexedSlices):
            assert isinstance(got, tf.IndexedSlices)
            got, ref = got.values, ref.values
        assert isinstance(got, tf.Tensor) and got.dtype == ref.dtype
        if use_norm is not None:
            # Same norm, same scale arithmetic: the same bits as TF.
            np.testing.assert_array_equal(f64(got), f64(ref))
        else:
            assert_close(got, ref, dtype)
    # NumPy in: NumPy out, inputs untouched, norm a NumPy scalar of the dtype.
    before = [None if v is None else v.copy() for v in np_list]
    np_out, np_norm = clipcore.clip_by_global_norm(np_list, clip_norm, use_norm)
    for v, b in zip(np_list, before):
        if v is not None:
            np.testing.assert_array_equal(f64(v), f64(b))
    for got, ref in zip(np_out, ref_list):
        if ref is None:
            assert got is None
            continue
        ref = ref.values if isinstance(ref, tf.IndexedSlices) else ref
        assert isinstance(got, np.ndarray) and got.dtype == dtype
        assert_close(got, ref, dtype)
    if use_norm is None and any(v is not None for v in np_list):
        assert type(np_norm) is dtype.type


@pytest.mark.parametrize("seed", range(30))
def test_clip_by_average_norm_sweep(seed):
    rng = np.random.default_rng(4000 + seed)
    dtype = np.dtype(np.float32)              # TF accepts float32 only
    shape = shape_for(rng, dtype)
    x = values(rng, shape, dtype, special=rng.random() < 0.3)
    c = random_clip_norm(rng, x, dtype) / max(x.size, 1)
    ref = tf.compat.v1.clip_by_average_norm(tf.constant(x), c)
    got_tf = clipcore.clip_by_average_norm(tf.constant(x), c)
    assert isinstance(got_tf, tf.Tensor) and got_tf.dtype == ref.dtype
    assert_close(got_tf, ref, dtype)
    assert_close(clipcore.clip_by_average_norm(x, c), ref, dtype)
