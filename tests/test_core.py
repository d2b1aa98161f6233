"""The core: global_norm, clip_by_global_norm_ and Plan against a NumPy float64 reference."""
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import clipcore
from clipcore import kernels

RNG = np.random.default_rng(20261124)
THREADS = [1, 2, 4]


def ref_norm(arrays, p=2.0):
    """Float64 reference over all elements (long double for the sum of squares)."""
    flat = [np.asarray(a, dtype=np.float64).ravel() for a in arrays if a is not None]
    x = np.concatenate(flat) if flat else np.zeros(0)
    if p == 2.0:
        return math.sqrt(math.fsum((x * x).tolist()))
    return float(np.linalg.norm(x, ord=p)) if x.size else 0.0


def make_list(shapes, dtype=np.float32, scale=1.0):
    return [(RNG.standard_normal(s) * scale).astype(dtype) for s in shapes]


def layouts(base):
    """Views of a 2-D float32 array: C, F, strided, transposed, reversed, 0-d."""
    return {
        "C": base,
        "F": np.asfortranarray(base),
        "transposed": base.T,
        "rows-strided": base[::3],
        "cols-strided": base[:, 1::2],
        "both-strided-T": base[::2, ::3].T,
        "reversed": base[::-1, ::-2],
        "column": base[:, 5],
        "0-d": base[2, 3, ...],
    }


# --- global_norm ---------------------------------------------------------------------

@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("shapes", [
    [(784, 256), (256,), (256, 128), (128,), (128, 10), (10,)],
    [(512,)] * 300,
    [(1 << 20,), (3,), (0,), (5, 0), (1,)] + [(7,)] * 100,
    [],
])
def test_global_norm_matches_reference(shapes, n_threads):
    arrays = make_list(shapes)
    got = clipcore.global_norm(arrays, n_threads=n_threads)
    assert got == pytest.approx(ref_norm(arrays), rel=1e-12, abs=0)


def test_empty_and_none_entries():
    assert clipcore.global_norm([]) == 0.0
    assert clipcore.global_norm(()) == 0.0
    assert clipcore.global_norm([None, None]) == 0.0
    a = np.array([3.0, 4.0], np.float32)
    assert clipcore.global_norm([None, a, None]) == 5.0
    assert clipcore.global_norm([np.zeros((0, 3), np.float32)]) == 0.0


@pytest.mark.parametrize("name", list(layouts(np.zeros((40, 30))).keys()))
def test_global_norm_non_contiguous(name):
    view = layouts(RNG.standard_normal((40, 30)).astype(np.float32))[name]
    assert clipcore.global_norm([view]) == pytest.approx(ref_norm([view]), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.longdouble, ">f4", ">f8"])
def test_global_norm_other_float_dtypes(dtype):
    arrays = [RNG.standard_normal((17, 5)).astype(dtype), RNG.standard_normal(9).astype(np.float32)]
    assert clipcore.global_norm(arrays) == pytest.approx(ref_norm(arrays), rel=1e-12)


def test_global_norm_unaligned_float32():
    raw = np.zeros(4 * 101 + 1, np.uint8)
    view = raw[1:].view(np.float32)
    view[:] = RNG.standard_normal(101)
    assert not view.flags.aligned
    assert clipcore.global_norm([view]) == pytest.approx(ref_norm([view]), rel=1e-12)


def test_bitwise_identical_across_thread_counts():
    # Many chunks of uneven buffers: a huge one beside a thousand tiny ones.
    arrays = make_list([(3_000_001,)] + [(int(n),) for n in RNG.integers(0, 50, 1000)])
    arrays += [np.asfortranarray(RNG.standard_normal((300, 301)).astype(np.float32))[::2].T]
    for p in [2.0, 1.0, np.inf, 3.0]:
        results = {clipcore.global_norm(arrays, norm_type=p, n_threads=n) for n in THREADS}
        results.add(clipcore.global_norm(arrays, norm_type=p))
        assert len(results) == 1, (p, results)


@pytest.mark.parametrize("p", [2.0, 1.0, np.inf, 3.0])
@pytest.mark.parametrize("where", [0, 7, 29])
def test_every_buffer_of_a_chunk_counts(p, where):
    # Thirty buffers share one chunk (and its accumulator lanes); the largest
    # values sit in one of them.
    arrays = [np.full(100 + i, 1.0, np.float32) for i in range(30)]
    arrays[where][:] = -5.0
    assert clipcore.global_norm(arrays, norm_type=p) == pytest.approx(ref_norm(arrays, p), rel=1e-12)


@pytest.mark.parametrize("value", [1e30, 3.4e38, 1e-30, 1e-45])
def test_no_overflow_or_underflow(value):
    arrays = [np.full(1000, value, np.float32), np.full((10, 10), -value, np.float32)]
    exact = float(np.float32(value)) * math.sqrt(1100)
    assert clipcore.global_norm(arrays) == pytest.approx(exact, rel=1e-12)
    assert math.isfinite(clipcore.global_norm(arrays)) and clipcore.global_norm(arrays) > 0


def test_relative_error_1e8_values_many_magnitudes():
    # 10^8 float32 values spread over 2^-60 .. 2^60, as 100 buffers of 10^6.
    rng = np.random.default_rng(7)
    arrays = [(rng.standard_normal(10**6) * np.exp2(rng.integers(-60, 61, 10**6))).astype(np.float32)
              for _ in range(100)]
    # Each square is exact in float64; each buffer's sum is long double; fsum of those.
    exact = math.sqrt(math.fsum(float(np.sum(np.square(a, dtype=np.float64), dtype=np.longdouble))
                                for a in arrays))
    got = clipcore.global_norm(arrays)
    assert abs(got - exact) / exact <= 1e-7


@pytest.mark.parametrize("n_threads", THREADS)
def test_nan_and_inf_propagate(n_threads):
    big = make_list([(200_000,), (300_000,)])
    with_inf = [a.copy() for a in big]
    with_inf[1][123_456] = np.inf
    assert clipcore.global_norm(with_inf, n_threads=n_threads) == np.inf
    with_nan = [a.copy() for a in with_inf]
    with_nan[0][7] = np.nan
    assert math.isnan(clipcore.global_norm(with_nan, n_threads=n_threads))
    for p in [1.0, np.inf, 3.0]:
        assert clipcore.global_norm(with_inf, norm_type=p, n_threads=n_threads) == np.inf
        assert math.isnan(clipcore.global_norm(with_nan, norm_type=p, n_threads=n_threads))


# --- clip_by_global_norm_ --------------------------------------------------------------

@pytest.mark.parametrize("n_threads", THREADS)
def test_clip_rescales_in_place(n_threads):
    arrays = make_list([(784, 256), (256,), (256, 128), (128,), (128, 10), (10,)])
    originals = [a.copy() for a in arrays]
    ids = [a.__array_interface__["data"][0] for a in arrays]
    norm = clipcore.clip_by_global_norm_(arrays, 15.0, n_threads=n_threads)
    assert norm == pytest.approx(ref_norm(originals), rel=1e-12)
    assert [a.__array_interface__["data"][0] for a in arrays] == ids
    scale = np.float32(15.0 / norm)
    for a, o in zip(arrays, originals):
        np.testing.assert_array_equal(a, o * scale)
    assert ref_norm(arrays) == pytest.approx(15.0, rel=1e-6)


def test_no_clip_needed_writes_nothing():
    arrays = make_list([(1000,), (30, 30)])
    originals = [a.copy() for a in arrays]
    for a in arrays:
        a.flags.writeable = True
    norm = clipcore.clip_by_global_norm_(arrays, 1e6)
    assert norm == pytest.approx(ref_norm(originals), rel=1e-12)
    for a, o in zip(arrays, originals):
        assert a.tobytes() == o.tobytes()
    # Exactly at the limit: still nothing written.
    assert clipcore.clip_by_global_norm_(arrays, norm) == norm
    for a, o in zip(arrays, originals):
        assert a.tobytes() == o.tobytes()


def test_no_clip_needed_leaves_negative_zero_and_nan_payload_bits():
    a = np.array([-0.0, 1.0, 0.0], np.float32)
    before = a.tobytes()
    clipcore.clip_by_global_norm_([a], 2.0)
    assert a.tobytes() == before


@pytest.mark.parametrize("name", list(layouts(np.zeros((40, 30))).keys()))
def test_clip_non_contiguous_views_in_callers_memory(name):
    base = RNG.standard_normal((40, 30)).astype(np.float32)
    view = layouts(base)[name]
    if name == "F":  # a copy made by the test itself: clip it and check it
        base = view
    before_base = base.copy()
    before_view = np.array(view, copy=True)
    clip = ref_norm([view]) / 4
    norm = clipcore.clip_by_global_norm_([view], clip)
    assert np.shares_memory(view, base)
    np.testing.assert_array_equal(view, before_view * np.float32(clip / norm))
    # Elements outside the view are untouched.
    mask = np.ones(base.shape, bool)
    layouts(mask)[name][...] = False if name != "F" else mask[...]
    if name != "F":
        np.testing.assert_array_equal(base[mask], before_base[mask])


@pytest.mark.parametrize("dtype", [np.float16, np.float64, ">f4", np.longdouble])
def test_clip_other_dtypes_in_place(dtype):
    a = (RNG.standard_normal((20, 7)) * 10).astype(dtype)
    b = RNG.standard_normal(5).astype(np.float32)
    before = [a.copy(), b.copy()]
    norm = clipcore.clip_by_global_norm_([a[:, ::2], b], 1.0)
    assert norm == pytest.approx(ref_norm([before[0][:, ::2], before[1]]), rel=1e-3)
    scale = 1.0 / norm
    np.testing.assert_allclose(a[:, ::2].astype(np.float64), before[0][:, ::2].astype(np.float64) * scale,
                               rtol=2e-3)
    np.testing.assert_array_equal(a[:, 1::2], before[0][:, 1::2])


def test_clip_zero_size_and_none():
    arrays = [np.zeros(0, np.float32), None, np.array([6.0, 8.0], np.float32)]
    assert clipcore.clip_by_global_norm_(arrays, 5.0) == 10.0
    np.testing.assert_array_equal(arrays[2], [3.0, 4.0])


def test_clip_norm_zero_and_inf():
    a = np.array([1.0, -2.0], np.float32)
    clipcore.clip_by_global_norm_([a], np.inf)
    np.testing.assert_array_equal(a, [1.0, -2.0])
    clipcore.clip_by_global_norm_([a], 0)
    np.testing.assert_array_equal(a, [0.0, -0.0])
    z = np.zeros(3, np.float32)
    assert clipcore.clip_by_global_norm_([z], 0.0) == 0.0    # 0 <= 0: nothing to clip, no NaN
    np.testing.assert_array_equal(z, 0.0)


def test_huge_norm_clipped_to_small_keeps_precision():
    # The scale 0.125 / 3.4e38 is subnormal in float32: applied in float64 instead.
    a = np.array([3.3982123e38, -1.0e38], np.float32)
    norm = clipcore.clip_by_global_norm_([a], 0.125)
    np.testing.assert_allclose(a, np.array([3.3982123e38, -1.0e38]) * (0.125 / norm), rtol=1e-7)


def test_use_norm_is_honoured():
    a = np.array([3.0, 4.0], np.float32)
    assert clipcore.clip_by_global_norm_([a], 1.0, use_norm=10.0) == 10.0
    np.testing.assert_allclose(a, [0.3, 0.4], rtol=1e-6)
    b = np.array([3.0, 4.0], np.float32)
    assert clipcore.clip_by_global_norm_([b], 1.0, use_norm=np.float32(0.5)) == 0.5
    np.testing.assert_array_equal(b, [3.0, 4.0])


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_norm_tf_rule_and_error(bad):
    a = np.array([1.0, bad, 2.0], np.float32)
    b = np.ones((3, 3), np.float32)[::2]
    norm = clipcore.clip_by_global_norm_([a, b], 1.0)
    assert not math.isfinite(norm)
    assert np.isnan(a).all() and np.isnan(b).all()

    a = np.array([1.0, bad, 2.0], np.float32)
    b = np.ones(4, np.float32)
    before = [a.tobytes(), b.tobytes()]
    with pytest.raises(ValueError, match="not finite"):
        clipcore.clip_by_global_norm_([a, b], 1.0, error_if_nonfinite=True)
    assert [a.tobytes(), b.tobytes()] == before
    with pytest.raises(ValueError, match="not finite"):
        clipcore.clip_by_global_norm_([b], 1.0, use_norm=bad, error_if_nonfinite=True)
    assert b.tobytes() == before[1]


@pytest.mark.parametrize("p", [1.0, np.inf, 3.0, 0.5])
def test_clip_with_other_norm_types(p):
    arrays = make_list([(100,), (10, 10)])
    originals = [a.copy() for a in arrays]
    norm = clipcore.clip_by_global_norm_(arrays, 1.0, norm_type=p)
    assert norm == pytest.approx(ref_norm(originals, p), rel=1e-10)
    assert clipcore.global_norm(arrays, norm_type=p) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.requires_torch
def test_torch_tensors_in_place():
    import torch
    t = torch.randn(300, 200)
    v = torch.randn(50, 40).t()          # non-contiguous
    originals = [t.clone(), v.clone()]
    norm = clipcore.clip_by_global_norm_([t, v], 2.0)
    ref = math.sqrt(sum(float((o.double() ** 2).sum()) for o in originals))
    assert norm == pytest.approx(ref, rel=1e-12)
    torch.testing.assert_close(t, originals[0] * (2.0 / norm), rtol=1e-6, atol=0)
    torch.testing.assert_close(v, originals[1] * (2.0 / norm), rtol=1e-6, atol=0)
    assert clipcore.global_norm([t, v]) == pytest.approx(2.0, rel=1e-6)
    plan = clipcore.Plan([t, v])
    plan.clip_by_global_norm_(1.0)
    assert clipcore.global_norm([t, v]) == pytest.approx(1.0, rel=1e-6)


def test_buffer_protocol_objects_in_place():
    import array
    buf = array.array("f", [3.0, 4.0])
    assert clipcore.clip_by_global_norm_([buf], 1.0) == 5.0
    assert list(buf) == pytest.approx([0.6, 0.8])
    mv = memoryview(bytearray(8)).cast("f")
    mv[0], mv[1] = 6.0, 8.0
    assert clipcore.clip_by_global_norm_([mv], 5.0) == 10.0
    assert mv.tolist() == [3.0, 4.0]


def test_in_place_path_allocates_nothing_proportional_to_data():
    import tracemalloc
    arrays = make_list([(4_000_000,), (1000, 1000)])
    plan = clipcore.Plan(arrays)
    clipcore.clip_by_global_norm_(arrays, 1.0)  # warm up
    tracemalloc.start()
    for _ in range(3):
        clipcore.clip_by_global_norm_(arrays, 1e-3)
        plan.clip_by_global_norm_(1e-6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024, peak     # the data are 20 MB


# --- bad input: a clear error and nothing modified -------------------------------------

def snapshot(arrays):
    return [a.tobytes() for a in arrays]


@pytest.mark.parametrize("t_list, exc, match", [
    (np.ones(3, np.float32), TypeError, "t_list must be a list or tuple"),
    ("abc", TypeError, "t_list must be a list or tuple"),
    (42, TypeError, "t_list must be a list or tuple"),
    ({"a": 1}, TypeError, "t_list must be a list or tuple"),
])
def test_bad_t_list(t_list, exc, match):
    with pytest.raises(exc, match=match):
        clipcore.global_norm(t_list)
    with pytest.raises(exc, match=match):
        clipcore.clip_by_global_norm_(t_list, 1.0)
    with pytest.raises(exc, match=match):
        clipcore.Plan(t_list)


@pytest.mark.parametrize("bad, exc, match", [
    ("abc", TypeError, r"t_list\[2\]"),
    (object(), TypeError, r"t_list\[2\]"),
    (np.arange(4), TypeError, r"t_list\[2\].*int64"),
    (np.arange(4, dtype=np.int32), TypeError, r"t_list\[2\].*int32"),
    (np.ones(3, bool), TypeError, r"t_list\[2\].*bool"),
    (np.ones(3, np.complex64), TypeError, r"t_list\[2\].*complex64"),
    ([1.0, 2.0], TypeError, r"t_list\[2\].*list.*in place"),
])
def test_bad_entries_raise_and_modify_nothing(bad, exc, match):
    good = make_list([(100,), (10, 10)], scale=10.0)
    t_list = good + [bad]
    before = snapshot(good)
    with pytest.raises(exc, match=match):
        clipcore.clip_by_global_norm_(t_list, 1.0)
    with pytest.raises(exc, match=match):
        clipcore.Plan(t_list)
    assert snapshot(good) == before


def test_read_only_buffer_raises_and_modifies_nothing():
    good = make_list([(100,), (10, 10)], scale=10.0)
    ro = np.ones(5, np.float32)
    ro.flags.writeable = False
    before = snapshot(good)
    with pytest.raises(ValueError, match=r"t_list\[3\]: expected a writable float32 buffer, got a read-only"):
        clipcore.clip_by_global_norm_(good + [None, ro], 1.0)
    assert snapshot(good) == before
    assert clipcore.global_norm(good + [ro]) == pytest.approx(ref_norm(good + [ro]))  # reading is fine
    import array
    with pytest.raises(ValueError, match=r"t_list\[0\]: .*read-only"):
        clipcore.clip_by_global_norm_([memoryview(array.array("f", [1, 2])).toreadonly()], 1.0)
    with pytest.raises(TypeError, match=r"t_list\[0\]: .*uint8"):
        clipcore.clip_by_global_norm_([bytes(8)], 1.0)


@pytest.mark.parametrize("make", [
    lambda base: [base, base],
    lambda base: [base, base[3]],
    lambda base: [base[:, 1], base.T],
    lambda base: [base[1:5], base[4:9]],
    lambda base: [base.ravel()[::7], base.ravel()[::5]],
])
def test_overlapping_buffers_raise_and_modify_nothing(make):
    base = RNG.standard_normal((20, 10)).astype(np.float32)
    other = np.ones(50, np.float32) * 10
    t_list = [other] + make(base)
    before = snapshot([base, other])
    with pytest.raises(ValueError, match=r"t_list\[1\] and t_list\[2\] share memory"):
        clipcore.clip_by_global_norm_(t_list, 1.0)
    with pytest.raises(ValueError, match="share memory"):
        clipcore.Plan(t_list)
    assert snapshot([base, other]) == before
    clipcore.global_norm(t_list)  # reading shared memory twice is allowed


def test_disjoint_interleaved_views_are_fine():
    base = np.ones((6, 4), np.float32) * 2
    clipcore.clip_by_global_norm_([base[::2], base[1::2], base[:0]], 1.0)
    assert ref_norm([base]) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("clip_norm, exc, match", [
    (-1.0, ValueError, "clip_norm must be a number >= 0, got -1.0"),
    (float("nan"), ValueError, "clip_norm must be a number >= 0, got nan"),
    ("1", TypeError, "clip_norm must be a real number"),
    (None, TypeError, "clip_norm must be a real number"),
    (np.ones(2), TypeError, "clip_norm must be a real number"),
    (1 + 2j, TypeError, "clip_norm must be a real number"),
])
def test_bad_clip_norm(clip_norm, exc, match):
    good = make_list([(100,)], scale=10.0)
    before = snapshot(good)
    with pytest.raises(exc, match=match):
        clipcore.clip_by_global_norm_(good, clip_norm)
    with pytest.raises(exc, match=match):
        clipcore.Plan(good).clip_by_global_norm_(clip_norm)
    assert snapshot(good) == before


@pytest.mark.parametrize("use_norm", ["5", [1.0], np.ones(3), object()])
def test_bad_use_norm(use_norm):
    good = make_list([(100,)], scale=10.0)
    before = snapshot(good)
    with pytest.raises(TypeError, match="use_norm must be a real number"):
        clipcore.clip_by_global_norm_(good, 1.0, use_norm=use_norm)
    assert snapshot(good) == before


@pytest.mark.parametrize("kw, exc, match", [
    ({"n_threads": 0}, ValueError, "n_threads"),
    ({"n_threads": -2}, ValueError, "n_threads"),
    ({"n_threads": 1.5}, TypeError, "n_threads"),
    ({"norm_type": 0}, ValueError, "norm_type"),
    ({"norm_type": -1}, ValueError, "norm_type"),
    ({"norm_type": "fro"}, TypeError, "norm_type"),
])
def test_bad_keywords(kw, exc, match):
    with pytest.raises(exc, match=match):
        clipcore.global_norm([np.ones(3, np.float32)], **kw)


# --- Plan ----------------------------------------------------------------------------

def test_plan_tracks_contents_and_keeps_buffers_alive():
    arrays = make_list([(1000,), (20, 30), (0,)]) + [None]
    plan = clipcore.Plan(arrays)
    assert len(plan) == 3 and plan.size == 1600
    assert plan.global_norm() == clipcore.global_norm(arrays)
    arrays[0] *= 3          # contents change between steps
    assert plan.global_norm() == clipcore.global_norm(arrays)
    expected = [a.copy() for a in arrays if a is not None]
    norm = plan.clip_by_global_norm_(1.0)
    for a, e in zip(arrays, expected):
        np.testing.assert_array_equal(a, e * np.float32(1.0 / norm))
    f16 = np.ones(4, np.float16)
    plan16 = clipcore.Plan([f16])
    f16[:] = 2
    assert plan16.global_norm() == 4.0      # the float64 copy is refreshed per call
    del arrays
    assert plan.global_norm() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("n_threads", THREADS)
def test_plan_matches_function(n_threads):
    arrays = make_list([(300_000,), (17,), (512,)] * 5)
    copies = [a.copy() for a in arrays]
    plan = clipcore.Plan(arrays, n_threads=n_threads)
    assert plan.clip_by_global_norm_(3.0) == clipcore.clip_by_global_norm_(copies, 3.0, n_threads=n_threads)
    for a, c in zip(arrays, copies):
        assert a.tobytes() == c.tobytes()


# --- threads, GIL, build --------------------------------------------------------------

def test_small_work_stays_on_one_thread(no_late_backoff):
    crossover = kernels.get_tuning()["parallel_min"]     # 655,360 unless calibrated
    assert kernels.threads_for(256, 0) == 1          # a 1 KB list
    assert kernels.threads_for(256, 4) == 1          # even when asked for more
    assert kernels.threads_for(235_146, 4) == 4      # asked: the MNIST MLP on four
    assert kernels.threads_for(max(65_536, crossover - 1), 0) == 1   # by default: below it, one
    assert kernels.threads_for(max(65_536, crossover), 0) == kernels.max_threads()
    assert kernels.threads_for(10**7, 3) == 3
    assert kernels.threads_for(10**7, 0) == kernels.max_threads()


def test_n_threads_none_follows_omp_num_threads():
    code = "from clipcore import kernels; print(kernels.max_threads(), kernels.threads_for(10**7))"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


@pytest.mark.requires_threadpoolctl
def test_n_threads_none_follows_threadpoolctl(no_late_backoff):
    import threadpoolctl
    if not kernels.openmp_enabled():
        pytest.skip("serial build")
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert kernels.max_threads() == 1
        assert kernels.threads_for(10**7) == 1
    assert kernels.threads_for(10**7, 2) == 2


def test_kernel_releases_the_gil():
    arrays = [np.ones(40_000_000, np.float32)]
    started, counter = threading.Event(), [0]

    def work():
        started.set()
        for _ in range(3):
            clipcore.global_norm(arrays, n_threads=1)

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    while t.is_alive():
        counter[0] += 1
    t.join()
    # Holding the GIL for the whole kernel would leave this loop a handful of turns.
    assert counter[0] > 10_000


@pytest.mark.skipif(os.environ.get("CLIPCORE_SKIP_OPENMP_TEST") == "1",
                    reason="a serial build on purpose")
def test_build_has_openmp():
    # A compiler that can do OpenMP must not silently give a serial build.
    # (A serial build is tested with CLIPCORE_SKIP_OPENMP_TEST=1.)
    assert kernels.openmp_enabled()


def test_show_config(capsys):
    clipcore.show_config()
    out = capsys.readouterr().out
    assert clipcore.__version__ in out
    assert ("openmp:  on" in out) == kernels.openmp_enabled()
    assert kernels.simd_path() in out
    assert f"threads: {kernels.max_threads()}" in out


def test_forked_child_runs_serial_and_correct():
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    arrays = make_list([(2_000_000,)])
    expected = clipcore.global_norm(arrays)   # the parent's thread pool exists now
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = clipcore.global_norm(arrays) == expected and kernels.max_threads() == 1
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(w)
    result = os.read(r, 1)
    os.waitpid(pid, 0)
    assert result == b"1"


@pytest.mark.parametrize("count, culprit", [(40, 0), (40, 39), (3000, 0), (3000, 1234), (3000, 2999)])
def test_overlap_found_among_many_buffers(count, culprit):
    # Fewer than 64 extents are insertion-sorted, more are radix-sorted.
    arrays = [np.full(int(n), 1.0, np.float32) for n in RNG.integers(1, 64, count)]
    order = RNG.permutation(count)          # addresses in no particular order
    arrays = [arrays[i] for i in order]
    clipcore.clip_by_global_norm_(arrays, 1e9)          # disjoint: fine
    before = snapshot(arrays)
    with pytest.raises(ValueError, match=rf"t_list\[{culprit}\] and t_list\[{count}\] share memory"):
        clipcore.clip_by_global_norm_(arrays + [arrays[culprit][:1]], 1e-3)
    assert snapshot(arrays) == before


@pytest.mark.parametrize("span_bits", [10, 20, 28])
def test_overlap_found_whatever_the_address_span(span_bits):
    # The radix sort of the extents runs 1, 2 or 3 passes over the address
    # bits that vary: single-element views spread over 2**span_bits bytes.
    base = np.zeros((1 << span_bits) // 4, np.float32)   # untouched pages stay virtual
    offsets = np.unique(RNG.integers(0, base.size, 200))
    views = [base[o:o + 1] for o in RNG.permutation(offsets)]
    clipcore.clip_by_global_norm_(views, 1e9)
    culprit = len(views) // 3
    with pytest.raises(ValueError, match=rf"t_list\[{culprit}\] and t_list\[{len(views)}\] share"):
        clipcore.clip_by_global_norm_(views + [views[culprit]], 1.0)


from hypothesis import given, settings, strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays as np_arrays  # noqa: E402

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
buffers = st.lists(np_arrays(np.float32, st.integers(0, 300), elements=finite_f32), max_size=8)


@settings(max_examples=200, deadline=None)
@given(buffers, st.floats(0, 1e31, allow_nan=False))
def test_property_clip_bounds_norm_and_keeps_direction(arrays, clip_norm):
    before = [a.astype(np.float64) for a in arrays]
    norm = clipcore.clip_by_global_norm_(arrays, clip_norm)
    assert norm == pytest.approx(ref_norm(before), rel=1e-12, abs=1e-300)
    # float32 rounding; subnormal results carry an absolute error of up to 0.7e-45 each
    assert ref_norm(arrays) <= clip_norm * (1 + 1e-6) + 1e-43 or norm <= clip_norm
    if norm > clip_norm:        # every element scaled by one factor: direction kept
        for a, b in zip(arrays, before):     # (to float32 rounding, subnormals included)
            np.testing.assert_allclose(a, b * (clip_norm / norm), rtol=3e-7, atol=1.5e-45)
    else:
        for a, b in zip(arrays, before):
            np.testing.assert_array_equal(a, b.astype(np.float32))


@settings(max_examples=100, deadline=None)
@given(buffers, st.sampled_from([1.0, 2.0, 3.0, np.inf]))
def test_property_thread_count_never_changes_the_bits(arrays, p):
    big = arrays + [np.ones(70_000, np.float32)]
    results = {clipcore.global_norm(big, norm_type=p, n_threads=n) for n in THREADS}
    assert len(results) == 1


IDLE_CPU_SCRIPT = """
import os, time
import numpy as np, clipcore
assert "GOMP_SPINCOUNT" not in os.environ      # not passed on to child processes

def cpu_ticks():   # per thread: OpenBLAS's own threads spin for a while after numpy loads
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        ticks[tid] = int(fields[11]) + int(fields[12])
    return ticks

before = cpu_ticks()
plan = clipcore.Plan([np.ones(1_000_000, np.float32)], n_threads=2)
plan.global_norm()                  # starts OpenMP's worker thread
start = cpu_ticks()
for _ in range(10):
    plan.global_norm()
    time.sleep(0.05)
end = cpu_ticks()
print(sum(end[t] - start.get(t, 0) for t in end if t not in before) / os.sysconf("SC_CLK_TCK"))
"""


@pytest.mark.skipif(not kernels.openmp_enabled() or not os.path.isdir("/proc/self/task"),
                    reason="serial build, or no per-thread CPU times")
def test_idle_openmp_threads_stop_spinning_soon():
    # libgomp's default spin after each call (~7 ms of a core each time here) would
    # starve NumPy's BLAS threads in a training loop; clipcore cuts it to ~0.1 ms.
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", IDLE_CPU_SCRIPT], env=env,
                         capture_output=True, text=True, check=True)
    assert float(out.stdout) < 0.02, out.stdout      # default libgomp: ~0.07 s


# --- the caller's floating-point mode ---------------------------------------------------

def _fp_cases():
    """Calls whose bits depend on whether subnormals are flushed, each over enough
    elements for a team of two; each returns what it computed."""
    rng = np.random.default_rng(3)
    tiny = (rng.standard_normal(1_200_000) * 1e-38).astype(np.float32)   # half subnormal
    unit = rng.standard_normal(1_200_000).astype(np.float32)
    batch = [(rng.standard_normal((4, 300_000)) * 1e-38).astype(np.float32)]
    params = list((unit * 1e-34).reshape(4, 250, 1200))    # normal factors, subnormal products

    def in_place(fn):
        def call(n):
            y = unit.copy()
            fn(y, n)
            return y
        return call

    return {
        "global_norm": lambda n: np.float64(clipcore.global_norm([tiny], n_threads=n)),
        # a normal factor, products below float32's smallest normal
        "clip_by_global_norm_": in_place(lambda y, n: clipcore.clip_by_global_norm_(
            [y], 1e-34, n_threads=n)),
        "clip_by_global_norm": lambda n: clipcore.clip_by_global_norm(
            [unit], 1e-34, n_threads=n)[0][0],
        "clip_by_value": lambda n: clipcore.clip_by_value(tiny, -1.0, 1.0, n_threads=n),
        "clip_by_norm per row": lambda n: clipcore.clip_by_norm(
            unit.reshape(1000, 1200), 1e-34, axes=1, n_threads=n),
        "per_example_global_norm_clip": lambda n: clipcore.per_example_global_norm_clip(
            batch, 1.0, n_threads=n)[0],
        "adaptive_grad_clip_": lambda n: _agc(params, unit.reshape(4, 250, 1200), n),
    }


def _agc(params, grads, n):
    g = [x.copy() for x in grads]
    clipcore.adaptive_grad_clip_(g, params, 1e-3, eps=0.0, n_threads=n)
    return np.stack(g)


def _bits(x):
    return np.asarray(x).tobytes()


flush_modes = pytest.mark.skipif(not kernels.can_flush(),
                                 reason="no flush-to-zero mode clipcore can set here")


@flush_modes
def test_fp_flush_sets_this_threads_mode_and_restores_it():
    sub = np.float32(1e-40)
    with kernels.fp_flush(True):
        assert sub * np.float32(1) == 0
        with kernels.fp_flush(False):
            assert sub * np.float32(1) == sub
        assert sub * np.float32(1) == 0
    assert sub * np.float32(1) == sub


@flush_modes
@pytest.mark.parametrize("case", list(_fp_cases()))
def test_a_flushing_caller_gets_the_same_bits_at_every_thread_count(case):
    # The team's other thread was started by a caller that keeps subnormals;
    # it must compute in the flushing caller's mode, and not keep its own.
    call = _fp_cases()[case]
    ieee = _bits(call(2))
    with kernels.fp_flush(True):
        flushed = {_bits(call(n)) for n in (1, 2, 2)}
    assert len(flushed) == 1
    assert flushed != {ieee}                   # the case does depend on the mode
    assert _bits(call(1)) == ieee


@flush_modes
def test_a_team_started_flushing_keeps_subnormals_for_a_caller_that_does():
    # In a new thread (a new OpenMP team), started while flushing.
    calls = _fp_cases()
    ieee = {case: _bits(call(1)) for case, call in calls.items()}
    got = {}

    def run():
        with kernels.fp_flush(True):
            for call in calls.values():
                call(2)
        got.update({case: _bits(call(2)) for case, call in calls.items()})

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert got == ieee
