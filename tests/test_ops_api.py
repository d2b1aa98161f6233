"""The TF-semantics API on NumPy and PyTorch inputs: layouts, threads, out=,
in-place twins, errors, and a float64 NumPy reference.

(Agreement with TensorFlow itself is in test_tf_semantics.py and
test_tf_sweep.py.)
"""
import doctest
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import clipcore
from clipcore import _global, _ops

FLOAT_DTYPES = [np.float16, np.float32, np.float64]
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
THREADS = [1, 2, 4]


def layouts(base):
    """(name, array) views of base's values in different memory layouts."""
    yield "C", np.array(base, order="C")
    yield "F", np.array(base, order="F")
    big = np.zeros(tuple(2 * n + 1 for n in base.shape), base.dtype)
    view = big[tuple(slice(1, None, 2) for _ in base.shape)]
    view[...] = base
    yield "strided", view
    if base.ndim >= 2:
        yield "transposed", np.ascontiguousarray(base.T).T
        yield "reversed", np.ascontiguousarray(base[::-1])[::-1]
    swapped = base.astype(base.dtype.newbyteorder())
    yield "byteswapped", swapped
    ro = np.array(base)
    ro.flags.writeable = False
    yield "read-only", ro


def rand(shape, dtype, seed=0, special=False):
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -100), min(info.max, 100) + 1, shape).astype(dtype)
    x = rng.normal(0, 2, shape)
    if special and x.size:
        x.flat[::7] = 0.0
        x.flat[3::11] = np.nan
        x.flat[5::13] = np.inf
    return x.astype(dtype)


def ref_clip_by_norm(x, c, axes):
    """float64 reference of TF's clip_by_norm."""
    x64 = x.astype(np.float64)
    c = max(c, 0.0)
    with np.errstate(all="ignore"):
        n = np.sqrt(np.sum(x64 * x64, axis=axes, keepdims=True))
        return x64 * c / np.maximum(n, c)


SHAPES = [(0,), (1,), (5,), (4, 6), (3, 0, 2), (7, 5, 3), (130, 600), (3, 40000)]


# --------------------------------------------------------- elementwise ops

@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:6] + [(130, 600)])
@pytest.mark.parametrize("n_threads", THREADS)
def test_clip_by_value_layouts(dtype, shape, n_threads):
    base = rand(shape, dtype, special=True)
    expected = np.maximum(np.minimum(base, dtype(40)), dtype(3))
    for name, x in layouts(base):
        before = x.copy()
        got = clipcore.clip_by_value(x, 3, 40, n_threads=n_threads)
        assert got.dtype == x.dtype and got.shape == x.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
        np.testing.assert_array_equal(x, before, err_msg=name)       # input untouched
        if x.flags.writeable:
            assert clipcore.clip_by_value_(x, 3, 40, n_threads=n_threads) is x
            np.testing.assert_array_equal(x, expected, err_msg=name)


@pytest.mark.parametrize("n_threads", [2, 7])   # 7: more threads than cores, chunks taken over
def test_elementwise_in_many_chunks(n_threads):
    # 700,000 positions are 43 chunks, which the threads claim block by block.
    base = rand((1000, 700), np.float32, special=True)
    expected = np.maximum(np.minimum(base, np.float32(40)), np.float32(3))
    for name, x in layouts(base):
        np.testing.assert_array_equal(clipcore.relu(x, n_threads=n_threads),
                                      np.maximum(base, np.float32(0)), err_msg=name)
        if x.flags.writeable:
            clipcore.clip_by_value_(x, 3, 40, n_threads=n_threads)
            np.testing.assert_array_equal(x, expected, err_msg=name)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INT_DTYPES)
@pytest.mark.parametrize("n_threads", THREADS)
def test_maximum_minimum_relu_broadcasting(dtype, n_threads):
    x = rand((300, 1, 257), dtype, 1, special=True)
    y = rand((5, 1), dtype, 2, special=True)
    for op, ref in [(clipcore.maximum, np.maximum), (clipcore.minimum, np.minimum)]:
        for a, b in [(x, y), (y, x), (x, x), (x[:, :, ::-2], y[::-1])]:
            with np.errstate(invalid="ignore"):
                np.testing.assert_array_equal(op(a, b, n_threads=n_threads), ref(a, b))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(clipcore.relu(x, n_threads=n_threads),
                                      np.maximum(x, dtype(0)))


def test_nan_propagation_and_signed_zero():
    x = np.array([np.nan, 1.0, -0.0, 0.0, -np.inf, np.inf], np.float32)
    y = np.array([1.0, np.nan, 0.0, -0.0, 0.0, 0.0], np.float32)
    mx = clipcore.maximum(x, y)
    np.testing.assert_array_equal(mx, [np.nan, np.nan, 0.0, 0.0, 0.0, np.inf])
    # TF's rule for equal operands: the first one wins.
    assert list(np.signbit(mx[2:4])) == [True, False]
    mn = clipcore.minimum(x, y)
    np.testing.assert_array_equal(mn, [np.nan, np.nan, 0.0, 0.0, -np.inf, 0.0])
    np.testing.assert_array_equal(clipcore.relu(x), [np.nan, 1.0, 0.0, 0.0, 0.0, np.inf])
    # clip_by_value: NaN stays NaN, a NaN bound makes everything NaN, min > max gives min.
    np.testing.assert_array_equal(clipcore.clip_by_value(x, -1.0, 2.0),
                                  [np.nan, 1.0, 0.0, 0.0, -1.0, 2.0])
    assert np.isnan(clipcore.clip_by_value(x, np.nan, 2.0)).all()
    assert np.isnan(clipcore.clip_by_value(x, -1.0, np.nan)).all()
    np.testing.assert_array_equal(clipcore.clip_by_value(x[1:], 3.0, 2.0), np.full(5, 3.0))
    # NaN inside array bounds.
    lo = np.array([0.0, 0.0, np.nan, 0.0, 0.0, 0.0], np.float32)
    got = clipcore.clip_by_value(np.ones(6, np.float32), lo, 2.0)
    np.testing.assert_array_equal(np.isnan(got), [False, False, True, False, False, False])


def test_out_argument():
    x = rand((64, 33), np.float32, 3)
    out = np.empty_like(x)
    assert clipcore.clip_by_value(x, -1.0, 1.0, out=out) is out
    np.testing.assert_array_equal(out, np.clip(x, -1.0, 1.0))
    assert clipcore.relu(x, out=out) is out
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    assert clipcore.maximum(x, 0.5, out=out) is out
    np.testing.assert_array_equal(out, np.maximum(x, 0.5))
    assert clipcore.clip_by_norm(x, 1.0, axes=1, out=out) is out
    np.testing.assert_allclose(out, ref_clip_by_norm(x, 1.0, 1), rtol=1e-6)
    out_f = np.empty_like(x, order="F")                 # another layout than x
    clipcore.clip_by_norm(x, 1.0, axes=0, out=out_f)
    np.testing.assert_allclose(out_f, ref_clip_by_norm(x, 1.0, 0), rtol=1e-6)
    # out= the input itself is in place; out overlapping the input partially works too.
    y = x.copy()
    clipcore.clip_by_value(y, -1.0, 1.0, out=y)
    np.testing.assert_array_equal(y, np.clip(x, -1.0, 1.0))
    z = np.arange(10, dtype=np.float64)
    clipcore.maximum(z[:-1], z[1:], out=z[1:])
    np.testing.assert_array_equal(z, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    z = np.arange(10, dtype=np.float64)
    clipcore.clip_by_value(z[1:], z[:-1], 100.0, out=z[:-1])
    np.testing.assert_array_equal(z[:-1], np.arange(1, 10))
    with pytest.raises(ValueError, match="out must have shape"):
        clipcore.relu(x, out=np.empty((64, 32), np.float32))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        clipcore.relu(x, out=np.empty((64, 33), np.float64))
    ro = np.empty_like(x)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writable"):
        clipcore.relu(x, out=ro)


def test_scalars_and_lists_like_tensorflow():
    # Python numbers and lists as the tensor take tf.convert_to_tensor's dtypes
    # (float32, int32), NumPy out (test_tf_graph.py compares with TF itself).
    assert clipcore.clip_by_value(5, 0, 3) == 3
    assert isinstance(clipcore.clip_by_value(5, 0, 3), np.int32)
    assert isinstance(clipcore.relu(-2.5), np.float32) and clipcore.relu(-2.5) == 0.0
    np.testing.assert_array_equal(clipcore.clip_by_value([1, 5, 9], 2, 6), [2, 5, 6])
    assert clipcore.clip_by_value([1, 5, 9], 2, 6).dtype == np.int32
    assert clipcore.clip_by_value([1, 2 ** 40], 2, 6).dtype == np.int64   # as TF: too big for int32
    got = clipcore.maximum([1.0, 2], [1.5, 0])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [1.5, 2.0])
    with pytest.raises(TypeError, match="y"):         # TF: int32 first, 1.5 is no int32
        clipcore.maximum([1, 2], [1.5, 0])
    got = clipcore.clip_by_norm([3.0, 4.0], 1.0)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [0.6, 0.8], rtol=1e-6)
    assert clipcore.norm([3.0, 4.0]) == 5.0 and clipcore.norm([3.0, 4.0]).dtype == np.float32
    # Bounds keep their exact value until converted to t's dtype.
    assert clipcore.clip_by_value(np.array([0.0]), 0.1, 1.0)[0] == 0.1
    # Bounds follow TF's conversion: wrapped for unsigned ints, cast from NumPy arrays.
    u8 = np.array([1, 2, 3, 4], np.uint8)
    np.testing.assert_array_equal(clipcore.clip_by_value(u8, -1, 3), [255] * 4)
    np.testing.assert_array_equal(clipcore.clip_by_value(u8, np.float64(2.7), 3), [2, 2, 3, 3])


def test_indexed_slices_like_objects():
    class Slices(types.SimpleNamespace):
        pass

    values = np.array([[3.0, 4.0], [0.3, 0.4]])
    s = Slices(values=values, indices=np.array([0, 5]), dense_shape=(10, 2))
    got = clipcore.clip_by_norm(s, 1.0, axes=1)
    assert isinstance(got, Slices) and got.indices is s.indices and got.dense_shape == (10, 2)
    np.testing.assert_allclose(got.values, [[0.6, 0.8], [0.3, 0.4]])
    np.testing.assert_array_equal(values, [[3.0, 4.0], [0.3, 0.4]])
    got = clipcore.clip_by_value(s, 0.0, 1.0)
    np.testing.assert_array_equal(got.values, [[1.0, 1.0], [0.3, 0.4]])
    (g,), norm = clipcore.clip_by_global_norm([s], 2.5)
    assert isinstance(g, Slices) and norm == pytest.approx(np.sqrt(25.25))
    assert clipcore.clip_by_value_(s, 0.0, 0.35) is s
    np.testing.assert_array_equal(values, [[0.35, 0.35], [0.3, 0.35]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_in_place_twins_follow_the_rules(dtype):
    # In place with a scalar operand, float buffers take hand-written AVX-512
    # loops (four vectors per step, then a scalar tail): every length around
    # the vector widths, at several starts, against TF's rules written in NumPy.
    rng = np.random.default_rng(11)
    special = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 0.5, -0.5, 2.0], dtype)
    s = dtype(0.25)

    def maximum(a, b):
        return np.where(a < b, b, a)

    def minimum(a, b):
        return np.where(b < a, b, a)

    cases = [(lambda v: clipcore.maximum(v, s, out=v), lambda a: maximum(a, s)),
             (lambda v: clipcore.minimum(v, s, out=v), lambda a: minimum(a, s)),
             (lambda v: clipcore.relu_(v), lambda a: maximum(a, dtype(0))),
             (lambda v: clipcore.clip_by_value_(v, -0.25, 0.75),
              lambda a: maximum(minimum(a, dtype(0.75)), dtype(-0.25)))]
    for n in (0, 1, 7, 15, 16, 17, 63, 64, 65, 127, 128, 129, 1000, 4099):
        for start in (0, 1, 3):
            base = rng.standard_normal(n + start).astype(dtype)
            base[start:] = np.where(rng.random(n) < 0.2, rng.choice(special, n), base[start:])
            for run, rule in cases:
                buf = base.copy()
                v = buf[start:]
                want = rule(v.copy())
                run(v)
                assert v.tobytes() == want.tobytes(), (n, start)
            # the scaling pass of the norm clips: x * scale in x's dtype
            finite = np.nan_to_num(base[start:], posinf=3.0, neginf=-3.0)
            if n and np.any(finite):
                v = finite.copy()
                norm = clipcore.clip_by_global_norm_([v], 1e-3)
                scale = dtype(1e-3 / norm) if dtype == np.float32 else 1e-3 / norm
                np.testing.assert_array_equal(v, finite * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_large_outputs_equal_the_plain_loops(dtype, n_threads):
    # Outputs of 16 MiB and more go to memory through streaming stores (their
    # own AVX-512 loops, plain stores up to the output's first 64-byte
    # boundary and for the tail): the values must be the plain loops' bit for
    # bit, NaN, zeros and infinities included, at any input and output start.
    n = (1 << 24) // np.dtype(dtype).itemsize + 37
    rng = np.random.default_rng(3)
    x = rng.standard_normal(n + 3).astype(dtype)
    obuf = np.empty(n + 3, dtype)
    special = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 0.5, -0.5, 2.0], dtype)
    ops = [lambda a, **k: clipcore.maximum(a, dtype(0.0), **k),
           lambda a, **k: clipcore.minimum(a, dtype(-0.0), **k),
           lambda a, **k: clipcore.clip_by_value(a, -0.25, 0.75, **k)]
    for start in (0, 1, 3):
        v = x[start:start + n]
        for part in (slice(0, 40), slice(n // 2, n // 2 + 40), slice(n - 40, n)):
            v[part] = np.resize(special, 40)
        for op in ops:
            want = np.concatenate([op(v[k:k + 1000]) for k in range(0, n, 1000)])  # plain loops
            assert op(v, n_threads=n_threads).tobytes() == want.tobytes()
            out = obuf[start:start + n]
            op(v, out=out, n_threads=n_threads)
            assert out.tobytes() == want.tobytes()
    # The scaling of the norm clips: clip_by_norm of one long row, and
    # clip_by_global_norm's outputs; against the in-place twins (plain loops).
    finite = np.nan_to_num(x[1:n + 1], posinf=3.0, neginf=-3.0)
    want = finite.copy()
    clipcore.clip_by_norm_(want, 10.0, n_threads=n_threads)
    for out in (None, obuf[3:n + 3]):
        got = clipcore.clip_by_norm(finite, 10.0, out=out, n_threads=n_threads)
        assert got.tobytes() == want.tobytes()
    (got,), norm = clipcore.clip_by_global_norm([finite], 10.0, n_threads=n_threads)
    want = finite.copy()
    assert clipcore.clip_by_global_norm_([want], 10.0, n_threads=n_threads) == pytest.approx(
        float(norm), rel=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


# --------------------------------------------------------------- norm ops

AXES = [None, 0, -1, [0], [1], [0, 1], [-2, -1], [], (0, 2), [1, 2]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7, 5, 3), (130, 600, 1), (3, 40000, 1), (70000, 3, 1),
                                   (2, 0, 3)])
@pytest.mark.parametrize("axes", AXES, ids=str)
def test_clip_by_norm_layouts(dtype, shape, axes):
    base = rand(shape, dtype, 4) * 3
    axes_t = None if axes is None else ([axes] if isinstance(axes, int) else list(axes))
    reduce_axes = tuple(range(len(shape))) if axes_t is None else tuple(axes_t)
    for c in [1.0, 0.0, 1e9]:
        expected = ref_clip_by_norm(base, c, reduce_axes)
        for name, x in layouts(base):
            before = x.copy()
            results = []
            for nt in THREADS:
                got = clipcore.clip_by_norm(x, c, axes, n_threads=nt)
                assert got.dtype == x.dtype and got.shape == x.shape
                np.testing.assert_allclose(got, expected, rtol=2e-6 if dtype == np.float32
                                           else 1e-14, atol=1e-30, err_msg=f"{name} {nt}")
                results.append(got)
            for r in results[1:]:       # bitwise the same for any number of threads
                np.testing.assert_array_equal(r, results[0], err_msg=name)
            np.testing.assert_array_equal(x, before, err_msg=name)
            if x.flags.writeable:
                assert clipcore.clip_by_norm_(x, c, axes) is x
                np.testing.assert_array_equal(x, results[0], err_msg=name)


def test_clip_by_norm_special_values():
    x = np.array([[np.nan, 1.0], [3.0, 4.0], [0.0, 0.0], [np.inf, 1.0]], np.float32)
    got = clipcore.clip_by_norm(x, 1.0, axes=1)
    np.testing.assert_array_equal(np.isnan(got), [[True, True], [False, False],
                                                  [False, False], [True, False]])
    np.testing.assert_allclose(got[1], [0.6, 0.8])
    np.testing.assert_array_equal(got[2], [0.0, 0.0])       # zero norm: zeros, not NaN
    assert got[3, 1] == 0.0
    # negative clip_norm is 0; clip_norm 0 with a zero slice is 0/0 (NaN), as in TF
    np.testing.assert_array_equal(clipcore.clip_by_norm(x[1:2], -3.0), [[0.0, 0.0]])
    assert np.isnan(clipcore.clip_by_norm(x[2:3], 0.0)).all()
    # float32 squares beyond 3.4e38: the one intended difference from TF
    big = np.array([3e20, 4e20], np.float32)
    np.testing.assert_allclose(clipcore.clip_by_norm(big, 1.0), [0.6, 0.8], rtol=1e-6)
    assert clipcore.norm(big) == np.float32(5e20)
    half = np.array([300.0, 400.0], np.float16)
    np.testing.assert_allclose(clipcore.clip_by_norm(half, 1.0).astype(float), [0.6, 0.8],
                               rtol=2e-3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_norm_against_numpy(dtype):
    x = rand((6, 5, 4), dtype, 5)
    x64 = x.astype(np.float64)
    rtol = 2e-3 if dtype == np.float16 else 1e-6
    for axis in [None, 0, 1, -1]:
        for ord, f in [("euclidean", lambda v, a: np.sqrt(np.sum(v * v, axis=a))),
                       (1, lambda v, a: np.sum(np.abs(v), axis=a)),
                       (np.inf, lambda v, a: np.max(np.abs(v), axis=a)),
                       (3, lambda v, a: np.sum(np.abs(v) ** 3, axis=a) ** (1 / 3))]:
            got = clipcore.norm(x, ord=ord, axis=axis)
            assert np.asarray(got).dtype == dtype
            np.testing.assert_allclose(np.asarray(got, np.float64), f(x64, axis), rtol=rtol)
            kept = clipcore.norm(x, ord=ord, axis=axis, keepdims=True)
            assert kept.shape == np.sum(x, axis=axis, keepdims=True).shape
    for axis in [(0, 1), (2, 0), (-1, -2)]:
        for ord in ["fro", 1, 2, np.inf]:
            got = clipcore.norm(x, ord=ord, axis=axis)
            m = np.moveaxis(x64, axis, (-2, -1))
            ref = np.linalg.norm(m, ord={"fro": "fro"}.get(ord, ord), axis=(-2, -1))
            np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=rtol)


def test_norm_reductions_do_not_depend_on_threads():
    rng = np.random.default_rng(6)
    for shape, axis in [((5_000_000,), None), ((3, 2_000_000), 1), ((2_000_000, 3), 0),
                        ((512, 4096), 1), ((4096, 512), 0)]:
        x = rng.normal(size=shape).astype(np.float32)
        for ord in ["euclidean", 1, np.inf]:
            results = [clipcore.norm(x, ord=ord, axis=axis, n_threads=nt) for nt in THREADS]
            for r in results[1:]:
                np.testing.assert_array_equal(r, results[0])
        c = [clipcore.clip_by_norm(x, 1.0, axes=axis, n_threads=nt) for nt in THREADS]
        for r in c[1:]:
            np.testing.assert_array_equal(r, c[0])


def test_clip_by_average_norm_numpy():
    x = rand((20, 30), np.float64, 7)
    n = np.sqrt(np.sum(x * x))
    c = 0.5 * n / x.size
    np.testing.assert_allclose(clipcore.clip_by_average_norm(x, c), x * c * x.size / n,
                               rtol=1e-12)
    np.testing.assert_array_equal(clipcore.clip_by_average_norm(x, -1.0), x)
    assert np.isnan(clipcore.clip_by_average_norm(np.zeros(3), 0.0)).all()


# ----------------------------------------------------- clip_by_global_norm

@pytest.mark.parametrize("n_threads", THREADS)
def test_clip_by_global_norm_numpy(n_threads):
    rng = np.random.default_rng(8)
    grads = [rng.normal(size=s).astype(np.float32) for s in [(300, 200), (7,), (0,), ()]]
    grads += [np.asfortranarray(rng.normal(size=(50, 40))).astype(np.float32),
              rng.normal(size=(60, 80)).astype(np.float32)[:, ::3],
              rng.normal(size=(9,)).astype(np.float64), None,
              rng.normal(size=(11,)).astype(np.float16)]
    before = [None if g is None else g.copy() for g in grads]
    total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads if g is not None))
    clipped, norm = clipcore.clip_by_global_norm(grads, 0.5 * total, n_threads=n_threads)
    assert type(norm) is np.float64             # float32 and float64 inputs promote
    assert norm == pytest.approx(total, rel=1e-12)
    assert len(clipped) == len(grads) and clipped[7] is None
    for g, c, b in zip(grads, clipped, before):
        if g is None:
            continue
        np.testing.assert_array_equal(g, b)     # inputs untouched
        assert isinstance(c, np.ndarray) and c.dtype == g.dtype and c.shape == g.shape
        assert not np.shares_memory(c, g)
        np.testing.assert_allclose(c.astype(np.float64), g.astype(np.float64) * 0.5,
                                   rtol=2e-3 if g.dtype == np.float16 else 1e-6)
    assert clipped[4].flags.f_contiguous


def test_clip_by_global_norm_use_norm_and_scale_arithmetic():
    g = [np.array([3.0, 4.0], np.float32)]
    (c,), norm = clipcore.clip_by_global_norm(g, 1.0, use_norm=10.0)
    assert norm == 10.0 and type(norm) is float     # returned as given
    np.testing.assert_allclose(c, [0.3, 0.4], rtol=1e-7)
    (c,), _ = clipcore.clip_by_global_norm(g, 1.0, use_norm=np.float32(-5.0))
    np.testing.assert_allclose(c, [-0.6, -0.8], rtol=1e-7)   # honoured as given, like TF
    (c,), _ = clipcore.clip_by_global_norm(g, 0.0)
    np.testing.assert_array_equal(c, [0.0, 0.0])
    (c,), _ = clipcore.clip_by_global_norm([np.zeros(2, np.float32)], 0.0)
    assert np.isnan(c).all()                               # 0 * (1/0): TF's NaN


def test_global_norm_keeps_the_core_contract():
    x = [np.array([3.0, 4.0], np.float32), None]
    assert clipcore.global_norm(x) == 5.0 and type(clipcore.global_norm(x)) is float
    assert clipcore.global_norm(x, norm_type=1) == 7.0
    assert clipcore.global_norm(x, "name") == 5.0            # TF's positional name
    assert clipcore.global_norm([]) == 0.0


# ----------------------------------------------------------------- errors

def test_errors_name_the_argument():
    x = np.ones((2, 3), np.float32)
    cases = [
        (TypeError, "t_list", lambda: clipcore.clip_by_global_norm(x, 1.0)),
        (TypeError, "t_list", lambda: clipcore.clip_by_global_norm("abc", 1.0)),
        (TypeError, "t_list", lambda: clipcore.global_norm(g for g in [x])),
        (TypeError, r"t_list\[1\]", lambda: clipcore.clip_by_global_norm([x, np.ones(2, int)], 1)),
        (TypeError, "clip_norm", lambda: clipcore.clip_by_global_norm([x], "a")),
        (ValueError, "clip_norm", lambda: clipcore.clip_by_global_norm([x], np.ones(2))),
        (ValueError, "use_norm", lambda: clipcore.clip_by_global_norm([x], 1.0, np.ones(2))),
        (ValueError, "clip_value_min", lambda: clipcore.clip_by_value(x, np.zeros((2, 2, 3)), 1)),
        (ValueError, "clip_value_max", lambda: clipcore.clip_by_value(x, 0, np.ones(2))),
        (TypeError, "clip_value_min", lambda: clipcore.clip_by_value(np.ones(3, np.int32), 2.5, 4)),
        (TypeError, "t must be a float or integer", lambda: clipcore.clip_by_value(np.ones(2, bool), 0, 1)),
        (TypeError, "t must be a float or integer", lambda: clipcore.clip_by_value(["a"], 0, 1)),
        (TypeError, "t must be a floating-point", lambda: clipcore.clip_by_norm(np.ones(3, int), 1.0)),
        (TypeError, "clip_norm", lambda: clipcore.clip_by_norm(x, "a")),
        (ValueError, "axes", lambda: clipcore.clip_by_norm(x, 1.0, axes=2)),
        (ValueError, "axes", lambda: clipcore.clip_by_norm(x, 1.0, axes=[1, -1])),
        (TypeError, "axes", lambda: clipcore.clip_by_norm(x, 1.0, axes=1.0)),
        (ValueError, "'ord'", lambda: clipcore.norm(x, ord="fro")),
        (ValueError, "'ord'", lambda: clipcore.norm(x, ord=-1)),
        (ValueError, "'ord'", lambda: clipcore.norm(x, ord=0.5, axis=(0, 1))),
        (ValueError, "'axis'", lambda: clipcore.norm(x, axis=[1])),
        (ValueError, "'axis'", lambda: clipcore.norm(x, axis=(0, 0))),
        (ValueError, "axis", lambda: clipcore.norm(x, axis=5)),
        (TypeError, "tensor must be a floating-point", lambda: clipcore.norm(np.ones(3, int))),
        (ValueError, "x and y cannot be broadcast", lambda: clipcore.maximum(x, np.ones(2))),
        (TypeError, "features", lambda: clipcore.relu_([1.0, -1.0])),
        (ValueError, "features", lambda: clipcore.relu_(np.frombuffer(b"\0" * 8))),
        (TypeError, "n_threads", lambda: clipcore.relu(x, n_threads=1.5)),
        (ValueError, "n_threads", lambda: clipcore.clip_by_norm(x, 1.0, n_threads=0)),
        (ValueError, "clip_norm must be a scalar", lambda: clipcore.clip_by_average_norm(x, [1.0, 2.0])),
    ]
    for exc, match, fn in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_in_place_validates_before_writing():
    x = np.array([[-2.0, 5.0], [3.0, 4.0]], np.float32)
    before = x.copy()
    with pytest.raises(ValueError):
        clipcore.clip_by_value_(x, 0.0, np.ones(3))
    with pytest.raises(TypeError):
        clipcore.clip_by_value_(x, "a", 1.0)
    with pytest.raises(ValueError):
        clipcore.clip_by_norm_(x, 1.0, axes=3)
    np.testing.assert_array_equal(x, before)


def test_in_place_writes_caller_memory():
    base = np.arange(-20, 20, dtype=np.float32).reshape(5, 8)
    view = base[1:4, ::2]                       # strided view into the caller's array
    expected = base.copy()
    expected[1:4, ::2] = np.clip(view, -3, 3)
    clipcore.clip_by_value_(view, -3, 3)
    np.testing.assert_array_equal(base, expected)
    base2 = np.arange(-20, 20, dtype=np.float64).reshape(5, 8)
    ref = base2.copy()
    ref[:, 1::3] = ref_clip_by_norm(ref[:, 1::3], 2.0, (0,))
    clipcore.clip_by_norm_(base2[:, 1::3], 2.0, axes=0)
    np.testing.assert_allclose(base2, ref, rtol=1e-14)
    buf = bytearray(np.array([-1.0, 2.0], np.float32).tobytes())
    clipcore.relu_(memoryview(buf).cast("f"))
    np.testing.assert_array_equal(np.frombuffer(buf, np.float32), [0.0, 2.0])


# ------------------------------------------------------------------ torch

@pytest.mark.requires_torch
def test_torch_in_torch_out():
    import torch
    x = torch.tensor([[-3.0, 0.5], [4.0, -0.25]])
    x_before = x.clone()
    got = clipcore.clip_by_value(x, -1.0, 1.0)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert torch.equal(got, torch.clamp(x, -1.0, 1.0)) and torch.equal(x, x_before)
    n = clipcore.clip_by_norm(x.double(), 1.0, axes=1)
    assert n.dtype == torch.float64
    np.testing.assert_allclose(n.numpy(), ref_clip_by_norm(x.double().numpy(), 1.0, (1,)))
    assert torch.equal(clipcore.relu(x), torch.relu(x))
    assert torch.equal(clipcore.maximum(x, torch.zeros(2)), torch.maximum(x, torch.zeros(2)))
    norm = clipcore.norm(x, axis=0)
    assert isinstance(norm, torch.Tensor)
    np.testing.assert_allclose(norm.numpy(), torch.linalg.vector_norm(x, dim=0).numpy())
    (c, none), gn = clipcore.clip_by_global_norm([x, None], 1.0)
    assert isinstance(c, torch.Tensor) and none is None
    assert isinstance(gn, torch.Tensor) and gn.dtype == torch.float32 and gn.ndim == 0
    # in place on the tensor's own memory; not behind autograd's back
    p = torch.tensor([-1.0, 2.0])
    assert clipcore.relu_(p) is p
    assert p.tolist() == [0.0, 2.0]
    q = torch.tensor([-1.0, 2.0], requires_grad=True)
    with pytest.raises(ValueError, match="features: the tensor requires grad"):
        clipcore.relu_(q)
    assert q.detach().tolist() == [-1.0, 2.0]
    with pytest.raises(TypeError, match="t"):
        clipcore.clip_by_value(torch.ones(2, dtype=torch.bfloat16), 0, 1)


# ----------------------------------------------------------- properties

finite_f32 = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9),
                        elements=st.floats(-1e6, 1e6, width=32))


@settings(max_examples=60, deadline=None)
@given(finite_f32, st.floats(0.01, 100), st.booleans())
def test_clip_by_norm_properties(x, c, last_axis):
    axes = -1 if last_axis else None
    got = clipcore.clip_by_norm(x, c, axes=axes).astype(np.float64)
    ax = (x.ndim - 1,) if last_axis else None
    n_in = np.sqrt(np.sum(x.astype(np.float64) ** 2, axis=ax, keepdims=True))
    n_out = np.sqrt(np.sum(got ** 2, axis=ax, keepdims=True))
    assert np.all(n_out <= c * (1 + 1e-5) + 1e-30)              # norm after <= clip_norm
    assert np.all(np.where(n_in <= c, np.abs(n_out - n_in) <= 1e-6 * n_in, True))
    scale = np.where(n_in > 0, n_out / np.where(n_in > 0, n_in, 1), 1)
    np.testing.assert_allclose(got, x * scale, rtol=1e-5, atol=1e-30)   # direction kept


@settings(max_examples=60, deadline=None)
@given(finite_f32, st.floats(-1e6, 1e6, width=32), st.floats(-1e6, 1e6, width=32))
def test_clip_by_value_properties(x, a, b):
    got = clipcore.clip_by_value(x, a, b)
    if a <= b:
        assert np.all((got >= a) & (got <= b))
        np.testing.assert_array_equal(got[(x >= a) & (x <= b)], x[(x >= a) & (x <= b)])
    else:
        assert np.all(got == np.float32(a))


# ------------------------------------------------------------- packaging

def test_import_does_not_load_frameworks():
    code = ("import sys, numpy as np, clipcore\n"
            "clipcore.clip_by_value(np.ones(3), 0, 1); clipcore.clip_by_norm([1.0], 1.0)\n"
            "clipcore.clip_by_global_norm([np.ones(2)], 1.0); clipcore.norm(np.ones(2))\n"
            "assert 'tensorflow' not in sys.modules and 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", [_ops, _global])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------- output memory reuse

def test_large_outputs_reuse_only_memory_nothing_refers_to():
    g = [np.full((1024, 1024), 3.0, np.float32) for _ in range(4)]        # 16 MB
    scale = 1.0 / np.sqrt(9.0 * g[0].size * 4)
    a, _ = clipcore.clip_by_global_norm(g, 1.0)
    b, _ = clipcore.clip_by_global_norm(g, 2.0)                 # a is alive: new memory
    assert not np.shares_memory(a[0], b[0])
    np.testing.assert_allclose(a[0], 3.0 * scale, rtol=1e-6)     # a untouched by b
    view = a[2][10:20]                                           # a view outlives a
    del a
    c, _ = clipcore.clip_by_global_norm(g, 4.0)
    assert not np.shares_memory(c[2], view)
    np.testing.assert_allclose(view, 3.0 * scale, rtol=1e-6)
    recent = {b[0].ctypes.data, c[0].ctypes.data}                # the blocks kept
    del view, b, c
    d, _ = clipcore.clip_by_global_norm(g, 1.0)                  # now free: reused
    assert d[0].ctypes.data in recent
    assert all(o.ctypes.data % 64 == 0 and o.flags.writeable for o in d)
    np.testing.assert_allclose(d[3], 3.0 * scale, rtol=1e-6)
    # Elementwise results of the same size reuse it too, and keep it while alive.
    x = np.arange(4 << 20, dtype=np.float32)
    del d
    r1 = clipcore.clip_by_value(x, 0.0, 10.0)
    r2 = clipcore.clip_by_value(x, 5.0, 6.0)
    assert not np.shares_memory(r1, r2)
    np.testing.assert_array_equal(r1[:12], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10])


@pytest.mark.requires_torch
def test_framework_results_keep_their_memory():
    import torch
    g = [torch.full((1024, 1024), 3.0) for _ in range(4)]
    (t0, *_), _ = clipcore.clip_by_global_norm(g, 1.0)
    expected = t0.clone()
    for _ in range(3):
        clipcore.clip_by_global_norm(g, 100.0)                   # results dropped at once
    assert torch.equal(t0, expected)
