"""Regression tests for the defects of issue 12: each input either gives the right
answer or a clear TypeError/ValueError/RuntimeError with every buffer untouched."""
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import clipcore
from clipcore import _lists

IN_PLACE_OPS = {
    "clip_by_global_norm_": lambda x: clipcore.clip_by_global_norm_([x], 1.0),
    "Plan": lambda x: clipcore.Plan([x]).clip_by_global_norm_(1.0),
    "clip_by_norm_": lambda x: clipcore.clip_by_norm_(x, 1.0),
    "clip_by_value_": lambda x: clipcore.clip_by_value_(x, -1.0, 1.0),
    "relu_": lambda x: clipcore.relu_(x),
}


def torch_or_skip():
    return pytest.importorskip("torch")


# --- 1. the negative and conjugate bits ------------------------------------------------

def negative_bit_tensor():
    torch = torch_or_skip()
    v = torch.tensor([1 + 3j, 2 - 4j]).conj().imag        # values [-3, 4], memory [3, -4]
    assert v.is_neg()
    return v


@pytest.mark.parametrize("op, expected", [
    (lambda v: clipcore.relu(v), [0.0, 4.0]),
    (lambda v: clipcore.clip_by_value(v, -1.0, 2.0), [-1.0, 2.0]),
    (lambda v: clipcore.clip_by_global_norm([v], 1.0)[0][0], [-0.6, 0.8]),
    (lambda v: clipcore.clip_by_norm(v, 1.0), [-0.6, 0.8]),
    (lambda v: clipcore.maximum(v, 0.0), [0.0, 4.0]),
    (lambda v: clipcore.minimum(v, 0.0), [-3.0, 0.0]),
    (lambda v: clipcore.norm(v, ord=1), 7.0),
])
def test_negative_bit_tensors_read_their_values(op, expected):
    v = negative_bit_tensor()
    np.testing.assert_allclose(np.asarray(op(v)), expected, rtol=1e-6)


@pytest.mark.parametrize("op", list(IN_PLACE_OPS))
def test_negative_bit_tensors_are_refused_in_place(op):
    v = negative_bit_tensor()
    before = v.clone()
    with pytest.raises(TypeError, match="negative or conjugate bit"):
        IN_PLACE_OPS[op](v)
    assert v.equal(before)


# --- 2. buffers that overlap themselves -------------------------------------------------

def test_expanded_tensor_is_refused_in_place():
    torch = torch_or_skip()
    t = torch.tensor([3.0, 4.0])
    with pytest.raises(ValueError, match=r"t_list\[0\] overlaps itself"):
        clipcore.clip_by_global_norm_([t.expand(1000, 2)], 1.0)
    assert t.tolist() == [3.0, 4.0]


@pytest.mark.parametrize("op", list(IN_PLACE_OPS))
@pytest.mark.parametrize("shape, strides", [((10, 2), (0, 8)), ((3, 2), (8, 8)),
                                            ((4,), (0,)), ((2, 3), (16, 8))])
def test_self_overlapping_numpy_views_are_refused(op, shape, strides):
    a = np.array([3.0, 4.0, 5.0, 6.0])
    view = np.lib.stride_tricks.as_strided(a, shape, strides)
    with pytest.raises(ValueError, match="overlaps itself"):
        IN_PLACE_OPS[op](view)
    assert a.tolist() == [3.0, 4.0, 5.0, 6.0]


def test_disjoint_view_that_fails_the_quick_test_is_accepted():
    # strides (4, 6) on 2-byte items: the quick test cannot tell, the exact one can.
    a = np.arange(16, dtype=np.float16)
    view = np.lib.stride_tricks.as_strided(a, (3, 2), (4, 6))
    ref = view.astype(np.float64)
    norm = clipcore.clip_by_global_norm_([view], 1.0)
    assert norm == pytest.approx(np.linalg.norm(ref), rel=1e-3)
    np.testing.assert_allclose(view, ref / np.linalg.norm(ref), rtol=2e-3)


# --- 4, 6. a Plan that was never initialised, or re-initialised while in use -------------

class ForgetfulPlan(clipcore.Plan):
    def __init__(self, t_list):      # no super().__init__
        pass


@pytest.mark.parametrize("plan", [lambda: ForgetfulPlan([np.ones(3)]),
                                  lambda: clipcore.Plan.__new__(clipcore.Plan)])
@pytest.mark.parametrize("call", [len, lambda p: p.size, lambda p: p.global_norm(),
                                  lambda p: p.clip_by_global_norm_(1.0)])
def test_uninitialised_plan_raises(plan, call):
    with pytest.raises(RuntimeError, match="not initialised"):
        call(plan())


def test_private_entry_points_refuse_none():
    with pytest.raises(TypeError):
        _lists.scale_(None, 2.0)
    from clipcore import _torch
    with pytest.raises(TypeError):
        _torch.clip_like_torch_(None, 1.0, 2.0, False, False)


def test_reinitialising_a_plan_while_another_thread_clips_is_safe():
    plan = clipcore.Plan([np.ones(1 << 21, np.float32)], n_threads=2)
    done = threading.Event()
    errors = []

    def clip_until_done():
        try:
            while not done.is_set():
                plan.clip_by_global_norm_(1e9)
        except Exception as exc:     # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=clip_until_done)
    worker.start()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        plan.__init__([np.ones(1 << 21, np.float32)], n_threads=2)
    done.set()
    worker.join()
    assert not errors
    assert plan.global_norm() == pytest.approx(np.sqrt(1 << 21))


# --- 5. memory that moved under a Plan ----------------------------------------------------

@pytest.mark.parametrize("move", ["resize", "resize view base", "shrink"])
def test_plan_over_resized_numpy_array_raises(move):
    a = np.ones(1 << 16)
    plan = clipcore.Plan([a[::2] if move == "resize view base" else a])
    a.resize((1 << 18) if move != "shrink" else (16,), refcheck=False)
    with pytest.raises(RuntimeError, match="memory moved"):
        plan.clip_by_global_norm_(1.0)
    with pytest.raises(RuntimeError, match="memory moved"):
        plan.global_norm()


@pytest.mark.parametrize("move", ["resize_", "set_", "data"])
def test_plan_over_moved_tensor_raises(move):
    torch = torch_or_skip()
    t = torch.ones(1 << 16)
    plan = clipcore.Plan([t])
    if move == "resize_":
        t.resize_(1 << 18)
    elif move == "set_":
        t.set_(torch.ones(5).untyped_storage())
    else:
        t.data = torch.ones(7)
    before = t.numpy().tobytes()          # bytes: resize_'s new memory may hold NaN
    with pytest.raises(RuntimeError, match="changed since the Plan was built"):
        plan.clip_by_global_norm_(1.0)
    assert t.numpy().tobytes() == before


def test_plan_refuses_an_array_made_read_only_later():
    a = np.full(4, 2.0)
    plan = clipcore.Plan([a])
    a.flags.writeable = False
    with pytest.raises(ValueError, match=r"t_list\[0\].*read-only"):
        plan.clip_by_global_norm_(1.0)
    assert a.tolist() == [2.0] * 4


def test_plan_still_works_after_contents_change():
    torch = torch_or_skip()
    a, t = np.full(4, 2.0), torch.full((4,), 2.0)
    plan = clipcore.Plan([a, t])
    a *= 2.0
    t.mul_(2.0)                      # in place: same memory
    assert plan.clip_by_global_norm_(1.0) == pytest.approx(8.0 * np.sqrt(2.0))


# --- 7. autograd ----------------------------------------------------------------------------

@pytest.mark.parametrize("op", list(IN_PLACE_OPS))
def test_tensors_that_require_grad_are_refused_in_place(op):
    torch = torch_or_skip()
    a = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    z = (a * 2).exp()
    for t in (a, z):
        before = t.detach().clone()
        with pytest.raises(ValueError, match="requires grad"):
            IN_PLACE_OPS[op](t)
        assert t.detach().equal(before)
    z.sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), 2 * np.exp(2 * np.array([1.0, -2.0, 3.0])),
                               rtol=1e-6)


# --- 8. the overlap check stays O(n log n) -----------------------------------------------------

def test_overlap_check_of_interleaved_columns_is_n_log_n_and_exact(monkeypatch):
    # The quadratic check compared every pair of overlapping extents with
    # np.shares_memory (8000 column views: 32M pairs, 7.5 s); the group check
    # sorts the elements' addresses once and makes no pairwise call.
    pairs = []
    real = np.shares_memory
    monkeypatch.setattr(np, "shares_memory", lambda a, b, *k: pairs.append(1) or real(a, b, *k))
    base = np.zeros((2, 8000), np.float32)
    views = [base[:, i] for i in range(8000)]
    clipcore.Plan(views)
    clipcore.clip_by_global_norm_(views, 1.0)
    assert pairs == []
    with pytest.raises(ValueError, match=r"t_list\[17\] and t_list\[8000\] share memory"):
        clipcore.clip_by_global_norm_(views + [base[:, 17]], 1.0)


def test_overlap_of_float32_and_float64_views_of_the_same_bytes():
    raw = np.zeros(64, np.uint8)
    a = raw.view(np.float32)[::2]             # bytes 0-3, 8-11, ...
    b = raw[4:60].view(np.float64)[::2]       # bytes 4-11, 20-27, ...: meets a at 8-11
    with pytest.raises(ValueError, match="share memory"):
        clipcore.clip_by_global_norm_([a, b], 1.0)
    c = raw[4:].view(np.float32)[::2]         # bytes 4-7, 12-15, ...: disjoint from a
    clipcore.clip_by_global_norm_([a, c], 1.0)


# --- 10, 11. subclasses, masked arrays --------------------------------------------------------

class Hostile(np.ndarray):
    def __array_ufunc__(self, *args, **kwargs):
        raise RuntimeError("no ufuncs here")

    def __array_function__(self, *args, **kwargs):
        raise RuntimeError("no array functions here")


def test_subclass_code_never_runs_mid_clip():
    fast = np.full(4, 3.0, np.float32)
    slow = np.full(4, 4.0, np.float16).view(Hostile)   # NumPy scales float16
    norm = clipcore.clip_by_global_norm_([fast, slow], 1.0)
    assert norm == pytest.approx(10.0)
    np.testing.assert_allclose(fast, 0.3, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(slow.view(np.ndarray), np.float64), 0.4, rtol=1e-3)


@pytest.mark.parametrize("op", [
    lambda m: clipcore.clip_by_global_norm_([m], 1.0),
    lambda m: clipcore.Plan([m]),
    lambda m: clipcore.global_norm([m]),
    lambda m: clipcore.clip_by_global_norm([m], 1.0),
    lambda m: clipcore.relu(m),
    lambda m: clipcore.relu_(m),
    lambda m: clipcore.clip_by_norm(m, 1.0),
    lambda m: clipcore.clip_by_value_(m, 0.0, 1.0),
    lambda m: clipcore.norm(m),
])
def test_masked_arrays_are_refused(op):
    m = np.ma.array([3.0, 4.0, np.nan], mask=[0, 0, 1])
    with pytest.raises(TypeError, match="masked arrays are not supported"):
        op(m)
    assert m.data[:2].tolist() == [3.0, 4.0]


# --- 12. long double beyond float64's range ----------------------------------------------------

@pytest.mark.skipif(np.finfo(np.longdouble).max <= np.finfo(np.float64).max,
                    reason="long double is float64 here")
def test_long_double_beyond_float64_raises_untouched():
    x = np.array([np.longdouble("1e400"), 1], dtype=np.longdouble)
    before = x.copy()
    with pytest.raises(ValueError, match=r"t_list\[0\].*beyond float64's range"):
        clipcore.clip_by_global_norm_([x], 1.0)
    assert (x == before).all()
    inf = np.array([np.longdouble("inf")], dtype=np.longdouble)
    assert clipcore.global_norm([inf]) == np.inf      # a real inf is not refused


# --- the small ones -------------------------------------------------------------------------

@pytest.mark.parametrize("value, exc, match", [
    (10 ** 400, ValueError, "clip_norm must be a real number within float64's range"),
    (np.complex128(1 + 2j), TypeError, "clip_norm must be a real number"),
    (1 + 2j, TypeError, "clip_norm must be a real number"),
    (True, TypeError, "clip_norm must be a real number, got bool"),
    (np.bool_(True), TypeError, "clip_norm must be a real number"),
])
def test_bad_clip_norm_scalars(value, exc, match):
    a = np.full(2, 3.0)
    for call in (lambda: clipcore.clip_by_global_norm_([a], value),
                 lambda: clipcore.Plan([a]).clip_by_global_norm_(value)):
        with pytest.raises(exc, match=match):
            call()
    assert a.tolist() == [3.0, 3.0]


# --- a thread started with a small stack --------------------------------------------------------

def test_overlap_check_of_many_buffers_on_a_small_thread_stack():
    # 100 buffers take the radix sort, whose tables are on the heap.
    code = textwrap.dedent("""
        import threading, numpy as np, clipcore
        out = []
        def work():
            a = [np.ones(300, np.float32) for _ in range(100)]
            clipcore.clip_by_global_norm_(a, 1.0)
            out.append(clipcore.Plan(a).global_norm())
        threading.stack_size(256 * 1024)
        t = threading.Thread(target=work); t.start(); t.join()
        assert abs(out[0] - 1.0) < 1e-6, out
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- clipcore.torch where torch's float64 norm overflows -----------------------------------

@pytest.mark.parametrize("value, p", [(1e154, 2.0), (2e200, 3.5)])
def test_torch_float64_norm_is_finite_where_torchs_overflows(value, p):
    torch = torch_or_skip()
    import clipcore.torch
    grads = torch.full((2,), value, dtype=torch.float64)
    theirs = torch.nn.utils.get_total_norm([grads.clone()], p)
    assert theirs.item() == float("inf")                 # torch's sum overflows
    param = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    param.grad = grads.clone()
    norm = clipcore.torch.clip_grad_norm_([param], 1.0, norm_type=p, error_if_nonfinite=True)
    assert norm.item() == pytest.approx(value * 2 ** (1 / p), rel=1e-12)
    np.testing.assert_allclose(param.grad.numpy(), 2 ** (-1 / p), rtol=1e-6)


# --- float16 buffers scaled by a small factor ---------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, ">f4", ">f8"])
def test_slow_path_buffers_are_scaled_with_an_unrounded_factor(dtype):
    # The factor 1e-6 was cast to float16 (1.013e-6, a subnormal) before the multiply:
    # 1000 became 0.001013 instead of 0.001.
    a = np.array([1000.0, -500.0], dtype)
    for clip in (lambda: clipcore.clip_by_global_norm_([a], 1e-3 * np.sqrt(1.25)),
                 lambda: clipcore.Plan([a]).clip_by_global_norm_(1e-3 * np.sqrt(1.25))):
        a[...] = [1000.0, -500.0]
        clip()
        np.testing.assert_allclose(a.astype(np.float64), [1e-3, -5e-4],
                                   rtol=np.finfo(np.dtype(dtype)).eps)


# --- clipcore.torch: the tensors after a strided gradient -----------------------------------------

@pytest.mark.parametrize("dtype", ["bool", "float16", "int32"])
def test_gradients_after_a_strided_one_are_checked_too(dtype):
    # The check stopped at the first non-contiguous gradient: a later bool gradient
    # reached clipcore's Plan (TypeError where torch raises RuntimeError) and a later
    # float16 one was clipped by clipcore instead of torch.
    torch = torch_or_skip()
    import clipcore.torch as cct

    def params():
        a = torch.nn.Parameter(torch.zeros(3))
        a.grad = torch.arange(6.0)[::2]
        dt = getattr(torch, dtype)
        b = torch.nn.Parameter(torch.zeros(2, dtype=dt), requires_grad=dt.is_floating_point)
        b.grad = torch.tensor([3.0, -4.0]).to(dt)
        return [a, b]

    mine, theirs = params(), params()
    try:
        want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    except RuntimeError as exc:
        with pytest.raises(RuntimeError, match=str(exc)[:30]):
            cct.clip_grad_norm_(mine, 1.0)
        return
    got = cct.clip_grad_norm_(mine, 1.0)
    assert got.dtype == want.dtype and got.item() == pytest.approx(want.item(), rel=1e-3)
    for p, q in zip(mine, theirs):
        np.testing.assert_allclose(p.grad.float().numpy(), q.grad.float().numpy(), rtol=1e-3)


@pytest.mark.parametrize("fn", ["get_total_norm", "clip_grad_norm_"])
def test_max_norm_over_an_empty_tensor_raises_as_in_torch(fn):
    # clipcore.torch returned 0 (or scaled nothing) where torch raises: a maximum over
    # no elements has no identity.
    torch = torch_or_skip()
    import clipcore.torch as cct
    p = torch.nn.Parameter(torch.zeros(0))
    p.grad = torch.zeros(0)
    q = torch.nn.Parameter(torch.zeros(2))
    q.grad = torch.tensor([3.0, -4.0])
    arg = [p.grad, q.grad] if fn == "get_total_norm" else [p, q]
    with pytest.raises(RuntimeError) as want:
        getattr(torch.nn.utils, fn)(arg, 1.0 if fn == "clip_grad_norm_" else float("inf"),
                                    *(["inf"] if fn == "clip_grad_norm_" else []))
    with pytest.raises(RuntimeError, match="empty tensor"):
        getattr(cct, fn)(arg, *([1.0, float("inf")] if fn == "clip_grad_norm_" else
                                [float("inf")]))
    assert q.grad.tolist() == [3.0, -4.0]
    assert "empty tensor" in str(want.value)


# --- issue 14: one way to take memory, the same answer at every entry point ----------------------

def _needing_copies():
    """float32 [3, -4, 12] whose memory a kernel cannot read as it is (fresh each call)."""
    v = np.array([3.0, -4.0, 12.0], np.float32)
    raw = np.zeros(v.nbytes + 1, np.uint8)
    unaligned = raw[1:].view(np.float32)
    unaligned[:] = v
    return {"byteswapped": v.astype(v.dtype.newbyteorder()), "unaligned": unaligned}


@pytest.mark.parametrize("kind", ["byteswapped", "unaligned"])
def test_working_copy_inputs_agree_on_every_entry_point(kind):
    ref = np.array([3.0, -4.0, 12.0], np.float32)
    x = _needing_copies()[kind]
    assert _lists.needs_copy(x) and not _lists.needs_copy(ref)
    assert _lists.as_native(ref) is ref
    assert _lists.as_native(x).dtype.isnative and _lists.as_native(x).flags.aligned
    np.testing.assert_array_equal(_lists.as_native(x), ref)
    # lists: the layout (in place too) and the out-of-place pairs
    assert clipcore.global_norm([x]) == clipcore.global_norm([ref]) == 13.0
    (got,), norm = clipcore.clip_by_global_norm([x], 1.0)
    (want,), _ = clipcore.clip_by_global_norm([ref], 1.0)
    assert norm == 13.0
    np.testing.assert_array_equal(got, want)
    y, y_ref = _needing_copies()[kind], ref.copy()
    assert clipcore.clip_by_global_norm_([y], 1.0) == clipcore.clip_by_global_norm_([y_ref], 1.0)
    # (the kernel scales float32 by a float32 factor, NumPy a working copy's
    # original by a float64 one: the same to a float32 rounding)
    np.testing.assert_allclose(y, y_ref, rtol=np.finfo(np.float32).eps, atol=0)
    # the TF-named ops: as an input, and as out=
    np.testing.assert_array_equal(clipcore.clip_by_norm(x, 1.0), clipcore.clip_by_norm(ref, 1.0))
    np.testing.assert_array_equal(clipcore.maximum(x, 0.0), np.maximum(ref, 0.0))
    for op, expected in [(lambda t, out: clipcore.clip_by_value(t, -3.5, 3.5, out=out),
                          np.clip(ref, -3.5, 3.5)),
                         (lambda t, out: clipcore.clip_by_norm(t, 1.0, out=out),
                          clipcore.clip_by_norm(ref, 1.0))]:
        out = _needing_copies()[kind]            # out= takes the input's dtype
        op(x, out)
        np.testing.assert_array_equal(out, expected)
    # per-example clipping reads a working copy too
    (summed,), clipped = clipcore.per_example_global_norm_clip([x.reshape(1, 3)], 1.0)
    (summed_ref,), _ = clipcore.per_example_global_norm_clip([ref.reshape(1, 3)], 1.0)
    assert clipped == 1
    np.testing.assert_array_equal(summed, summed_ref)


def _counting_torch(monkeypatch):
    """clipcore.torch's fallbacks, counted by name (and still run)."""
    import types
    import clipcore.torch as cct
    calls = []

    def wrap(name):
        real = getattr(cct._torch, name)
        return lambda *a, **k: calls.append(name) or real(*a, **k)
    names = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"]
    monkeypatch.setattr(cct, "_torch", types.SimpleNamespace(**{n: wrap(n) for n in names}))
    return cct, calls


def test_requires_grad_is_decided_alike_on_every_entry_point(monkeypatch):
    torch = torch_or_skip()
    cct, calls = _counting_torch(monkeypatch)
    r = torch.tensor([3.0, 4.0], requires_grad=True)
    writes = [lambda: clipcore.clip_by_global_norm_([r], 1.0),
              lambda: clipcore.clip_by_norm_(r, 1.0),
              lambda: clipcore.clip_by_norm(np.ones(2, np.float32), 1.0, out=r),
              lambda: _lists.tensor_array(r, "t", _lists.FOR_SCALE)]
    for write in writes:
        with pytest.raises(ValueError, match="requires grad"):
            write()
    assert r.detach().tolist() == [3.0, 4.0]
    # read: the values, on every path (clipcore.torch's fast path too)
    assert clipcore.global_norm([r]) == 5.0
    np.testing.assert_allclose(clipcore.clip_by_norm(r, 1.0).detach().numpy(), [0.6, 0.8])
    assert cct.get_total_norm([r]).item() == 5.0 and calls == []
    # written by clipcore.torch: where the others raise, torch's own function
    assert _lists.tensor_array(r, None, _lists.FOR_SCALE) is None
    assert cct._memory([r], _lists.FOR_SCALE) is None
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = r
    cct.clip_grad_norm_([p], 1.0)
    assert calls == ["clip_grad_norm_"]


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_negative_bit_is_decided_alike_on_every_entry_point(layout, monkeypatch):
    torch = torch_or_skip()
    cct, calls = _counting_torch(monkeypatch)

    def make():                                    # values [-3, 4], memory [3, -4]
        v = torch._neg_view(torch.tensor([3.0, -4.0]))
        if layout == "strided":
            v = negative_bit_tensor()
            assert not v.is_contiguous()
        assert v.is_neg()
        return v
    v = make()
    for write in [lambda: clipcore.clip_by_global_norm_([v], 1.0),
                  lambda: clipcore.clip_by_value_(v, -1.0, 1.0),
                  lambda: clipcore.clip_by_norm(np.ones(2, np.float32), 1.0, out=v),
                  lambda: _lists.tensor_array(v, "t", _lists.FOR_WRITE)]:
        with pytest.raises(TypeError, match="negative or conjugate bit"):
            write()
    assert v.tolist() == [-3.0, 4.0]
    assert _lists.tensor_array(v, "t", _lists.FOR_READ).tolist() == [-3.0, 4.0]   # resolved
    np.testing.assert_allclose(clipcore.maximum(v, 0.0).numpy(), [0.0, 4.0])
    # clipcore.torch: a norm and a scaling do not look at signs (its fast path takes
    # the memory); the clamp does (torch's own function takes it)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = make()
    assert cct.clip_grad_norm_([p], 1.0).item() == 5.0
    np.testing.assert_allclose(p.grad.tolist(), [-0.6, 0.8], rtol=1e-6)
    assert cct.get_total_norm([make()]).item() == 5.0
    assert calls == []
    assert _lists.tensor_array(v, None, _lists.FOR_WRITE) is None
    p.grad = make()
    cct.clip_grad_value_([p], 1.0, foreach=False)      # (torch's foreach clamp refuses it)
    assert p.grad.tolist() == [-1.0, 1.0]
    assert calls == ["clip_grad_value_"]
