"""float16 and bfloat16 buffers on the native kernels (SEG_F16, SEG_BF16).

A 16-bit element is read at its own width and widened to float32 exactly, so a
16-bit list's norm is bitwise the norm of its float32 upcast laid out the same
way; scaling is float32(x) * float32(s) rounded once to the type (RNE), as
NumPy's float32 -> float16 cast, ml_dtypes' bfloat16 cast and torch's
``mul_`` do. NaN results are compared as NaN: torch's own scalar and vector
conversions give NaNs different bits (clipcore keeps the sign and quiets).
"""
import math

import numpy as np
import pytest

import clipcore
from clipcore import _lists, kernels

INF = float("inf")
BF16 = pytest.param("bfloat16", marks=pytest.mark.requires_ml_dtypes)
HALF = ["float16", BF16]
F16_BF16_F32_F64 = ["float16", "bfloat16", "float32", "float64"]


def dt(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def every_value(name):
    """All 65536 values of the 16-bit type (NaNs, infs, subnormals, zeros included)."""
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dt(name))


def randn(name, shape, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale).astype(dt(name))


def bits(a):
    return np.ascontiguousarray(a).view(np.uint16 if a.itemsize == 2 else
                                        np.uint32 if a.itemsize == 4 else np.uint64)


def assert_same(a, b):
    """Bitwise equal, any NaN matching any NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape
    na, nb = np.isnan(a.astype(np.float32)), np.isnan(b.astype(np.float32))
    assert np.array_equal(na, nb)
    mismatch = np.flatnonzero((bits(a) != bits(b)).ravel() & ~na.ravel())
    assert mismatch.size == 0, (a.ravel()[mismatch[:5]], b.ravel()[mismatch[:5]])


def ref_scaled(x, s):
    """float32(x) * float32(s), rounded once to x's dtype (float64 stays float64)."""
    with np.errstate(all="ignore"):
        if x.dtype == np.float64:
            return x * s
        return (x.astype(np.float32) * np.float32(s)).astype(x.dtype)


def ref_norm(arrays, p=2.0):
    x = np.abs(np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays]))
    if np.isnan(x).any():
        return math.nan
    if p == INF or np.isinf(x).any():
        return float(x.max())
    if p == 2:
        return math.sqrt(math.fsum(x * x))
    if p == 1:
        return math.fsum(x)
    m = float(x.max())
    return m * math.fsum((x / m) ** p) ** (1 / p) if m else 0.0


# Views applied alike to a 16-bit base and its float32 upcast.
LAYOUTS = {
    "C": lambda b: b,
    "F": lambda b: b.T,
    "strided": lambda b: b[::2, 1::3],
    "negative": lambda b: b[::-1, ::-2],
}


def lists(name, layout, seed=0):
    """(16-bit views, their float32 upcasts with the same layout): one large
    buffer (many chunks) among small ones."""
    shapes = [(700, 300), (3, 5), (1, 1), (64, 65), (129, 2)]
    bases = [randn(name, s, seed + k, scale=10.0 ** (k - 2)) for k, s in enumerate(shapes)]
    half = [LAYOUTS[layout](b) for b in bases]
    f32 = [LAYOUTS[layout](b.astype(np.float32)) for b in bases]
    return half, f32


# ---------------------------------------------------------------- norms

@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("p", [2.0, 1.0, INF, 3.0])
def test_norm_is_the_float32_upcast_norm_bitwise(name, layout, p, twins):
    half, f32 = lists(name, layout)
    got = clipcore.global_norm(half, norm_type=p)
    assert got == clipcore.global_norm(f32, norm_type=p)
    assert got == pytest.approx(ref_norm(half, p), rel=1e-13 if p in (1, 2, INF) else 1e-11)


@pytest.mark.parametrize("name", HALF)
def test_norm_of_every_value(name, twins):
    x = every_value(name)
    finite = x[np.isfinite(x.astype(np.float32))]
    assert clipcore.global_norm([finite]) == clipcore.global_norm([finite.astype(np.float32)])
    assert clipcore.global_norm([finite]) == pytest.approx(ref_norm([finite]), rel=1e-13)
    assert clipcore.global_norm([finite], norm_type=INF) == float(np.abs(finite.astype(
        np.float64)).max())
    assert math.isnan(clipcore.global_norm([x]))
    assert math.isnan(clipcore.global_norm([x], norm_type=INF))
    inf = np.array([1, -np.inf, 2], np.float32).astype(dt(name))
    assert clipcore.global_norm([inf]) == INF
    assert clipcore.global_norm([np.zeros(5, dt(name))]) == 0.0
    assert clipcore.global_norm([np.zeros(0, dt(name))]) == 0.0


@pytest.mark.parametrize("name", HALF)
def test_norm_bitwise_across_threads(name):
    half, _ = lists(name, "strided")
    half.append(randn(name, 400_000, seed=9))
    norms = {clipcore.global_norm(half, n_threads=t) for t in (1, 2, 7)}
    assert len(norms) == 1
    outs = []
    for t in (1, 2, 7):
        c = [a.copy() for a in half]
        clipcore.clip_by_global_norm_(c, 1.0, n_threads=t)
        outs.append(c)
    for c in outs[1:]:
        for a, b in zip(outs[0], c):
            assert np.array_equal(bits(a), bits(b))


# -------------------------------------------------------------- scaling

FACTORS = [0.3, 1e-3, 0.9999, 2.0 ** -20, 1e-40, 1e-30, 0.0]


@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("factor", FACTORS)
def test_clip_every_value_vs_numpy(name, factor, twins):
    """Every 16-bit value (subnormals, inf, NaN) times the float32 factor, via use_norm."""
    x = every_value(name)
    y = x.copy()
    clipcore.clip_by_global_norm_([y], factor, use_norm=1.0)
    assert_same(y, ref_scaled(x, factor))


@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("factor", [3.5e4, 300.0, 1e30, -7.5, float("nan"), INF])
def test_scale_overflowing_and_nonfinite_factors(name, factor, twins):
    """Products beyond the type's range become inf (the plan's scale_, any factor)."""
    x = every_value(name)
    y = x.copy()
    _lists.scale_(clipcore.Plan([y]), factor)
    assert_same(y, ref_scaled(x, factor))


@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_clip_views_in_place(name, layout, twins):
    base = every_value(name)[:60000].reshape(200, 300).copy()
    before = base.copy()
    view = LAYOUTS[layout](base)
    expected = ref_scaled(view, np.float32(0.37))
    clipcore.clip_by_global_norm_([view], 0.37, use_norm=1.0)
    assert_same(view, expected)
    untouched = np.ones(base.shape, bool)
    LAYOUTS[layout](untouched)[...] = False
    assert np.array_equal(bits(base)[untouched], bits(before)[untouched])


def test_nan_results_are_quiet_and_keep_their_sign(twins):
    x = np.array([np.nan, -np.nan, 1.0], np.float32)
    for name in ("float16", "bfloat16"):
        if name == "bfloat16":
            pytest.importorskip("ml_dtypes")
        y = x.astype(dt(name))
        clipcore.clip_by_global_norm_([y], 0.5, use_norm=1.0)
        b = bits(y)
        quiet = 0x0200 if name == "float16" else 0x0040
        assert b[0] & quiet and b[1] & quiet and not b[0] & 0x8000 and b[1] & 0x8000


@pytest.mark.parametrize("name", HALF)
@pytest.mark.parametrize("factor", [0.3, -7.5, INF, 0.0])
def test_every_nan_keeps_its_payload_quieted(name, factor, twins):
    """A NaN element times a number is that NaN with the quiet bit set, sign and
    payload kept (the bfloat16 twin relies on the product's low bits being zero)."""
    x = every_value(name)
    nan = np.isnan(x.astype(np.float32))
    y = x.copy()
    _lists.scale_(clipcore.Plan([y]), factor)
    quiet = 0x0200 if name == "float16" else 0x0040
    assert np.array_equal(bits(y)[nan], bits(x)[nan] | quiet)


@pytest.mark.parametrize("n_threads", [1, 2, 7])
def test_mixed_list_in_one_call(n_threads):
    pytest.importorskip("ml_dtypes")
    arrays = [randn(n, (300, 301), seed=k) for k, n in enumerate(F16_BF16_F32_F64 * 2)]
    arrays[5] = arrays[5][::-1, ::2]        # a negative-stride bfloat16 view
    arrays[4] = arrays[4].T
    norm = ref_norm(arrays)
    assert clipcore.global_norm(arrays, n_threads=n_threads) == pytest.approx(norm, rel=1e-13)
    assert clipcore.global_norm(arrays) == clipcore.global_norm(
        [a.astype(np.float64) if a.dtype == np.float64 else a.astype(np.float32)
         for a in arrays])
    before = [a.copy() for a in arrays]
    got = clipcore.clip_by_global_norm_(arrays, 2.0, n_threads=n_threads)
    assert got == pytest.approx(norm, rel=1e-13)
    for a, b in zip(arrays, before):
        assert_same(a, ref_scaled(b, 2.0 / got))


@pytest.mark.parametrize("name", HALF)
def test_nothing_written_on_error(name):
    good = [randn(name, 1000, seed=1), randn(name, (30, 40), seed=2).T]
    saved = [a.copy() for a in good]
    ro = randn(name, 10)
    ro.flags.writeable = False
    for bad in (ro, np.arange(4), good[0][::2]):
        with pytest.raises((TypeError, ValueError)):
            clipcore.clip_by_global_norm_(good + [bad], 1e-3)
        for a, b in zip(good, saved):
            assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("name", HALF)
def test_byte_swapped_and_unaligned_stay_correct(name):
    """The float64-copy path, scaled by NumPy in float32 as the kernels scale."""
    x = randn(name, 1001)
    raw = np.zeros(2 * x.size + 1, np.uint8)
    unaligned = raw[1:].view(x.dtype)
    unaligned[...] = x
    arrays = [unaligned]
    if name == "float16":
        arrays.append(x.astype(x.dtype.newbyteorder(">")))
    for a in arrays:
        assert not (a.flags.aligned and a.dtype.isnative)
        assert clipcore.global_norm([a]) == clipcore.global_norm([x])
        clipcore.clip_by_global_norm_([a], 1.0)
        assert_same(a.astype(x.dtype), ref_scaled(x, 1.0 / clipcore.global_norm([x])))


@pytest.mark.parametrize("name", HALF)
def test_out_of_place_keeps_tf_semantics(name):
    x = [randn(name, (50, 7), seed=3), randn(name, 100, seed=4)[::3]]
    saved = [a.copy() for a in x]
    out, norm = clipcore.clip_by_global_norm(x, 1.0)
    assert norm.dtype == x[0].dtype
    assert float(norm) == float(x[0].dtype.type(ref_norm(x)))
    one = norm.dtype.type(1.0)
    scale = one * np.minimum(one / norm, one / one)     # TF: in the norm's dtype
    for o, a, b in zip(out, x, saved):
        assert o.dtype == a.dtype and np.array_equal(bits(a), bits(b))
        assert_same(o, a * a.dtype.type(scale))


@pytest.mark.requires_tf
@pytest.mark.parametrize("name", HALF)
def test_out_of_place_vs_tensorflow(name):
    import tensorflow as tf
    x = [randn(name, (50, 7), seed=3), randn(name, 100, seed=4)]
    tdt = tf.float16 if name == "float16" else tf.bfloat16
    u = x[0].dtype.type(7.25)
    out, _ = clipcore.clip_by_global_norm(x, 1.0, use_norm=u)
    tf_out, _ = tf.clip_by_global_norm([tf.constant(a.astype(np.float32), dtype=tdt)
                                        for a in x], 1.0, use_norm=tf.constant(7.25, tdt))
    for o, t in zip(out, tf_out):
        assert_same(o, t.numpy().astype(o.dtype))


# ---------------------------------------------------------------- torch

TORCH_HALF = ["float16", "bfloat16"]


def torch_dtype(name):
    import torch
    return getattr(torch, name)


def params_with_grads(grads):
    import torch
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        ps.append(p)
    return ps


def torch_grads(name, sizes, seed, scale=1.0):
    import torch
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen) * scale).to(torch_dtype(name)) for s in sizes]


@pytest.fixture
def spy_fallback(monkeypatch):
    """Fail if clipcore.torch hands a call to torch's own function."""
    import clipcore.torch as cct

    def fail(*args, **kwargs):
        raise AssertionError("torch's fallback was called")
    for fn in ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_"):
        monkeypatch.setattr(cct._torch, fn, fail)


@pytest.mark.requires_torch
@pytest.mark.parametrize("name", TORCH_HALF)
@pytest.mark.parametrize("factor", [0.3, 1e-3, 2.0 ** -20, 1e-40, 3.5e4, 1e30, -7.5])
def test_scaling_bitwise_vs_torch_mul(name, factor):
    import torch
    t = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch_dtype(name))
    ours = t.clone()
    view = ours.view(torch.int16).numpy().view(dt("bfloat16")) if name == "bfloat16" \
        else ours.numpy()
    _lists.scale_(clipcore.Plan([view]), factor)
    theirs = t.clone().mul_(torch.tensor(factor, dtype=torch.float32))
    assert_same(ours.view(torch.int16).numpy().view(np.uint16).view(view.dtype),
                theirs.view(torch.int16).numpy().view(np.uint16).view(view.dtype))


@pytest.mark.requires_torch
@pytest.mark.parametrize("name", TORCH_HALF)
def test_clip_coefficient_is_torchs(name):
    """clipcore's coefficient from a norm, in the 16-bit dtype's arithmetic, is
    torch's clamp(max_norm / (total + 1e-6), max=1) on the rounded total."""
    import torch
    from clipcore import _torch as compiled
    kind = {"float16": _lists.KIND_F16, "bfloat16": _lists.KIND_BF16}[name]
    rng = np.random.default_rng(5)
    norms = np.concatenate([np.exp(rng.uniform(-20, 20, 3000)),      # 1e-6 matters below 1e-2
                            np.exp(rng.uniform(-16, -4, 3000)), [0.0, INF, math.nan, 7e4]])
    for k, norm in enumerate(norms):
        max_norm = float(np.exp(rng.uniform(-10, 10))) if k % 3 else float(rng.uniform(-1, 5))
        total = torch.full((), float(np.float32(norm)), dtype=torch_dtype(name))
        assert compiled.torch_total_norm(norm, kind) == total.item() or math.isnan(norm)
        want = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()
        got = compiled.torch_clip_coef(norm, kind, max_norm)
        assert got == want or (math.isnan(got) and math.isnan(want)), (norm, max_norm)


@pytest.mark.requires_torch
@pytest.mark.parametrize("name", TORCH_HALF)
@pytest.mark.parametrize("seed", range(6))
def test_clip_grad_norm_vs_torch(name, seed, spy_fallback):
    import torch
    import clipcore.torch as cct
    sizes = [(300, 200), (17,), (1,), (64, 64), (5000,)]
    grads = torch_grads(name, sizes, seed, scale=10.0 ** (seed - 2))
    ours = params_with_grads([g.clone() for g in grads])
    theirs = [g.clone() for g in grads]
    max_norm = 0.5 * 10.0 ** (seed - 2)
    total = cct.clip_grad_norm_(ours, max_norm)
    assert total.dtype == torch_dtype(name)
    exact = ref_norm([g.float().numpy() for g in grads])
    # The exact norm rounded once to the dtype (via float32, as torch converts).
    assert total.item() == torch.tensor(float(np.float32(exact))).to(total.dtype).item()
    torch_total = torch.nn.utils.get_total_norm(theirs)
    assert torch_total.dtype == total.dtype
    eps = torch.finfo(total.dtype).eps
    if math.isinf(torch_total.item()):          # float16 beyond 65504: inf for both
        assert math.isinf(total.item())
    else:
        assert abs(total.item() - torch_total.item()) <= 2 * eps * torch_total.item()
    # With clipcore's total norm, torch's scaling gives the same bits.
    torch.nn.utils.clip_grads_with_norm_(params_with_grads(theirs), max_norm, total)
    for p, t in zip(ours, theirs):
        assert torch.equal(p.grad, t)
    # And torch's own clip agrees to the dtype's rounding.
    again = params_with_grads([g.clone() for g in grads])
    torch.nn.utils.clip_grad_norm_(again, max_norm)       # torch's own, not patched
    tiny = torch.finfo(total.dtype).smallest_normal
    for p, q in zip(ours, again):      # coefficients a unit apart, then one rounding each
        assert torch.allclose(p.grad.float(), q.grad.float(), rtol=4 * eps, atol=tiny)


@pytest.mark.requires_torch
def test_mixed_dtypes_promote_as_torch(spy_fallback):
    import torch
    import clipcore.torch as cct
    cases = [("float16", "bfloat16"), ("bfloat16", "float32"), ("float16", "float64"),
             ("bfloat16", "bfloat16", "float16", "float32", "float64")]
    for names in cases:
        grads = [torch_grads(n, [(1000,)], k)[0] for k, n in enumerate(names)]
        ours = params_with_grads([g.clone() for g in grads])
        total = cct.clip_grad_norm_(ours, 1.0)
        theirs = params_with_grads([g.clone() for g in grads])
        torch_total = torch.nn.utils.get_total_norm([p.grad for p in theirs])
        assert total.dtype == torch_total.dtype
        torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, total)
        for p, q in zip(ours, theirs):
            assert torch.equal(p.grad, q.grad)
        assert cct.get_total_norm(grads).item() == total.item()


@pytest.mark.requires_torch
@pytest.mark.parametrize("name", TORCH_HALF)
def test_float16_bfloat16_take_the_fast_path(name, spy_fallback):
    import torch
    import clipcore.torch as cct
    grads = torch_grads(name, [(2000, 50), (10,)], 7)
    ours = params_with_grads([g.clone() for g in grads])
    cct.clip_grad_norm_(ours, 1.0)
    cct.get_total_norm(grads)
    cct.clip_grads_with_norm_(ours, 0.5, torch.tensor(3.0, dtype=torch_dtype(name)))
    memory = cct._memory(grads, True)
    assert isinstance(memory, tuple) and len(set(memory[2])) == 1
    # Strided 16-bit gradients go through NumPy views, still clipcore's kernels.
    strided = params_with_grads([g.clone().t() for g in torch_grads(name, [(300, 40)], 8)])
    ref = params_with_grads([p.grad.clone() for p in strided])
    total = cct.clip_grad_norm_(strided, 1.0)
    torch.nn.utils.clip_grads_with_norm_(ref, 1.0, total)
    assert torch.equal(strided[0].grad, ref[0].grad)


@pytest.mark.requires_torch
@pytest.mark.parametrize("name", TORCH_HALF)
def test_nonfinite_16bit_norms(name):
    import torch
    import clipcore.torch as cct
    big = torch.full((10,), 3e4).to(torch_dtype(name))      # norm 94868: inf in float16
    ours = params_with_grads([big.clone()])
    theirs = params_with_grads([big.clone()])
    total = cct.clip_grad_norm_(ours, 1.0)
    torch_total = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert math.isinf(total.item()) == math.isinf(torch_total.item()) == (name == "float16")
    assert torch.equal(ours[0].grad, theirs[0].grad)
    keep = params_with_grads([big.clone()])
    if name == "float16":
        with pytest.raises(RuntimeError, match="non-finite"):
            cct.clip_grad_norm_(keep, 1.0, error_if_nonfinite=True)
        assert torch.equal(keep[0].grad, big)
    nan = params_with_grads([torch.tensor([1.0, math.nan]).to(torch_dtype(name))])
    assert math.isnan(cct.clip_grad_norm_(nan, 1.0).item())
    assert torch.isnan(nan[0].grad).all()
