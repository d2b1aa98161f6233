"""clipcore.torch against torch.nn.utils itself, on the same inputs."""
import math
import subprocess
import sys
import types
import warnings
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from hypothesis import given, settings, strategies as st  # noqa: E402
from torch.nn import utils as tu  # noqa: E402

import clipcore  # noqa: E402
import clipcore.torch as ct  # noqa: E402

INF = float("inf")
NAN = float("nan")
MLP = [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]
NORM_TYPES = [2.0, 1.0, INF, 0.5, 3.0, 7.5]


def make_params(shapes, dtype=torch.float32, seed=0, scale=1.0, none_at=()):
    """Parameters with random grads; entries listed in none_at get no grad."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        dt = dtype[i % len(dtype)] if isinstance(dtype, (list, tuple)) else dtype
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dt))
        if i not in none_at:
            p.grad = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dt)
        params.append(p)
    return params


def twin(params):
    """An independent copy of params with equal grads (for torch's reference run)."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            q.grad = p.grad.clone()
        out.append(q)
    return out


def grads_of(params):
    return [p.grad for p in params if p.grad is not None]


def ref_norm(tensors, p):
    """float64 reference, exact sums (math.fsum)."""
    x = np.concatenate([t.detach().double().reshape(-1).numpy() for t in tensors] or [[]])
    if x.size == 0:
        return 0.0
    a = np.abs(x)
    if np.isnan(a).any():
        return NAN
    if p == INF or np.isinf(a).any():
        return float(a.max())
    if p == 2:
        return math.sqrt(math.fsum(a * a))
    if p == 1:
        return math.fsum(a)
    m = a.max()
    return float(m * math.fsum((a / m) ** p) ** (1 / p)) if m else 0.0


@pytest.fixture
def no_fallback(monkeypatch):
    """Make torch's own functions unreachable from clipcore.torch: the fast path must run."""
    def boom(*args, **kwargs):
        raise AssertionError("clipcore.torch fell back to torch's own function")
    fake = types.SimpleNamespace(clip_grad_norm_=boom, clip_grad_value_=boom,
                                 get_total_norm=boom, clip_grads_with_norm_=boom)
    monkeypatch.setattr(ct, "_torch", fake)


@pytest.fixture
def spy_fallback(monkeypatch):
    """Record calls that clipcore.torch hands to torch (and still run them)."""
    calls = []

    def wrap(name):
        real = getattr(tu, name)

        def f(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return f
    fake = types.SimpleNamespace(**{n: wrap(n) for n in
                                    ["clip_grad_norm_", "clip_grad_value_", "get_total_norm",
                                     "clip_grads_with_norm_"]})
    monkeypatch.setattr(ct, "_torch", fake)
    return calls


def assert_norm_close(ours, theirs, dtype):
    assert isinstance(ours, torch.Tensor) and ours.shape == () and ours.device.type == "cpu"
    assert ours.dtype == theirs.dtype == dtype
    assert not ours.requires_grad
    rtol = 2e-5 if dtype == torch.float32 else 1e-12   # torch accumulates float32 in float32
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0, equal_nan=True)


def assert_clips_like_torch(ours, max_norm=0.5):
    """clip_grad_norm_ on ours and torch's on a twin: the same norm and gradients."""
    theirs = twin(ours)
    n_ours = ct.clip_grad_norm_(ours, max_norm)
    n_theirs = tu.clip_grad_norm_(theirs, max_norm)
    assert n_ours.shape == () and n_ours.dtype == n_theirs.dtype
    torch.testing.assert_close(n_ours, n_theirs, rtol=2e-5, atol=0)   # torch: float32 sums
    for a, b in zip(grads_of(ours), grads_of(theirs)):
        torch.testing.assert_close(a, b, rtol=5e-5, atol=0)


# --- clip_grad_norm_ -------------------------------------------------------------------

@pytest.mark.parametrize("norm_type", NORM_TYPES + ["inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.05, 1e12])
def test_clip_grad_norm_matches_torch(norm_type, dtype, max_norm, no_fallback):
    ours = make_params(MLP, dtype, none_at=(3,))
    theirs = twin(ours)
    before = [g.clone() for g in grads_of(ours)]
    ptrs = [g.data_ptr() for g in grads_of(ours)]
    n_ours = ct.clip_grad_norm_(ours, max_norm, norm_type)
    n_theirs = tu.clip_grad_norm_(theirs, max_norm, norm_type)
    assert_norm_close(n_ours, n_theirs, dtype)
    # Our norm is float64-accurate, rounded to the returned dtype.
    p = float(norm_type)
    assert n_ours.item() == pytest.approx(ref_norm(before, p), rel=1e-7 if dtype == torch.float32
                                          else 1e-13)
    # In place, in the same memory; None grads stay None.
    assert [g.data_ptr() for g in grads_of(ours)] == ptrs
    assert ours[3].grad is None
    for a, b in zip(grads_of(ours), grads_of(theirs)):   # torch's float32 norm is less exact
        torch.testing.assert_close(a, b, rtol=5e-5, atol=0)
    # Given our total norm, the scaling is torch's, bit for bit.
    again = twin(ours)
    for g, b in zip(grads_of(again), before):
        g.copy_(b)
    tu.clip_grads_with_norm_(again, max_norm, n_ours)
    for a, b in zip(grads_of(ours), grads_of(again)):
        assert torch.equal(a, b)
    if max_norm == 1e12:
        for a, b in zip(grads_of(ours), before):
            assert torch.equal(a, b)      # coefficient clamped to 1: nothing changes


def test_mixed_float32_float64_gives_float64_norm(no_fallback):
    ours = make_params(MLP, [torch.float32, torch.float64])
    theirs = twin(ours)
    n_ours = ct.clip_grad_norm_(ours, 0.1)
    n_theirs = tu.clip_grad_norm_(theirs, 0.1)
    assert n_ours.dtype == n_theirs.dtype == torch.float64
    torch.testing.assert_close(n_ours, n_theirs, rtol=1e-6, atol=0)
    for a, b in zip(grads_of(ours), grads_of(theirs)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


@pytest.mark.parametrize("form", ["list", "tuple", "generator", "module", "single"])
def test_parameter_forms(form, no_fallback):
    ours = make_params([(50, 3)] if form == "single" else MLP)
    theirs = twin(ours)
    before = [g.clone() for g in grads_of(ours)]
    model = torch.nn.Module()
    for i, p in enumerate(ours):
        model.register_parameter(f"p{i}", p)
    wrap = {"list": list, "tuple": tuple, "generator": lambda ps: (p for p in ps),
            "module": lambda ps: model.parameters() if ps is ours else iter(ps),
            "single": lambda ps: ps[0]}[form]
    n_ours = ct.clip_grad_norm_(wrap(ours), 0.5)
    n_theirs = tu.clip_grad_norm_(wrap(theirs), 0.5)
    assert_norm_close(n_ours, n_theirs, torch.float32)
    for a, b, c in zip(grads_of(ours), grads_of(theirs), before):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
        assert not torch.equal(a, c)         # really clipped


def test_real_model_after_backward(no_fallback):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    ref = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(32, 20), torch.randint(0, 3, (32,))
    for m in (model, ref):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    n_ours = ct.clip_grad_norm_(model.parameters(), 0.01)
    n_theirs = tu.clip_grad_norm_(ref.parameters(), 0.01)
    assert_norm_close(n_ours, n_theirs, torch.float32)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=0)
    assert ct.get_total_norm([p.grad for p in model.parameters()]).item() == pytest.approx(0.01,
                                                                                        rel=1e-4)


def test_all_grads_none_and_empty(no_fallback):
    params = make_params(MLP, none_at=range(len(MLP)))
    for got, want in [(ct.clip_grad_norm_(params, 1.0), tu.clip_grad_norm_(params, 1.0)),
                      (ct.clip_grad_norm_([], 1.0), tu.clip_grad_norm_([], 1.0)),
                      (ct.get_total_norm([]), tu.get_total_norm([]))]:
        assert got.dtype == want.dtype and got.shape == () and got.item() == want.item() == 0.0
    assert all(p.grad is None for p in params)
    assert ct.clip_grads_with_norm_(params, 1.0, torch.tensor(5.0)) is None


def test_empty_generator_warns_like_torch():
    with pytest.warns(UserWarning, match="empty generator") as ours:
        n = ct.clip_grad_norm_((p for p in []), 1.0)
    assert n.item() == 0.0
    with pytest.warns(UserWarning, match="empty generator") as theirs:
        tu.clip_grad_norm_((p for p in []), 1.0)
    assert str(ours[0].message) == str(theirs[0].message)
    assert ours[0].filename == __file__       # points at the caller, as torch's does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ct.clip_grad_norm_([], 1.0)            # an empty list does not warn


@pytest.mark.parametrize("norm_type", [2.0, 1.0, INF, 3.0])
@pytest.mark.parametrize("bad", ["nan", "inf", "both", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_like_torch(norm_type, bad, dtype, no_fallback):
    ours = make_params(MLP, dtype)
    if bad in ("nan", "both"):
        ours[2].grad[5, 7] = NAN
    if bad in ("inf", "both"):
        ours[4].grad[1, 2] = INF
    if bad == "-inf":
        ours[0].grad[0, 0] = -INF
    theirs = twin(ours)
    n_ours = ct.clip_grad_norm_(ours, 1.0, norm_type)
    n_theirs = tu.clip_grad_norm_(theirs, 1.0, norm_type)
    assert_norm_close(n_ours, n_theirs, dtype)
    want = NAN if bad in ("nan", "both") else INF
    assert (math.isnan(n_ours.item()) and math.isnan(want)) or n_ours.item() == want
    for a, b in zip(grads_of(ours), grads_of(theirs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_error_if_nonfinite_raises_and_modifies_nothing(bad, no_fallback):
    ours = make_params(MLP)
    ours[1].grad[3] = bad
    theirs = twin(ours)
    before = [g.clone() for g in grads_of(ours)]
    with pytest.raises(RuntimeError, match="non-finite") as ours_err:
        ct.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as theirs_err:
        tu.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    assert str(ours_err.value) == str(theirs_err.value)
    for a, b in zip(grads_of(ours), before):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    with pytest.raises(RuntimeError, match="non-finite"):
        ct.get_total_norm(before, error_if_nonfinite=True)


def test_float64_accumulation_keeps_float32_overflow_finite(no_fallback):
    # The one intended difference: torch squares in float32 and gets inf.
    ours = make_params([(1000,), (10,)], scale=1e20)
    before = [g.clone() for g in grads_of(ours)]
    n = ct.clip_grad_norm_(ours, 1.0)
    assert math.isfinite(n.item())
    assert n.item() == pytest.approx(ref_norm(before, 2.0), rel=1e-7)
    assert ct.get_total_norm(grads_of(ours)).item() == pytest.approx(1.0, rel=1e-5)
    # An L1 norm beyond float32's range rounds to inf in the float32 result, as torch's.
    big = make_params([(10,)])
    big[0].grad.fill_(3e38)
    assert ct.clip_grad_norm_(big, 1.0, norm_type=1).item() == INF
    assert torch.equal(big[0].grad, torch.zeros(10))        # scaled by 0, as torch does


@pytest.mark.parametrize("max_norm", [-1.0, -0.0, 0.0, INF, NAN])
def test_odd_max_norms_like_torch(max_norm, no_fallback):
    ours = make_params(MLP)
    theirs = twin(ours)
    ct.clip_grad_norm_(ours, max_norm)
    tu.clip_grad_norm_(theirs, max_norm)
    for a, b in zip(grads_of(ours), grads_of(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0, equal_nan=True)
        assert torch.equal(a.signbit(), b.signbit())


def test_strided_grads_scaled_in_place(no_fallback):
    base = torch.randn(64, 40, dtype=torch.float64)
    ours = make_params([(40, 64), (16,)])
    ours[0].grad = base.float().t()                     # a transposed view
    ours[1].grad = torch.randn(48)[::3]                 # a strided view
    theirs = twin(ours)
    ptr = ours[0].grad.data_ptr()
    n_ours = ct.clip_grad_norm_(ours, 0.3)
    n_theirs = tu.clip_grad_norm_(theirs, 0.3)
    assert_norm_close(n_ours, n_theirs, torch.float32)
    assert ours[0].grad.data_ptr() == ptr and not ours[0].grad.is_contiguous()
    for a, b in zip(grads_of(ours), grads_of(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


@pytest.mark.parametrize("foreach", [None, False, True])
def test_foreach_accepted(foreach, no_fallback):
    ours = make_params(MLP)
    theirs = twin(ours)
    n_ours = ct.clip_grad_norm_(ours, 0.5, foreach=foreach)
    n_theirs = tu.clip_grad_norm_(theirs, 0.5, foreach=foreach)
    assert_norm_close(n_ours, n_theirs, torch.float32)


# --- what goes to torch's own function -------------------------------------------------

def _fallback_cases():
    # (float16 and bfloat16 take clipcore's path: tests/test_half.py)
    cplx = make_params([(30, 5), (7,)], torch.complex64)
    mixed = make_params([(30, 5), (7,)]) + make_params([(4,)], torch.complex64)
    req = make_params([(30, 5)])
    req[0].grad.requires_grad_(True)
    dup = make_params([(30, 5)])
    dup = dup + dup                                  # the same gradient twice
    sparse = make_params([(30, 5)])
    sparse[0].grad = sparse[0].grad.to_sparse()
    return {"complex64": (cplx, 2.0), "mixed_c64": (mixed, 2.0),
            "requires_grad": (req, 2.0), "duplicate": (dup, 2.0), "sparse": (sparse, 2.0),
            "norm_0": (make_params(MLP), 0.0),
            "norm_-inf": (make_params(MLP), -INF), "norm_-2": (make_params(MLP), -2.0)}


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_fallback_to_torch_gives_torch_result(case, spy_fallback):
    ours, norm_type = _fallback_cases()[case]

    def run(fn, params):
        try:
            return fn(params, 0.5, norm_type), None
        except Exception as exc:   # torch may refuse (sparse); then we must refuse alike
            return None, exc
    theirs = _fallback_cases()[case][0]
    n_ours, e_ours = run(ct.clip_grad_norm_, ours)
    n_theirs, e_theirs = run(tu.clip_grad_norm_, theirs)
    assert spy_fallback == ["clip_grad_norm_"]
    assert type(e_ours) is type(e_theirs)
    if e_ours is None:
        assert n_ours.dtype == n_theirs.dtype
        torch.testing.assert_close(n_ours, n_theirs, rtol=0, atol=0, equal_nan=True)
        for a, b in zip(grads_of(ours), grads_of(theirs)):
            torch.testing.assert_close(a.to_dense() if a.is_sparse else a,
                                       b.to_dense() if b.is_sparse else b, rtol=0, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_negative_bit_grads_are_clipped_on_the_fast_path(norm_type, no_fallback):
    # Memory holding -value: a norm and a scaling do not depend on the sign.
    ours = make_params([(30, 5), (7,)])
    ours[0].grad = torch._neg_view(ours[0].grad)
    theirs = twin(ours)
    assert ours[0].grad.is_neg() and not theirs[0].grad.is_neg()
    n_ours = ct.clip_grad_norm_(ours, 0.5, norm_type)
    n_theirs = tu.clip_grad_norm_(theirs, 0.5, norm_type)
    assert_norm_close(n_ours, n_theirs, torch.float32)
    for a, b in zip(grads_of(ours), grads_of(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_self_overlapping_grad_goes_to_torch(spy_fallback):
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(1).expand(4)           # four elements, one memory location
    q = torch.nn.Parameter(torch.zeros(4))
    q.grad = torch.ones(1).expand(4)
    with pytest.raises(RuntimeError) as theirs:
        tu.clip_grad_norm_([q], 0.5)
    with pytest.raises(type(theirs.value)):
        ct.clip_grad_norm_([p], 0.5)
    assert spy_fallback == ["clip_grad_norm_"]
    # Reading is fine: the norm counts the element four times, as torch does.
    assert ct.get_total_norm([p.grad]).item() == tu.get_total_norm([p.grad]).item() == 2.0


def test_tensor_subclass_goes_to_torch(spy_fallback):
    class MyTensor(torch.Tensor):
        pass
    g = torch.randn(10).as_subclass(MyTensor)
    ct.get_total_norm([g])
    assert spy_fallback == ["get_total_norm"]


def test_bad_arguments_raise_like_torch():
    for fn_ours, fn_theirs in [(ct.clip_grad_norm_, tu.clip_grad_norm_)]:
        for args in [(make_params(MLP), "big"), (make_params(MLP), 1.0, "two"),
                     ([object()], 1.0)]:
            with pytest.raises(Exception) as theirs:
                fn_theirs(*args)
            with pytest.raises(type(theirs.value)):
                fn_ours(*args)
    with pytest.raises(ValueError):
        ct.clip_grad_value_(make_params(MLP), "x")


# --- get_total_norm and clip_grads_with_norm_ -------------------------------------------

@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_get_total_norm_matches_torch(norm_type, dtype, no_fallback):
    tensors = grads_of(make_params(MLP, dtype))
    before = [t.clone() for t in tensors]
    got = ct.get_total_norm(tensors, norm_type)
    assert_norm_close(got, tu.get_total_norm(tensors, norm_type), dtype)
    assert got.item() == pytest.approx(ref_norm(tensors, norm_type),
                                       rel=1e-7 if dtype == torch.float32 else 1e-13)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))    # read only
    # A single tensor and a generator work too.
    assert_norm_close(ct.get_total_norm(tensors[0], norm_type),
                      tu.get_total_norm(tensors[0], norm_type), dtype)
    assert ct.get_total_norm(iter(tensors), norm_type).item() == got.item()


def test_get_total_norm_of_parameters_that_require_grad(no_fallback):
    params = [torch.nn.Parameter(torch.randn(30, 4)), torch.nn.Parameter(torch.randn(4))]
    got = ct.get_total_norm(params)
    assert not got.requires_grad
    assert_norm_close(got, tu.get_total_norm(params), torch.float32)


def _total(value, dtype):
    return torch.tensor(value, dtype=dtype)


@settings(max_examples=1000, deadline=None)
@given(total=st.floats(0, 1e8) | st.floats(-1e3, 1e40)
       | st.sampled_from([0.0, INF, NAN, 1.0, -1e-6, -0.0, 3.4e38, 1e-45, -INF]),
       max_norm=st.floats(0, 1e8) | st.floats(-1e40, 1e40)
       | st.sampled_from([0.0, -0.0, 1.0, INF, -INF, NAN, 1e39, 1e-40]),
       tdtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
       gdtype=st.sampled_from([torch.float32, torch.float64]))
def test_clip_grads_with_norm_is_torch_bit_for_bit(total, max_norm, tdtype, gdtype):
    ours = make_params([(40, 3), (5,)], gdtype, seed=1)
    ours[0].grad[0, 0] = INF if total == INF else ours[0].grad[0, 0]
    theirs = twin(ours)
    total_norm = _total(total, tdtype)
    ct.clip_grads_with_norm_(ours, max_norm, total_norm)
    tu.clip_grads_with_norm_(theirs, max_norm, total_norm)
    for a, b in zip(grads_of(ours), grads_of(theirs)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


def test_clip_grads_with_norm_fast_path_and_total_norm_forms(no_fallback, monkeypatch):
    ours = make_params(MLP)
    theirs = twin(ours)
    ct.clip_grads_with_norm_(iter(ours), 1.0, torch.tensor(40.0, requires_grad=True))
    tu.clip_grads_with_norm_(iter(theirs), 1.0, torch.tensor(40.0))
    for a, b in zip(grads_of(ours), grads_of(theirs)):
        assert torch.equal(a, b)
    # A total norm that is not a 0-d CPU float tensor goes to torch, which decides.
    monkeypatch.undo()
    for total_norm in [torch.tensor([40.0]), 40.0, torch.tensor(40, dtype=torch.int64)]:
        ours, theirs = make_params(MLP), make_params(MLP)
        try:
            tu.clip_grads_with_norm_(theirs, 1.0, total_norm)
        except Exception as exc:
            with pytest.raises(type(exc)):
                ct.clip_grads_with_norm_(ours, 1.0, total_norm)
        else:
            ct.clip_grads_with_norm_(ours, 1.0, total_norm)
        for a, b in zip(grads_of(ours), grads_of(theirs)):
            assert torch.equal(a, b)


def test_clip_grad_norm_equals_get_total_norm_then_clip(no_fallback):
    a, b = make_params(MLP), make_params(MLP)
    n1 = ct.clip_grad_norm_(a, 0.7, 3.0)
    n2 = ct.get_total_norm(grads_of(b), 3.0)
    ct.clip_grads_with_norm_(b, 0.7, n2)
    assert torch.equal(n1, n2)
    assert all(torch.equal(x, y) for x, y in zip(grads_of(a), grads_of(b)))


# --- clip_grad_value_ -------------------------------------------------------------------

@pytest.mark.parametrize("clip_value", [0.5, 0.0, -0.3, INF, NAN, 1e-3, 0.1])
def test_clip_grad_value_is_torch_bit_for_bit(clip_value, no_fallback):
    ours = make_params(MLP + [(70000,)], none_at=(1,))
    ours[2].grad[0, :3] = torch.tensor([NAN, INF, -INF])
    theirs = twin(ours)
    ptrs = [g.data_ptr() for g in grads_of(ours)]
    saved = [g.clone() for g in grads_of(ours)]
    for step in range(3):       # the same gradients again
        for a, b, s in zip(grads_of(ours), grads_of(theirs), saved):
            a.copy_(s * (step + 1))
            b.copy_(s * (step + 1))
        assert ct.clip_grad_value_((p for p in ours), clip_value) is None
        tu.clip_grad_value_(theirs, clip_value)
        assert [g.data_ptr() for g in grads_of(ours)] == ptrs
        for a, b in zip(grads_of(ours), grads_of(theirs)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kind", ["float64", "transposed", "float16", "neg_bit"])
def test_clip_grad_value_other_grads_go_to_torch(kind, spy_fallback):
    dtype = {"float64": torch.float64, "float16": torch.float16}.get(kind, torch.float32)
    ours = make_params([(30, 20), (20,)], dtype)
    if kind == "transposed":
        ours[0] = torch.nn.Parameter(torch.zeros(20, 30))
        ours[0].grad = torch.randn(30, 20).t()
    elif kind == "neg_bit":     # a clamp depends on the sign: torch resolves the bit
        ours[0].grad = torch._neg_view(ours[0].grad)
    theirs = twin(ours)
    foreach = False if kind == "neg_bit" else None    # torch's foreach clamp refuses the bit
    ct.clip_grad_value_(iter(ours), 0.2, foreach=foreach)
    tu.clip_grad_value_(theirs, 0.2, foreach=foreach)
    assert spy_fallback == ["clip_grad_value_"]
    for a, b in zip(grads_of(ours), grads_of(theirs)):
        assert torch.equal(a, b)


# --- properties and the import rule ---------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.lists(st.integers(0, 300), min_size=0, max_size=6),
       scale=st.floats(1e-3, 1e3), max_norm=st.floats(1e-3, 10),
       p=st.sampled_from(NORM_TYPES), seed=st.integers(0, 2**16))
def test_property_clipped_norm_and_direction(n, scale, max_norm, p, seed):
    params = make_params([(k,) for k in n], seed=seed, scale=scale)
    before = [g.clone() for g in grads_of(params)]
    if p == math.inf and 0 in n:         # torch: no max over an empty tensor
        with pytest.raises(RuntimeError, match="infinity norm on an empty tensor"):
            ct.clip_grad_norm_(params, max_norm, p)
        return
    total = ct.clip_grad_norm_(params, max_norm, p).item()
    after = ct.get_total_norm(grads_of(params), p).item()
    assert after <= max_norm * (1 + 1e-5)
    if total > max_norm:
        for a, b in zip(grads_of(params), before):
            torch.testing.assert_close(a, b * (max_norm / (total + 1e-6)), rtol=1e-5, atol=0)
    else:
        assert all(torch.equal(a, b) for a, b in zip(grads_of(params), before))


def test_import_clipcore_does_not_import_torch():
    code = ("import sys, clipcore; assert 'torch' not in sys.modules; "
            "clipcore.global_norm([]); assert 'torch' not in sys.modules; "
            "import clipcore.torch; assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- gradients that persist between calls, or change ------------------------------------

def test_persistent_grads_over_steps(no_fallback):
    ours = make_params(MLP)
    theirs = twin(ours)
    saved = [g.clone() for g in grads_of(ours)]
    for step in range(4):
        for a, b, s in zip(grads_of(ours), grads_of(theirs), saved):
            a.copy_(s * (step + 1))
            b.copy_(s * (step + 1))
        n_ours = ct.clip_grad_norm_(ours, 0.5)
        n_theirs = tu.clip_grad_norm_(theirs, 0.5)
        assert_norm_close(n_ours, n_theirs, torch.float32)
        for a, b in zip(grads_of(ours), grads_of(theirs)):
            torch.testing.assert_close(a, b, rtol=5e-5, atol=0)


@pytest.mark.parametrize("change", ["new_tensor", "resize", "set_", "data", "as_strided",
                                    "transpose", "dtype", "drop_one"])
def test_changed_grads_between_calls(change, no_fallback):
    ours = make_params([(40, 30), (30,), (7,)])
    for _ in range(2):
        ct.clip_grad_norm_(ours, 1e9)
    g = ours[0].grad
    big = torch.randn(2000)
    if change == "new_tensor":
        ours[0].grad = torch.randn(40, 30)
    elif change == "resize":
        g.resize_(10, 30)                    # same pointer, fewer elements
        ours[0] = torch.nn.Parameter(torch.zeros(10, 30))
        ours[0].grad = g
    elif change == "set_":
        g.set_(big.untyped_storage(), 0, (40, 30), (30, 1))
    elif change == "data":
        g.data = big[:1200].view(40, 30)
    elif change == "as_strided":
        g.as_strided_((40, 30), (1, 40))     # same pointer, same elements, new layout
    elif change == "transpose":
        ours[0] = torch.nn.Parameter(torch.zeros(30, 40))
        ours[0].grad = g.t()
    elif change == "dtype":
        ours[0] = torch.nn.Parameter(torch.zeros(40, 30, dtype=torch.float64))
        ours[0].grad = g.double()
    elif change == "drop_one":
        ours[1].grad = None
    assert_clips_like_torch(ours)     # the norm is float64 when a float64 gradient came in


def test_keeps_no_gradient_alive(no_fallback):
    import gc
    ours = make_params(MLP)
    for _ in range(3):
        ct.clip_grad_norm_(ours, 0.5)
        ct.get_total_norm(grads_of(ours))
        ct.clip_grads_with_norm_(ours, 0.5, torch.tensor(3.0))
        ct.clip_grad_value_(ours, 0.01)
    refs = [weakref.ref(g) for g in grads_of(ours)]
    del ours
    gc.collect()
    assert all(r() is None for r in refs)


def test_fresh_grads_every_step_never_use_a_stale_plan(no_fallback):
    # zero_grad(set_to_none=True): new gradient tensors, often at the old addresses.
    ours = make_params(MLP)
    for step in range(5):
        for p in ours:
            p.grad = None
        for i, p in enumerate(ours):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 10 + i))
        assert_clips_like_torch(ours)


def test_get_total_norm_of_the_same_tensor_twice(no_fallback):
    t = torch.randn(100)
    for _ in range(3):
        got = ct.get_total_norm([t, t, t[:10]], 3.0)
        assert_norm_close(got, tu.get_total_norm([t, t, t[:10]], 3.0), torch.float32)


def test_restrided_grad_between_calls(no_fallback):
    big = torch.randn(5000)
    ours = make_params([(40, 30), (30,)])
    ours[0].grad = big[:2400].view(40, 60)[:, :30]          # strided from the start
    for _ in range(2):
        ct.clip_grad_norm_(ours, 1e9)
    ours[0].grad.as_strided_((40, 30), (120, 2))            # same pointer and size, other memory
    assert_clips_like_torch(ours)


def test_threads_clipping_their_own_models_at_once(no_fallback):
    import threading
    errors = []

    def worker(shapes, seed):
        try:
            ours = make_params(shapes, seed=seed)
            saved = [g.clone() for g in grads_of(ours)]
            theirs = twin(ours)
            want = tu.clip_grad_norm_(theirs, 0.5)
            for _ in range(100):
                for g, s in zip(grads_of(ours), saved):
                    g.copy_(s)
                got = ct.clip_grad_norm_(ours, 0.5)
                assert torch.equal(got, ct.get_total_norm(saved))
                for a, b in zip(grads_of(ours), grads_of(theirs)):
                    torch.testing.assert_close(a, b, rtol=5e-5, atol=0)
                assert got.item() == pytest.approx(want.item(), rel=2e-5)
        except Exception as exc:      # reported by the main thread
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(shapes, i)) for i, shapes in
               enumerate([[(64, 30), (30,)], [(64, 30), (30,)], [(500,), (3, 3)], MLP])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
