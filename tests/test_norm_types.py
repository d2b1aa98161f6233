"""p-norms in the kernels: global_norm, clip_by_global_norm_ and Plan with norm_type."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import clipcore

INF = float("inf")
NAN = float("nan")
NORM_TYPES = [2.0, 1.0, INF, 0.5, 3.0, 7.5, 1.5, 0.1]


def ref_norm(arrays, p):
    """float64 reference: exact sums (math.fsum) over float64 copies."""
    x = np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in arrays] or [[]])
    a = np.abs(x)
    if a.size == 0:
        return 0.0
    if np.isnan(a).any():
        return NAN
    if p == INF or np.isinf(a).any():
        return float(a.max())
    if p == 2:
        return math.sqrt(math.fsum(a * a))      # squares of float32 values are exact in float64
    if p == 1:
        return math.fsum(a)
    m = float(a.max())
    return m * math.fsum((a / m) ** p) ** (1 / p) if m else 0.0


def rel_tol(p):
    return 1e-13 if p in (1.0, 2.0, INF) else 1e-11


def big_list(dtype=np.float32, seed=0):
    """One large buffer among many tiny ones, a transposed and a strided view: many chunks."""
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(300_001).astype(dtype)]
    arrays += [rng.standard_normal(rng.integers(0, 40)).astype(dtype) for _ in range(1000)]
    arrays.append(rng.standard_normal((300, 211)).astype(dtype).T)
    arrays.append(rng.standard_normal(90_000).astype(dtype)[::3])
    # Magnitudes spread over many decades.
    arrays.append((rng.standard_normal(50_000) * 10.0 ** rng.integers(-30, 30, 50_000))
                  .astype(dtype))
    return arrays


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_norm_matches_float64_reference(p, dtype):
    arrays = big_list(dtype)
    assert clipcore.global_norm(arrays, norm_type=p) == pytest.approx(ref_norm(arrays, p),
                                                                      rel=rel_tol(p))


@pytest.mark.parametrize("p", NORM_TYPES)
def test_bitwise_identical_across_thread_counts(p):
    arrays = big_list(np.float32, seed=1) + big_list(np.float64, seed=2)[:5]
    norms = {nt: clipcore.global_norm(arrays, norm_type=p, n_threads=nt) for nt in (1, 2, 4)}
    assert len({v.hex() for v in norms.values()}) == 1, norms
    plans = {nt: clipcore.Plan(arrays, n_threads=nt).global_norm(norm_type=p) for nt in (1, 2, 4)}
    assert set(plans.values()) == {norms[1]}
    assert clipcore.global_norm(arrays, norm_type=p) == norms[1]     # n_threads=None


@pytest.mark.parametrize("p", [2.0, 1.0, INF, 3.0])
def test_clipped_buffers_identical_across_thread_counts(p):
    results = []
    for nt in (1, 2, 4, 7):    # more threads than cores: late threads, chunks taken over
        arrays = big_list(np.float32, seed=3)
        norm = clipcore.clip_by_global_norm_(arrays, 1.0, norm_type=p, n_threads=nt)
        results.append((norm, arrays))
    for norm, arrays in results[1:]:
        assert norm == results[0][0]
        for a, b in zip(arrays, results[0][1]):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_large_float32_values_do_not_overflow(p):
    big = np.finfo(np.float32).max
    arrays = [np.full(100_000, big, np.float32), np.full(7, -big, np.float32)]
    got = clipcore.global_norm(arrays, norm_type=p, n_threads=2)
    want = float(big) * (math.sqrt(100_007) if p == 2 else 100_007)
    assert math.isfinite(got) and got == pytest.approx(want, rel=1e-13)
    # 1e30 squared is 1e60: beyond float32, fine in float64.
    assert clipcore.global_norm([np.full(4, 1e30, np.float32)]) == pytest.approx(
        2 * float(np.float32(1e30)), rel=1e-15)


@pytest.mark.parametrize("p", [0.5, 3.0, 7.5, INF])
def test_large_and_tiny_values_other_p(p):
    # |x|^p of float32's largest values (p > 1) or smallest (p < 1) stay finite:
    # the kernel divides by the max first.
    big = np.finfo(np.float32).max
    for value in (big, 1e-38, 1.4e-45):
        arrays = [np.full(1000, value, np.float32), np.zeros(3, np.float32)]
        got = clipcore.global_norm(arrays, norm_type=p)
        assert got == pytest.approx(ref_norm(arrays, p), rel=1e-12)
        assert got > 0 and math.isfinite(got)


def test_tiny_values_do_not_underflow_p2():
    arrays = [np.full(1000, 1e-30, np.float32), np.full(10, 1.4e-45, np.float32)]
    assert clipcore.global_norm(arrays) == pytest.approx(ref_norm(arrays, 2.0), rel=1e-14)


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("where", [0, 500, -1, -2])
@pytest.mark.parametrize("n_threads", [1, 2, 4])
def test_nan_and_inf_rules(p, where, n_threads):
    arrays = big_list(np.float32, seed=4)
    target = arrays[where]
    while target.size == 0:
        where += 1
        target = arrays[where]
    idx = tuple(s // 2 for s in target.shape)     # works in views too
    target[idx] = INF
    assert clipcore.global_norm(arrays, norm_type=p, n_threads=n_threads) == INF
    target[idx] = -INF
    assert clipcore.global_norm(arrays, norm_type=p, n_threads=n_threads) == INF
    target[idx] = NAN
    assert math.isnan(clipcore.global_norm(arrays, norm_type=p, n_threads=n_threads))
    arrays[0][0] = INF       # NaN wins over inf, wherever they are
    assert math.isnan(clipcore.global_norm(arrays, norm_type=p, n_threads=n_threads))


@pytest.mark.parametrize("p", [2.0, 1.0, INF])
def test_every_length_and_start_of_a_contiguous_buffer(p):
    # The float32 kernels read whole blocks of 64 and then a masked partial
    # block: every length below 3 blocks, at aligned and unaligned starts,
    # with a NaN, an inf or a tie for the max in the partial block's last slot.
    rng = np.random.default_rng(7)
    block = (rng.standard_normal(256) * 10.0 ** rng.integers(-20, 20, 256)).astype(np.float32)
    for start in (0, 1, 5):
        for n in range(0, 200):
            x = block[start:start + n]
            assert clipcore.global_norm([x], norm_type=p) == pytest.approx(ref_norm([x], p),
                                                                           rel=1e-13)
            if n == 0:
                continue
            for bad, check in ((NAN, math.isnan), (-INF, lambda v: v == INF)):
                y = x.copy()
                y[-1] = bad
                assert check(clipcore.global_norm([y], norm_type=p)), (start, n, bad)
    # Bit patterns in the max: -0.0, subnormals, the largest float32.
    for values in ([-0.0, 1e-45, -3e-45], [-3.4028235e38, 1.0], [1e-45] * 70):
        x = np.array(values, np.float32)
        assert clipcore.global_norm([x], norm_type=INF) == float(np.abs(x).max())


@pytest.mark.parametrize("p", NORM_TYPES)
def test_empty_and_zero(p):
    assert clipcore.global_norm([], norm_type=p) == 0.0
    assert clipcore.global_norm([np.zeros(0, np.float32), None], norm_type=p) == 0.0
    assert clipcore.global_norm([np.zeros(100_000, np.float32)], norm_type=p) == 0.0
    assert clipcore.global_norm([np.array([-2.5], np.float32)], norm_type=p) == 2.5


def test_known_values():
    x = [np.array([3.0, -4.0], np.float32), np.array([[12.0]], np.float64)]
    assert clipcore.global_norm(x) == 13.0
    assert clipcore.global_norm(x, norm_type=1) == 19.0
    assert clipcore.global_norm(x, norm_type=INF) == 12.0
    assert clipcore.global_norm(x, norm_type=3) == pytest.approx((27 + 64 + 1728) ** (1 / 3))
    assert clipcore.global_norm(x, norm_type=0.5) == pytest.approx(
        (math.sqrt(3) + 2 + math.sqrt(12)) ** 2)


@pytest.mark.requires_torch
@pytest.mark.parametrize("p", NORM_TYPES)
def test_matches_torch_vector_norm_float64(p):
    import torch
    arrays = big_list(np.float64, seed=5)[:20]
    want = torch.linalg.vector_norm(torch.cat([torch.from_numpy(np.ascontiguousarray(a))
                                               .reshape(-1) for a in arrays]), p).item()
    assert clipcore.global_norm(arrays, norm_type=p) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("via_plan", [False, True])
def test_clip_by_global_norm_with_norm_type(p, via_plan):
    arrays = big_list(np.float32, seed=6)[:50]
    before = [a.copy() for a in arrays]
    want = ref_norm(before, p)
    clip = want / 3
    if via_plan:
        norm = clipcore.Plan(arrays).clip_by_global_norm_(clip, norm_type=p)
    else:
        norm = clipcore.clip_by_global_norm_(arrays, clip, norm_type=p)
    assert norm == pytest.approx(want, rel=rel_tol(p))
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b * np.float32(clip / norm))
    assert clipcore.global_norm(arrays, norm_type=p) == pytest.approx(clip, rel=1e-6)
    # Already within the p-norm: nothing is written.
    again = [a.copy() for a in arrays]
    assert clipcore.clip_by_global_norm_(arrays, clip * 2, norm_type=p) == pytest.approx(
        clip, rel=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, again))


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1.0, ValueError), (NAN, ValueError),
                                     (-INF, ValueError), ("2", TypeError), (None, TypeError),
                                     (np.ones(2), TypeError)])
def test_bad_norm_type_raises_and_modifies_nothing(bad, exc):
    arrays = [np.array([3.0, 4.0], np.float32)]
    with pytest.raises(exc, match="norm_type"):
        clipcore.global_norm(arrays, norm_type=bad)
    with pytest.raises(exc, match="norm_type"):
        clipcore.clip_by_global_norm_(arrays, 1.0, norm_type=bad)
    with pytest.raises(exc, match="norm_type"):
        clipcore.Plan(arrays).clip_by_global_norm_(1.0, norm_type=bad)
    assert np.array_equal(arrays[0], [3.0, 4.0])


@settings(max_examples=200, deadline=None)
@given(arrays=st.lists(hnp.arrays(st.sampled_from([np.float32, np.float64]),
                                  hnp.array_shapes(min_dims=0, max_dims=3, max_side=40),
                                  elements=st.floats(-1e6, 1e6, width=32)),
                       min_size=0, max_size=5),
       p=st.sampled_from(NORM_TYPES) | st.floats(0.05, 20))
def test_property_matches_reference(arrays, p):
    got = clipcore.global_norm(arrays, norm_type=p)
    assert got == pytest.approx(ref_norm(arrays, p), rel=1e-10, abs=1e-300)
    for nt in (2, 4):
        assert clipcore.global_norm(arrays, norm_type=p, n_threads=nt) == got


@settings(max_examples=100, deadline=None)
@given(arrays=st.lists(hnp.arrays(np.float32, st.integers(1, 200),
                                  elements=st.floats(-1e3, 1e3, width=32)),
                       min_size=1, max_size=4),
       p=st.sampled_from(NORM_TYPES), clip=st.floats(1e-3, 1e3))
def test_property_clip_norm_and_direction(arrays, p, clip):
    before = [a.copy() for a in arrays]
    norm = clipcore.clip_by_global_norm_(arrays, clip, norm_type=p)
    after = clipcore.global_norm(arrays, norm_type=p)
    assert after <= clip * (1 + 1e-5) or after <= norm
    if norm > clip:
        for a, b in zip(arrays, before):
            np.testing.assert_allclose(a, b * (clip / norm), rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_read_only_and_byte_swapped_inputs(p):
    rng = np.random.default_rng(7)
    ro = rng.standard_normal((200, 300)).astype(np.float32)
    ro.flags.writeable = False
    swapped = rng.standard_normal(1000).astype(">f8")
    half = rng.standard_normal(500).astype(np.float16)
    arrays = [ro, ro.T[::2], swapped, half]
    assert clipcore.global_norm(arrays, norm_type=p) == pytest.approx(ref_norm(arrays, p),
                                                                      rel=rel_tol(p))
