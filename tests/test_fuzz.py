"""Fuzz every public function with random lists of NumPy arrays and PyTorch tensors.

Each call either gives the answer of a float64 NumPy reference written here
(TensorFlow's formulas; for clipcore.torch, torch.nn.utils' own result on an
identical copy), or raises TypeError/ValueError (RuntimeError where torch does)
with every byte of every input buffer -- the bases of views included --
unchanged. Inputs the functions must accept (float arrays, disjoint and
writable for the in-place ones) must not raise; inputs they must refuse
(integer arrays in a norm, read-only or overlapping buffers in place, masked
arrays, ...) must raise. Out-of-place functions must leave every input byte
unchanged; in-place ones must not touch the bytes of a base outside its views.

Inputs are built from a drawn spec (plain data), so that the same objects can be
built twice (clipcore.torch is compared with torch on a second copy).

Profiles (tests/conftest.py): "ci" by default, ``--hypothesis-profile=long`` for
20,000 examples per test.
"""
import collections.abc
import math

import numpy as np
import pytest
from hypothesis import assume, event, given, note, strategies as st

import clipcore

INF, NAN = math.inf, math.nan

# ------------------------------------------------------------------ values
#
# Moderate magnitudes: |x| <= 1e6, nothing below 1e-3 but 0, plus an occasional
# 0 / nan / +-inf, so that the references here can be plain float64 NumPy.
# Extreme magnitudes (1e154, 1e-160, subnormals, 1e300) have their own tests
# with range-safe references: tests/test_kernel_guards.py.

_finite = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False).map(
    lambda v: v if abs(v) >= 1e-3 else 0.0)
_special = st.sampled_from([None] * 8 + [0.0, -0.0, NAN, INF, -INF])

NP_DTYPES = (["float32"] * 2 + ["float64"] * 2
             + ["float16", ">f4", ">f8", "int32", "bool", "complex64", "object"])
NP_LAYOUTS = ["C", "C", "F", "strided", "transposed", "zero", "offset", "unaligned"]
TORCH_DTYPES = ["float32"] * 2 + ["float64"] * 2 + ["float16", "bfloat16", "int32", "bool",
                                                    "complex64"]
TORCH_LAYOUTS = ["contig", "contig", "transposed", "strided", "expand", "offset", "negbit",
                 "grad_leaf", "grad_nonleaf"]


@st.composite
def values(draw, n):
    if n > 200:           # large arrays (threads, chunks): NumPy's generator
        seed = draw(st.integers(0, 2 ** 32 - 1))
        v = np.random.default_rng(seed).uniform(-1e3, 1e3, n)
        special = draw(_special)
        if special is not None:
            v[draw(st.integers(0, n - 1))] = special
        return v
    v = np.array(draw(st.lists(_finite, min_size=n, max_size=n)), np.float64)
    special = draw(_special)
    if special is not None and n:
        v[draw(st.integers(0, n - 1))] = special
    return v


@st.composite
def shapes(draw):
    if draw(st.integers(0, 23)) == 0:
        return draw(st.sampled_from([(70001,), (300, 257), (3, 40000)]))
    return tuple(draw(st.lists(st.integers(0, 4), max_size=3)))


CLEAN_DTYPES = ["float32", "float64", "float16", ">f4", ">f8"]
CLEAN_LAYOUTS = {"np": ["C", "F", "strided", "transposed", "offset", "unaligned"],
                 "torch": ["contig", "transposed", "strided", "offset"]}


@st.composite
def entry_spec(draw, fw, clean=False):
    """One t_list entry: a plain dict the builders turn into an object.

    clean: only what every function must take (float, writable, disjoint), so that
    about half of the examples get past validation to the values."""
    kind = draw(st.sampled_from(["array"] * 10 + ["none"] if clean else
                                ["array"] * 10 + ["none", "masked", "alias", "alias"]))
    if fw == "torch" and kind == "masked":
        kind = "array"
    spec = {"kind": kind, "fw": fw}
    if kind in ("none", "alias"):
        spec["variant"] = draw(st.sampled_from(["same", "whole", "rev"]))
        spec["target"] = draw(st.integers(0, 7))
        return spec
    shape = draw(shapes())
    if clean:
        dtypes = CLEAN_DTYPES if fw == "np" else ["float32", "float64", "float16"]
        layouts = CLEAN_LAYOUTS[fw]
    else:
        dtypes = NP_DTYPES if fw == "np" else TORCH_DTYPES
        layouts = NP_LAYOUTS if fw == "np" else TORCH_LAYOUTS
    spec.update(
        dtype=draw(st.sampled_from(dtypes)),
        shape=shape,
        layout=draw(st.sampled_from(layouts)),
        steps=[draw(st.sampled_from([1, 2, -1, -2] if fw == "np" else [1, 2]))
               for _ in shape],
        zero_axis=draw(st.integers(0, max(len(shape) - 1, 0))),
        readonly=fw == "np" and not clean and draw(st.integers(0, 9)) == 0,
        values=draw(values(math.prod(shape))),
        mask_seed=draw(st.integers(0, 100)))
    return spec


def _cast(v, dtype):
    """float64 values v as an array of dtype, kept in a range dtype can hold."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize == 2:
        return np.where(np.isfinite(v), np.clip(v, -1e3, 1e3), v).astype(dtype)
    if dtype.kind in "iu":
        return np.clip(np.round(np.nan_to_num(v, posinf=0, neginf=0)), -1e6, 1e6).astype(dtype)
    if dtype.kind == "b":
        return v != 0
    if dtype.kind == "c":
        with np.errstate(invalid="ignore"):
            return (v + 0.5j * v[::-1]).astype(dtype)
    return v.astype(dtype)


# ------------------------------------------------------------------ builders

def _first(v, n):
    """The first n values of v, padded with zeros."""
    return np.concatenate([v[:n], np.zeros(max(n - len(v), 0))])


class Case:
    """The built entries with their bases (the memory to watch) and facts."""

    def __init__(self):
        self.entries = []     # the objects passed
        self.bases = []       # ('np'|'torch', 1-d base) -- every byte watched
        self.base_of = []     # entry -> index into bases (None for None entries)
        self.covered = {}     # entry -> its bytes (see covered)


def _np_view(spec, case):
    shape, dtype, layout = tuple(spec["shape"]), np.dtype(spec["dtype"]), spec["layout"]
    n = math.prod(shape)
    if layout == "zero" and shape:
        ax = spec["zero_axis"]
        inner = shape[:ax] + (1,) + shape[ax + 1:]
        base = np.zeros(math.prod(inner) + 1, dtype)
        src = base[1:].reshape(inner)
        src[...] = _cast(_first(spec["values"], src.size), dtype).reshape(inner)
        strides = list(src.strides)
        strides[ax] = 0
        view = np.lib.stride_tricks.as_strided(src, shape, strides)
        return base, view
    if layout == "unaligned":
        raw = np.zeros(n * dtype.itemsize + 1, np.uint8)
        if dtype.kind == "O":       # object arrays cannot live in raw bytes
            raw = np.zeros(n + 1, dtype)
            view = raw[1:].reshape(shape)
        else:
            view = raw[1:].view(dtype).reshape(shape)
        view[...] = _cast(spec["values"], dtype).reshape(shape)
        return raw, view
    if layout == "strided":
        steps = spec["steps"]
        full = tuple(d * abs(s) for d, s in zip(shape, steps))
        base = np.zeros(math.prod(full), dtype)
        view = base.reshape(full)[tuple(slice(None, None, s) for s in steps) + (...,)]
    elif layout == "F":
        base = np.zeros(n, dtype)
        view = base.reshape(shape[::-1]).T
    elif layout == "transposed":
        base = np.zeros(n, dtype)
        perm = tuple(range(len(shape)))[1:] + tuple(range(len(shape)))[:1]
        tshape = tuple(shape[p] for p in np.argsort(perm))
        view = base.reshape(tshape).transpose(perm)
    elif layout == "offset":
        base = np.zeros(n + 3, dtype)
        view = base[2:n + 2].reshape(shape)
    else:
        base = np.zeros(n, dtype)
        view = base.reshape(shape)
    assert view.shape == shape
    view[...] = _cast(spec["values"], dtype).reshape(shape)
    return base, view


def _torch_dtype(name):
    import torch
    return getattr(torch, name)


def _torch_view(spec, case):
    import torch
    shape, layout = tuple(spec["shape"]), spec["layout"]
    dt = _torch_dtype(spec["dtype"])
    n = math.prod(shape)
    vals = spec["values"]
    is_float = dt.is_floating_point

    def filled(t):
        np_dt = {"bfloat16": "float32"}.get(spec["dtype"], spec["dtype"])
        t.copy_(torch.from_numpy(_cast(_first(vals, t.numel()), np_dt).reshape(t.shape)))
        return t

    if layout == "negbit":
        base = torch.zeros(n, dtype=torch.complex64 if spec["dtype"] != "float64"
                           else torch.complex128)
        real_dt = torch.float32 if base.dtype == torch.complex64 else torch.float64
        base.imag.copy_(-torch.from_numpy(_cast(vals, "float64")).to(real_dt))
        view = base.conj().imag.view(shape)
        return base, view
    if layout in ("grad_leaf", "grad_nonleaf") and (is_float or dt.is_complex):
        leaf = filled(torch.zeros(shape, dtype=dt)).requires_grad_(True)
        if layout == "grad_leaf":
            return leaf, leaf
        view = leaf * 1
        return view, view
    if layout == "expand" and shape:
        ax = spec["zero_axis"]
        inner = shape[:ax] + (1,) + shape[ax + 1:]
        base = torch.zeros(math.prod(inner) + 1, dtype=dt)
        src = filled(base[1:].view(inner))
        return base, src.expand(shape)
    if layout == "strided":
        steps = spec["steps"]
        full = tuple(d * s for d, s in zip(shape, steps))
        base = torch.zeros(math.prod(full), dtype=dt)
        view = base.view(full)[tuple(slice(None, None, s) for s in steps) + (...,)]
    elif layout == "transposed":
        base = torch.zeros(n, dtype=dt)
        view = base.view(shape[::-1]).permute(tuple(reversed(range(len(shape)))))
    elif layout == "offset":
        base = torch.zeros(n + 3, dtype=dt)
        view = base[2:n + 2].view(shape)
    else:
        base = torch.zeros(n, dtype=dt)
        view = base.view(shape)
    assert tuple(view.shape) == shape
    filled(view)
    return base, view


def _alias(spec, case):
    """Another view of an earlier entry's base (None if there is none to alias)."""
    candidates = [i for i, b in enumerate(case.base_of) if b is not None]
    if not candidates:
        return None, None
    i = candidates[spec["target"] % len(candidates)]
    target, b = case.entries[i], case.base_of[i]
    fw, base = case.bases[b]
    if isinstance(target, np.ma.MaskedArray):
        target = target.data
    if fw == "np":
        if spec["variant"] == "whole" and base.dtype != np.uint8:
            view = base.reshape(-1)
        elif spec["variant"] == "rev" and target.ndim:
            view = target[::-1]
        else:
            view = target[...]
        return b, view
    import torch
    if target.requires_grad or target.is_neg():
        return None, None
    if spec["variant"] == "whole":
        view = base.view(-1)
    else:
        view = base.as_strided(target.shape, target.stride(), target.storage_offset())
    return b, view


def build(specs):
    case = Case()
    for spec in specs:
        if spec["kind"] == "none":
            case.entries.append(None)
            case.base_of.append(None)
            continue
        if spec["kind"] == "alias":
            b, view = _alias(spec, case)
            case.entries.append(view)
            case.base_of.append(b)
            continue
        if spec["fw"] == "np":
            base, view = _np_view(spec, case)
            if spec["readonly"]:
                view.flags.writeable = False
            if spec["kind"] == "masked":
                rng = np.random.default_rng(spec["mask_seed"])
                view = np.ma.array(view, mask=rng.random(view.shape) < 0.3, copy=False)
        else:
            base, view = _torch_view(spec, case)
        case.bases.append((spec["fw"], base))
        case.base_of.append(len(case.bases) - 1)
        case.entries.append(view)
    return case


# ------------------------------------------------------------------ memory facts

def _is_torch(obj):
    return type(obj).__module__.startswith("torch")


def _raw(fw, base):
    """The bytes of a 1-d (or any contiguous) base, as a uint8 array copy."""
    if fw == "np":
        if base.dtype.kind == "O":
            return np.frombuffer(base.tobytes(), np.uint8).copy()
        return base.view(np.uint8).reshape(-1).copy()
    return base.detach().reshape(-1).view(__import__("torch").uint8).clone().numpy()


def snapshot(case):
    return [_raw(fw, b) for fw, b in case.bases]


def _geometry(obj, base):
    """(byte offset into base, shape, byte strides, itemsize) of obj."""
    if _is_torch(obj):
        es = obj.element_size()
        return (obj.data_ptr() - base.data_ptr(), tuple(obj.shape),
                tuple(s * es for s in obj.stride()), es)
    arr = obj.data if isinstance(obj, np.ma.MaskedArray) else obj
    return (arr.__array_interface__["data"][0] - base.__array_interface__["data"][0],
            arr.shape, arr.strides, arr.itemsize)


def _element_offsets(off, shape, strides):
    o = np.zeros((), np.int64)
    for n, s in zip(shape, strides):
        o = np.add.outer(o, np.arange(n, dtype=np.int64) * s)
    return o.ravel() + off


def covered(case, i):
    """Byte offsets (into its base) that entry i spans, sorted, with repeats."""
    if i not in case.covered:
        fw, base = case.bases[case.base_of[i]]
        off, shape, strides, itemsize = _geometry(case.entries[i], base)
        el = _element_offsets(off, shape, strides)
        case.covered[i] = np.sort((el[:, None] + np.arange(itemsize)).ravel())
    return case.covered[i]


def self_overlapping(case, i):
    b = covered(case, i)
    return bool(b.size) and bool((b[1:] == b[:-1]).any())


def overlapping(case, i, j):
    if case.base_of[i] != case.base_of[j]:
        return False
    return np.intersect1d(covered(case, i), covered(case, j)).size > 0


def assert_unchanged(case, before, what=""):
    after = snapshot(case)
    for k, (a, b) in enumerate(zip(before, after)):
        assert np.array_equal(a, b), f"{what}: base {k} was modified"


def assert_outside_views_unchanged(case, before):
    """In place: bytes of a base that no entry spans keep their values."""
    after = snapshot(case)
    for k, (a, b) in enumerate(zip(before, after)):
        mask = np.ones(a.size, bool)
        for i, bi in enumerate(case.base_of):
            if bi == k:
                mask[covered(case, i)] = False
        assert np.array_equal(a[mask], b[mask]), f"base {k}: bytes outside the views changed"


# ------------------------------------------------------------------ entry facts

def category(obj):
    """'float', 'int', 'bool', 'complex', 'object', 'bf16' (what clipcore cannot view)."""
    if _is_torch(obj):
        name = str(obj.dtype).split(".")[-1]
        if name == "bfloat16":
            return "bf16"
        if obj.dtype.is_floating_point:
            return "float"
        return {"bool": "bool", "complex64": "complex"}.get(name, "int")
    kind = np.asarray(obj.data if isinstance(obj, np.ma.MaskedArray) else obj).dtype.kind
    return {"f": "float", "i": "int", "u": "int", "b": "bool", "c": "complex"}.get(kind, "object")


def readable_ok(obj):
    """Readable as floats by the norms: a plain float array or tensor."""
    return not isinstance(obj, np.ma.MaskedArray) and category(obj) == "float"


def real_ok(obj):
    """Taken by relu/maximum/clip_by_value: float or integer."""
    return not isinstance(obj, np.ma.MaskedArray) and category(obj) in ("float", "int")


def writable(obj):
    if _is_torch(obj):
        return not (obj.requires_grad or obj.is_neg() or obj.is_conj())
    return not isinstance(obj, np.ma.MaskedArray) and obj.flags.writeable


def dtype_of(obj):
    """The NumPy dtype clipcore sees."""
    if _is_torch(obj):
        return None if category(obj) == "bf16" else np.dtype(str(obj.dtype).split(".")[-1])
    return obj.dtype


def value(obj):
    """obj's values as a NumPy array of its own dtype (a copy)."""
    if _is_torch(obj):
        t = obj.detach().resolve_neg().resolve_conj().clone()
        return (t.float() if category(obj) == "bf16" else t).numpy()
    return np.array(obj)


def as_np(result):
    if _is_torch(result):
        return result.detach().numpy()
    return np.asarray(result)


def f64(obj):
    v = value(obj)
    return (v.real if v.dtype.kind == "c" else v).astype(np.float64)


def tol(dtype, factor=4):
    """(rtol, atol) for results rounded to dtype once or twice."""
    fi = np.finfo(np.dtype(dtype).newbyteorder("="))
    return factor * float(fi.eps), factor * float(fi.smallest_subnormal)


def assert_close(actual, desired, dtype, factor=4, what="", extra_rtol=0.0):
    rtol, atol = tol(dtype, factor)
    rtol += extra_rtol
    actual = np.asarray(actual, np.float64)
    assert actual.shape == np.shape(desired), (what, actual.shape, np.shape(desired))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=what)


def ref_norm(arrays, p):
    """The p-norm of all values of arrays (float64)."""
    v = np.concatenate([np.abs(np.ravel(a)) for a in arrays] + [np.zeros(0)])
    if np.isnan(v).any():
        return NAN
    if v.size == 0:
        return 0.0
    if np.isinf(v).any():
        return INF
    if p == INF:
        return float(v.max())
    if p == 2:
        return float(np.sqrt(np.sum(v * v)))
    if p == 1:
        return float(np.sum(v))
    return float(np.sum(v ** p) ** (1.0 / p))


def norm_rtol(p):
    return 1e-12 if p in (1, 2, INF) else 1e-10


# ------------------------------------------------------------------ arguments

class Seq(collections.abc.Sequence):
    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def wrap_list(how, entries):
    """(t_list, valid): the entries in a container, or something that is not a list."""
    if how == "list":
        return list(entries), True
    if how == "tuple":
        return tuple(entries), True
    if how == "seq":
        return Seq(entries), True
    if how == "bare":
        first = next((e for e in entries if e is not None), None)
        return (first if first is not None else np.ones(3)), False
    return {"str": "abc", "gen": (e for e in entries), "dict": {0: entries},
            "int": 3, "none": None, "set": {1.0}}[how], False


WRAPS = st.sampled_from(["list"] * 12 + ["tuple", "seq", "bare", "str", "gen", "dict", "int",
                                         "none"])
THREADS = st.sampled_from([None, None, 1, 2, 3, 0])
# mostly below the norms of the values drawn, so that something gets clipped
CLIP_NORMS = st.one_of(st.sampled_from([0.0, 1e-3, 1.0, 3.0, 100.0, 1e4, 1e7, INF]),
                       st.floats(0, 1e3, allow_nan=False), st.floats(0, 10, allow_nan=False))
BAD_CLIP_NORMS = st.sampled_from([-1.0, NAN, "1.0", True, 1 + 2j, None, np.ones(2)])
NORM_TYPES = st.sampled_from([2, 2.0, 1, INF, 3])


def clip_norm_arg(draw):
    if draw(st.integers(0, 14)) == 0:
        return draw(BAD_CLIP_NORMS), False
    return draw(CLIP_NORMS), True


def threads_ok(nt):
    return nt is None or nt >= 1


# ------------------------------------------------------------------ the checks

def call_checked(case, fn, must, *, in_place, what):
    """Run fn(); on TypeError/ValueError check that nothing changed and return None.

    must: True (must not raise), False (must raise) or None (either)."""
    before = snapshot(case)
    try:
        result = fn()
    except (TypeError, ValueError) as exc:
        note(f"{what} raised {type(exc).__name__}: {exc}")
        event(f"{what}: raised {type(exc).__name__}")
        assert must is not True, f"{what} refused inputs it must take: {exc!r}"
        assert_unchanged(case, before, what)
        return None, before
    assert must is not False, f"{what} accepted inputs it must refuse"
    event(f"{what}: returned")
    if not in_place:
        assert_unchanged(case, before, what)
    return (result,), before


def list_state(case, in_place, indices=None):
    """Whether the list ops must take (True), must refuse (False) or may do either
    (None) the entries (those at indices)."""
    present = [i for i in (range(len(case.entries)) if indices is None else indices)
               if case.entries[i] is not None]
    for i in present:
        if not readable_ok(case.entries[i]):
            return False
        if in_place:
            e = case.entries[i]
            if not writable(e):
                return False if math.prod(e.shape) or _is_torch(e) else None
    if in_place:
        for i in present:
            if math.prod(case.entries[i].shape) and self_overlapping(case, i):
                return False
        for a in present:
            for b in present:
                if (a < b and math.prod(case.entries[a].shape)
                        and math.prod(case.entries[b].shape) and overlapping(case, a, b)):
                    return False
    return True


def check_in_place_list(case, before, values64, norm, clip_norm, use_norm, error_if, returned,
                        p):
    """After clip_by_global_norm_ (function or Plan) returned `returned`."""
    used = norm if use_norm is None else use_norm
    if use_norm is None:
        assert returned == pytest.approx(norm, rel=norm_rtol(p), nan_ok=True, abs=0), (
            returned, norm)
    else:
        assert returned == use_norm or (math.isnan(returned) and math.isnan(use_norm))
    assert not (error_if and not math.isfinite(used)), "error_if_nonfinite did not raise"
    assert_outside_views_unchanged(case, before)
    for i, e in enumerate(case.entries):
        if e is None:
            continue
        got = f64(e)
        if not math.isfinite(used):
            assert np.isnan(got).all(), f"t_list[{i}]: a non-finite norm must give NaN"
        elif used <= clip_norm:
            assert np.array_equal(value(e), values64[i][1], equal_nan=True), (
                f"t_list[{i}] was written though the norm {used} <= clip_norm {clip_norm}")
        else:
            # the norm's own rounding (a different summation order) comes on top
            assert_close(got, values64[i][0] * (clip_norm / used), dtype_of(e), 2,
                         f"t_list[{i}]", extra_rtol=norm_rtol(p) / 10)


def global_list_ops(draw, case, op):
    """The list functions: global_norm, clip_by_global_norm(_), Plan."""
    how = draw(WRAPS)
    t_list, valid = wrap_list(how, case.entries)
    nt = draw(THREADS)
    p = draw(NORM_TYPES)
    in_place = op in ("clip_by_global_norm_", "Plan")
    must = list_state(case, in_place) if valid else False
    if not threads_ok(nt):
        must = False
    values64 = [None if e is None else (f64(e), value(e)) for e in case.entries]
    present = [v[0] for v in values64 if v is not None]
    note(f"op={op} wrap={how} p={p} n_threads={nt} must={must}")

    if op == "global_norm":
        res, _ = call_checked(case, lambda: clipcore.global_norm(t_list, norm_type=p,
                                                                 n_threads=nt),
                              must, in_place=False, what=op)
        if res:
            assert type(res[0]) is float
            assert res[0] == pytest.approx(ref_norm(present, p), rel=norm_rtol(p), abs=0,
                                           nan_ok=True)
        return

    if op == "clip_by_global_norm":
        c, c_ok = clip_norm_arg(draw)
        if c_ok is False and not isinstance(c, (str, np.ndarray, complex)) and c is not None:
            c_ok = None       # TF takes any real scalar (negative, nan, bool): see below
        use_norm = draw(st.sampled_from([None] * 4 + [0.0, 2.0, 1e3, NAN, INF]))
        if not c_ok:
            must = False if c_ok is False else (None if must else must)
        res, _ = call_checked(
            case, lambda: clipcore.clip_by_global_norm(t_list, c, use_norm=use_norm,
                                                       n_threads=nt),
            must, in_place=False, what=op)
        if not res:
            return
        outs, norm_out = res[0]
        dts = [dtype_of(e) for e in case.entries if e is not None]
        ndt = np.result_type(*dts).type if dts else np.float32
        norm64 = ref_norm(present, 2)
        with np.errstate(all="ignore"):
            if use_norm is None:
                un = ndt(norm64)
                assert as_np(norm_out).item() == pytest.approx(float(un), rel=tol(ndt)[0],
                                                               nan_ok=True, abs=0)
            else:
                un = ndt(use_norm)
                assert norm_out is use_norm
            # TensorFlow: clip_norm * minimum(1 / use_norm, 1 / clip_norm), in the norm's
            # dtype, plus (use_norm - use_norm) so that a non-finite norm gives NaN.
            cc = un.dtype.type(c)
            one = un.dtype.type(1.0)
            scale = cc * np.minimum(one / un, one / cc) + (un - un)
        assert isinstance(outs, list) and len(outs) == len(case.entries)
        for i, (e, o) in enumerate(zip(case.entries, outs)):
            if e is None:
                assert o is None
                continue
            assert _is_torch(o) == _is_torch(e)
            o = as_np(o)
            assert o.dtype == dtype_of(e) and o.shape == tuple(e.shape)
            if not _is_torch(e):
                assert not np.shares_memory(o, case.bases[case.base_of[i]][1])
            with np.errstate(all="ignore"):
                s = np.float64(dtype_of(e).type(scale))
            # 2 ulps: the scale itself may round the other way (the norm's summation order)
            assert_close(o, values64[i][0] * s, dtype_of(e), 2, f"output {i}",
                         extra_rtol=1e-13)
        return

    # in place: the function, or a Plan
    c, c_ok = clip_norm_arg(draw)
    use_norm = draw(st.sampled_from([None] * 6 + [0.0, 2.0, 1e3, -1.0, NAN, INF]))
    error_if = draw(st.booleans())
    norm = ref_norm(present, p)
    used = norm if use_norm is None else use_norm
    must_call = must
    if not c_ok:
        must_call = False
    elif must and error_if and not math.isfinite(used):
        must_call = False
    kwargs = dict(use_norm=use_norm, norm_type=p, error_if_nonfinite=error_if)
    if op == "clip_by_global_norm_":
        res, before = call_checked(
            case, lambda: clipcore.clip_by_global_norm_(t_list, c, n_threads=nt, **kwargs),
            must_call, in_place=True, what=op)
    else:
        res, _ = call_checked(case, lambda: clipcore.Plan(t_list, n_threads=nt), must,
                              in_place=False, what="Plan()")
        if not res:
            return
        plan = res[0]
        assert len(plan) == sum(e is not None for e in case.entries)
        assert plan.size == sum(math.prod(e.shape) for e in case.entries if e is not None)
        res, _ = call_checked(case, lambda: plan.global_norm(norm_type=p), True,
                              in_place=False, what="Plan.global_norm")
        assert res[0] == pytest.approx(norm, rel=norm_rtol(p), abs=0, nan_ok=True)
        res, before = call_checked(case, lambda: plan.clip_by_global_norm_(c, **kwargs),
                                   must_call, in_place=True, what="Plan.clip_by_global_norm_")
    if res:
        check_in_place_list(case, before, values64, norm, c, use_norm, error_if, res[0], p)


# --- single-tensor functions

def pick(draw, case):
    present = [e for e in case.entries if e is not None]
    assume(present)
    return present[draw(st.integers(0, len(present) - 1))]


def normalize_axes(axes, ndim):
    """(axes tuple, ok) as clipcore._ops._axes; ok False for what must raise."""
    if axes is None:
        return tuple(range(ndim)), True
    seq = [axes] if isinstance(axes, int) else list(axes)
    out = []
    for a in seq:
        if not -ndim <= a < ndim or a % ndim in out:
            return None, False
        out.append(a % ndim)
    return tuple(sorted(out)), True


def draw_axes(draw, ndim):
    choice = draw(st.integers(0, 5))
    if choice == 0 or ndim == 0 and choice < 4:
        return None
    if choice == 1:
        return draw(st.integers(-ndim - 1, ndim))        # may be out of range
    if choice == 2:
        return draw(st.lists(st.integers(-ndim, max(ndim - 1, 0)), max_size=ndim + 1))
    if choice == 3:
        return []
    return draw(st.permutations(range(ndim))).__getitem__(slice(0, draw(st.integers(0, ndim))))


def draw_bound(draw, t, is_int):
    """A clip_by_value bound and the value clipcore should use (None: must raise)."""
    kind = draw(st.integers(0, 9))
    dt = dtype_of(t)
    shape = tuple(t.shape)
    if kind <= 4:
        v = draw(st.sampled_from([-1.0, 0.0, 2.5, 1e3, -1e5])) if kind < 3 else draw(
            st.sampled_from([NAN, INF, -INF]))
        if is_int:
            return v, None           # a Python float for an integer tensor
        with np.errstate(all="ignore"):
            return v, np.asarray(v).astype(dt)
    if kind <= 6:
        v = draw(st.integers(-1000, 1000))
        return v, np.asarray(v).astype(dt)
    if kind == 7:
        v = np.float64(draw(st.sampled_from([-2.0, 0.5, 7.0])))
        return v, np.asarray(v).astype(dt)
    # an array: broadcasting to t's shape (or not)
    bshape = shape[-1:] if draw(st.booleans()) else shape + (2,)
    v = np.linspace(-3, 3, math.prod(bshape)).reshape(bshape)
    try:
        ok = np.broadcast_shapes(bshape, shape) == shape
    except ValueError:
        ok = False
    return v, (v.astype(dt) if ok else None)


def entry_index(case, t):
    return next(i for i, e in enumerate(case.entries) if e is t)


_TENSOR, _ARRAY, _PYTHON = 0, 1, 2


def rank(obj):
    if _is_torch(obj):
        return _TENSOR
    return _ARRAY if isinstance(obj, (np.ndarray, np.generic)) else _PYTHON


def converted(a, ra, dtype):
    """An operand converted to dtype as TensorFlow converts it, or None (must raise)."""
    a = np.asarray(a)
    if a.dtype == dtype:
        return a
    if a.dtype.kind not in "fiub":
        return None
    if ra == _TENSOR:
        return None
    if ra == _PYTHON and a.dtype.kind == "f" and dtype.kind in "iu":
        return None
    with np.errstate(all="ignore"):
        return a.astype(dtype)


def assert_same(got, expected, what):
    got = np.asarray(got)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    assert got.dtype.newbyteorder("=") == expected.dtype.newbyteorder("="), (
        what, got.dtype, expected.dtype)
    np.testing.assert_array_equal(got, expected, err_msg=what)


def ref_norm_op(x64, ord, axis, keepdims, ndim):
    """tf.norm's value in float64, or None when clipcore must raise ValueError."""
    is_matrix = isinstance(axis, tuple) and len(axis) == 2
    with np.errstate(all="ignore"):
        if is_matrix:
            if ord not in ("euclidean", "fro", 1, 2, INF) or isinstance(ord, float) and ord not in (
                    1.0, 2.0, INF):
                return None
            (a0, a1), ok = [normalize_axes(a, ndim)[0] for a in axis], all(
                normalize_axes(a, ndim)[1] for a in axis)
            if not ok or a0 == a1:
                return None
            a0, a1 = a0[0], a1[0]
            axes = tuple(sorted((a0, a1)))
            if ord in ("euclidean", "fro"):
                res = np.sqrt(np.sum(x64 * x64, axis=axes, keepdims=True))
            elif ord == 2:
                m = np.moveaxis(x64, (a0, a1), (-2, -1))
                if m.shape[-1] == 0 or m.shape[-2] == 0:
                    sv = np.full(m.shape[:-2], -INF)
                else:
                    fin = np.isfinite(m).all(axis=(-2, -1))
                    sv = np.linalg.svd(np.where(fin[..., None, None], m, 0.0),
                                       compute_uv=False).max(axis=-1)
                    sv = np.where(fin, sv, NAN)
                res = np.expand_dims(sv, axes)
            else:
                first, second = (a0, a1) if ord == 1 else (a1, a0)
                sums = np.sum(np.abs(x64), axis=first, keepdims=True)
                res = np.max(sums, axis=second, keepdims=True, initial=-INF)
        else:
            if isinstance(ord, str) and ord != "euclidean" or not isinstance(ord, str) and not (
                    ord > 0):
                return None
            axes, ok = normalize_axes(axis, ndim)
            if not ok:
                return None
            a = np.abs(x64)
            if ord in ("euclidean", 2):
                res = np.sqrt(np.sum(a * a, axis=axes, keepdims=True))
            elif ord == 1:
                res = np.sum(a, axis=axes, keepdims=True)
            elif ord == INF:
                res = np.max(a, axis=axes, keepdims=True, initial=-INF)
            else:
                res = np.sum(a ** ord, axis=axes, keepdims=True) ** (1.0 / ord)
        if not keepdims:
            res = np.squeeze(res, axis=axes)
        return res


def single_ops(draw, case, op):
    t = pick(draw, case)
    i = entry_index(case, t)
    nt = draw(THREADS)
    in_place = op.endswith("_")
    fn = getattr(clipcore, op)
    shape = tuple(t.shape)
    size = math.prod(shape)
    masked = isinstance(t, np.ma.MaskedArray)
    cat = category(t)
    dt = None if masked or cat == "bf16" else dtype_of(t)
    real, flt = real_ok(t), readable_ok(t)
    wr = writable(t) and not (size and self_overlapping(case, i))
    x = value(t) if real else None               # in its own dtype
    x64 = None if x is None else x.astype(np.float64)
    note(f"op={op} t=entry {i}: {type(t).__name__} {dt} {shape} n_threads={nt} "
         f"writable={wr}")

    def must(ok):
        if not threads_ok(nt) or masked:
            return False
        if in_place and not wr:
            return None if size == 0 and ok is not False else False
        return ok

    def run(call, ok):
        return call_checked(case, call, must(ok), in_place=in_place, what=op)

    def result_of(res):
        if in_place:
            assert res[0] is t, "the in-place form returns its argument"
            assert_outside_views_unchanged(case, before_of[0])
            return value(t)
        r = res[0]
        assert _is_torch(r) == _is_torch(t), type(r)
        return as_np(r)

    before_of = [None]

    def go(call, ok):
        res, before = run(call, ok)
        before_of[0] = before
        return res

    if op in ("relu", "relu_"):
        res = go(lambda: fn(t, n_threads=nt), real)
        if res:
            assert_same(result_of(res), np.maximum(x, np.zeros((), x.dtype)), op)
        return

    if op in ("clip_by_value", "clip_by_value_"):
        if dt is None or not real:
            lo, lo_c, hi, hi_c = -1.0, None, 1.0, None
        else:
            lo, lo_c = draw_bound(draw, t, dt.kind in "iu")
            hi, hi_c = draw_bound(draw, t, dt.kind in "iu")
        ok = real and lo_c is not None and hi_c is not None
        res = go(lambda: fn(t, lo, hi, n_threads=nt), ok)
        if res:
            assert_same(result_of(res), np.maximum(np.minimum(x, hi_c), lo_c).astype(x.dtype),
                        op)
        return

    if op in ("maximum", "minimum"):
        kind = draw(st.integers(0, 3))
        if kind == 0:
            y = draw(st.sampled_from([0.0, -1.5, 3.0, NAN, -INF]))
        elif kind == 1:
            y = draw(st.integers(-5, 5))
        elif kind == 2:
            y = pick(draw, case)
        else:
            y = np.float32(draw(st.sampled_from([0.5, -2.0])))
        swap = kind == 2 and draw(st.booleans())
        a, b = (y, t) if swap else (t, y)
        expected = None
        bad = any(isinstance(o, np.ma.MaskedArray) or _is_torch(o) and category(o) == "bf16"
                  for o in (a, b))
        if not bad:
            ra, rb = rank(a), rank(b)
            va = value(a) if ra != _PYTHON else np.asarray(a)
            vb = value(b) if rb != _PYTHON else np.asarray(b)
            dtype = va.dtype if ra <= rb else vb.dtype
            if dtype.kind in "fiu":
                ca, cb = converted(va, ra, dtype), converted(vb, rb, dtype)
                if ca is not None and cb is not None:
                    try:
                        np.broadcast_shapes(ca.shape, cb.shape)
                        expected = (np.maximum if op == "maximum" else np.minimum)(ca, cb)
                    except ValueError:
                        pass
        res = go(lambda: fn(a, b, n_threads=nt), expected is not None)
        if res:
            r = res[0]
            assert _is_torch(r) == (_is_torch(a) or _is_torch(b))
            assert_same(as_np(r), np.asarray(expected), op)
        return

    if op in ("clip_by_norm", "clip_by_norm_"):
        ndim = len(shape)
        axes = draw_axes(draw, ndim)
        axes_n, axes_ok = normalize_axes(axes, ndim)
        ck = draw(st.integers(0, 9))
        if ck <= 5:
            c = draw(st.sampled_from([0.0, 1e-3, 1.0, 3.0, 1e3, 1e7, INF, -1.0, NAN]))
        elif ck <= 7:
            cshape = shape[-1:] if draw(st.booleans()) or not shape else shape
            c = np.linspace(0.5, 4.0, math.prod(cshape)).reshape(cshape)
            if ck == 7:
                c = c - 2.0            # some negative: treated as 0
        elif ck == 8:
            c = np.ones(shape + (2,))  # does not broadcast to t's shape
        else:
            c = "1.0"
        c_ok = not isinstance(c, str) and not (isinstance(c, np.ndarray) and ck == 8)
        ok = flt and axes_ok and (c_ok if size else (None if not isinstance(c, str) else False))
        if flt and axes_ok and not c_ok and size == 0 and ck == 8:
            ok = None        # nothing to clip: the clip norms' shape may go unchecked
        res = go(lambda: fn(t, c, axes, n_threads=nt), ok)
        if res:
            got = result_of(res)
            assert got.shape == shape and got.dtype.newbyteorder("=") == dt.newbyteorder("=")
            if size == 0:
                return
            with np.errstate(all="ignore"):
                l2 = np.sqrt(np.sum(x64 * x64, axis=axes_n, keepdims=True))
                if isinstance(c, np.ndarray):
                    c64 = np.maximum(c, 0).astype(dt).astype(np.float64)
                else:
                    c64 = float(dt.type(0.0 if c < 0 else c))
                expected = (x64 * c64 / np.maximum(l2, c64)).astype(dt)
            assert_close(got, expected.astype(np.float64), dt, 4, op, extra_rtol=1e-13)
        return

    if op == "clip_by_average_norm":
        c = draw(st.sampled_from([0.0, 0.5, 1.0, 10.0, -1.0, 1e4, INF, NAN, "x", np.ones(2)]))
        ok = flt and not isinstance(c, (str, np.ndarray))
        res = go(lambda: fn(t, c, n_threads=nt), ok)
        if res:
            got = result_of(res)
            tt = dt.newbyteorder("=").type
            with np.errstate(all="ignore"):
                # TF: t * clip_norm * minimum(rsqrt(l2sum) * size, 1 / clip_norm), in t's dtype
                cc = tt(c)
                inv = tt(1.0 / np.sqrt(np.sum(x64 * x64)))
                m = np.minimum(inv * tt(np.float32(size)), tt(1.0) / cc)
                expected = (x.astype(tt) * cc) * m
            assert_close(got, expected.astype(np.float64), dt, 4, op)
        return

    if op == "norm":
        ndim = len(shape)
        ord = draw(st.sampled_from(["euclidean", "fro", 1, 2, INF, 3, 0.5, 2.0, 0, -1, "nuc"]))
        ak = draw(st.integers(0, 3))
        if ak == 0:
            axis = None
        elif ak == 1:
            axis = draw(st.integers(-ndim - 1, ndim))
        else:
            axis = (draw(st.integers(-ndim, ndim)), draw(st.integers(-ndim, ndim)))
        keepdims = draw(st.sampled_from([None, True, False]))
        expected = ref_norm_op(x64 if flt else np.zeros(shape), ord, axis, keepdims, ndim)
        res = go(lambda: fn(t, ord=ord, axis=axis, keepdims=keepdims, n_threads=nt),
                 flt and expected is not None)
        if res:
            got = result_of(res)
            with np.errstate(all="ignore"):
                expected = np.asarray(expected).astype(dt).astype(np.float64)
            rtol = max(tol(dt)[0], 1e-10)
            assert got.shape == expected.shape, (got.shape, expected.shape)
            np.testing.assert_allclose(got.astype(np.float64), expected, rtol=rtol,
                                       atol=tol(dt)[1])
        return

    raise AssertionError(op)


TF_OPS = ["global_norm", "clip_by_global_norm_", "Plan", "clip_by_global_norm",
          "clip_by_norm", "clip_by_norm_", "clip_by_value", "clip_by_value_", "relu", "relu_",
          "maximum", "minimum", "norm", "clip_by_average_norm"]


def run_tf_op(data, op, specs):
    case = build(specs)
    if op in ("global_norm", "clip_by_global_norm_", "Plan", "clip_by_global_norm"):
        global_list_ops(data.draw, case, op)
    else:
        single_ops(data.draw, case, op)


def _specs(data, fws):
    clean = data.draw(st.booleans(), label="clean")
    return data.draw(st.lists(st.sampled_from(fws).flatmap(lambda fw: entry_spec(fw, clean)),
                              max_size=5), label="specs")


@pytest.mark.parametrize("op", TF_OPS)
@given(data=st.data())
def test_fuzz_numpy(op, data):
    run_tf_op(data, op, _specs(data, ["np"]))


@pytest.mark.parametrize("op", TF_OPS)
@given(data=st.data())
def test_fuzz_torch_tensors_in_tf_named_functions(op, data):
    pytest.importorskip("torch")
    run_tf_op(data, op, _specs(data, ["np", "torch", "torch"]))


# ------------------------------------------------------------------ clipcore.torch

def _params(case):
    """Parameters whose .grad are the case's tensors (None: a parameter without one)."""
    import torch
    params = []
    for e in case.entries:
        if e is None:
            params.append(torch.nn.Parameter(torch.zeros(1)))
            continue
        p = torch.nn.Parameter(torch.zeros(e.shape, dtype=e.dtype),
                               requires_grad=e.dtype.is_floating_point or e.dtype.is_complex)
        p.grad = e
        params.append(p)
    return params


def _outcome(fn):
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, exc = fn(), None
        except Exception as e:      # compared with what torch raises
            result, exc = None, e
    # torch's own C++ warnings come once per process: only the Python-level ones compare
    return result, exc, sorted({(w.category.__name__, str(w.message)) for w in caught
                                if "generator" in str(w.message)})


def _torch_half_norm_overflows(entries, form, p):
    """clipcore.torch's intended difference (its module docstring): in a list not
    all float16, a float16 gradient whose own norm exceeds float16's range gives
    torch an inf total (it takes each norm in the gradient's dtype first), and
    clipcore the finite norm of every element."""
    import torch
    grads = [e for e in entries if e is not None][:1 if form == "one" else None]
    if not isinstance(p, (int, float)) or p <= 0 or all(g.dtype == torch.float16 for g in grads):
        return False
    return any(g.dtype == torch.float16 and g.numel()
               and torch.isinf(torch.linalg.vector_norm(g, float(p)))
               and torch.isfinite(torch.linalg.vector_norm(g.double(), float(p)))
               for g in grads)


def _torch_rtol(dtype):
    """float64, float32; float16/bfloat16 always go to torch (the same computation)."""
    name = str(dtype).split(".")[-1]
    return {"float64": 1e-10, "float32": 2e-5}.get(name, 1e-2)


@pytest.mark.parametrize("op", ["clip_grad_norm_", "clip_grad_value_", "get_total_norm",
                                "clip_grads_with_norm_"])
@given(data=st.data())
def test_fuzz_clipcore_torch(op, data):
    torch = pytest.importorskip("torch")
    import clipcore.torch as cct
    specs = _specs(data, ["torch"])
    mine, theirs = build(specs), build(specs)       # two identical sets of tensors
    form = data.draw(st.sampled_from(["list", "list", "gen", "one"]))
    foreach = data.draw(st.sampled_from([None, None, False, True]))

    def args(case):
        if op == "get_total_norm":
            items = [e for e in case.entries if e is not None]
        else:
            items = _params(case)
        if form == "one" and items:
            return items[0]
        return iter(items) if form == "gen" else items

    if op in ("clip_grad_norm_", "get_total_norm"):
        p = data.draw(st.sampled_from([2, 2.0, 1, INF, 3, 0.5, 0, -1, "inf"]))
        err = data.draw(st.booleans())
        extra = (p, err, foreach)
        if op == "clip_grad_norm_":
            max_norm = data.draw(st.sampled_from([1.0, 0.0, 1e-3, 5.0, 1e6, -1.0, INF, NAN]))
            extra = (max_norm,) + extra
    elif op == "clip_grad_value_":
        extra = (data.draw(st.sampled_from([0.5, 1.0, 0.0, 1e3, -1.0, NAN, INF])), foreach)
    else:
        max_norm = data.draw(st.sampled_from([1.0, 0.0, 5.0, -1.0, NAN]))
        total = data.draw(st.sampled_from([torch.tensor(3.0), torch.tensor(0.0, dtype=torch.float64),
                                           torch.tensor(NAN), torch.tensor(1e6), 4.0]))
        extra = (max_norm, total, foreach)
    note(f"op={op} form={form} args={extra}")
    if op in ("clip_grad_norm_", "get_total_norm"):
        assume(not _torch_half_norm_overflows(mine.entries, form, extra[-3]))
    before, before_theirs = snapshot(mine), snapshot(theirs)
    got, got_exc, got_warn = _outcome(lambda: getattr(cct, op)(args(mine), *extra))
    want, want_exc, want_warn = _outcome(lambda: getattr(torch.nn.utils, op)(args(theirs), *extra))
    note(f"clipcore: {got!r} {got_exc!r}; torch: {want!r} {want_exc!r}")
    # torch's norm has the precision of the least precise gradient (and so its scaling)
    rtol = max([1e-10] + [_torch_rtol(e.dtype) for e in mine.entries if e is not None])
    assert got_warn == want_warn
    if want_exc is not None and extra[-1] is not False and got_exc is None:
        # torch's foreach kernels refuse what its per-tensor loop takes (an empty list
        # in _foreach_clamp_, tensors with the negative bit): clipcore may answer as
        # that loop does
        theirs = build(specs)
        before_theirs = snapshot(theirs)
        want, want_exc, _ = _outcome(
            lambda: getattr(torch.nn.utils, op)(args(theirs), *extra[:-1], False))
        note(f"torch with foreach=False: {want!r} {want_exc!r}")
    if (want_exc is not None and op == "clip_grad_value_" and got_exc is None
            and all(e is None for e in (theirs.entries[:1] if form == "one"
                                        else theirs.entries))):
        # torch 2.13's clip_grad_value_ raises on no gradients at all, foreach or not
        # (an internal check of _foreach_clamp_); doing nothing is what it means to do
        want_exc = None
    if want_exc is not None:
        assert type(got_exc) is type(want_exc), (got_exc, want_exc)
        event(f"torch.{op}: raised {type(want_exc).__name__}")
        if all(np.array_equal(a, b) for a, b in zip(before_theirs, snapshot(theirs))):
            assert_unchanged(mine, before, op)
        # else torch itself wrote some gradients before it raised (a dtype it cannot
        # clamp after one it could): clipcore must have done the same, compared below
    else:
        assert got_exc is None, f"clipcore raised {got_exc!r} where torch returned {want!r}"
        event(f"torch.{op}: returned")
        if want is None:
            assert got is None
        else:
            assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == ()
            np.testing.assert_allclose(got.item(), want.item(),
                                       rtol=rtol)
    for k, ((fw, a), (_, b)) in enumerate(zip(mine.bases, theirs.bases)):
        a, b = a.detach(), b.detach()
        if a.dtype == torch.bfloat16:
            a, b = a.float(), b.float()
        a, b = a.numpy(), b.numpy()
        if a.dtype.kind in "fc":
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-30,
                                       err_msg=f"base {k}")
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"base {k}")


# ------------------------------------------------------------------ DP-SGD and AGC
#
# The references: optax's formulas (per_example_global_norm_clip with clipcore's
# NaN rule, adaptive_grad_clip's unitwise_norm) in float64 NumPy.

def _reshaped(draw, spec, shape):
    """spec (an array entry) with another shape, and values drawn for it."""
    spec.update(shape=shape, steps=[draw(st.sampled_from([1, 2, -1, -2])) for _ in shape],
                zero_axis=draw(st.integers(0, max(len(shape) - 1, 0))),
                values=draw(values(math.prod(shape))))


def _sums_close(got, want, scale, dtype, what):
    """got == want up to one rounding to dtype of sums whose terms add up to
    scale, and the rounding of the norms the factors come from."""
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert (np.isnan(got) == np.isnan(want)).all(), what
    ok = ~np.isnan(want)
    rtol, atol = tol(dtype, 8)
    rtol += norm_rtol(2)
    assert (np.abs(got[ok] - want[ok]) <= rtol * scale[ok] + atol).all(), (what, got, want)


@given(data=st.data())
def test_fuzz_per_example_global_norm_clip(data):
    draw = data.draw
    clean = draw(st.booleans(), label="clean")
    batch = draw(st.integers(0, 4), label="batch")
    specs = draw(st.lists(entry_spec("np", clean), min_size=1, max_size=4), label="specs")
    odd = draw(st.integers(-1, 3 * len(specs)), label="entry with another batch size")
    for k, spec in enumerate(specs):
        if spec["kind"] in ("array", "masked"):
            rest = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
            _reshaped(draw, spec, (batch + (k == odd),) + rest)
    case = build(specs)
    grads = list(case.entries)
    c, c_ok = clip_norm_arg(draw)
    nt = draw(THREADS)
    entries_ok = all(g is not None and readable_ok(g) and g.ndim >= 1 for g in grads)
    batches = {g.shape[0] for g in grads if g is not None and g.ndim >= 1}
    must = c_ok and threads_ok(nt) and entries_ok and len(batches) == 1
    if must and any(spec["kind"] == "alias" for spec in specs):
        must = None                       # an alias's shape may or may not fit the batch
    with_out = must and draw(st.sampled_from(["none", "none", "good", "readonly", "shape"]))
    outs = None
    if with_out and with_out != "none":
        outs = [np.full(g.shape[1:] if with_out != "shape" else g.shape, -7.0, g.dtype)
                for g in grads]
        if with_out == "readonly":
            outs[-1].flags.writeable = False
        must = with_out == "good"
    out_before = None if outs is None else [o.copy() for o in outs]
    res, _ = call_checked(case, lambda: clipcore.per_example_global_norm_clip(
        grads, c, out=outs, n_threads=nt), must, in_place=False, what="per_example_global_norm_clip")
    if res is None:
        if outs is not None:
            assert all(np.array_equal(o, b) for o, b in zip(outs, out_before)), "out written"
        return
    summed, num_clipped = res[0]
    b = grads[0].shape[0]
    rows = [f64(g).reshape(b, math.prod(g.shape[1:])) for g in grads]
    norms = np.sqrt(sum(np.sum(r * r, axis=1) for r in rows)) if b else np.zeros(0)
    with np.errstate(all="ignore"):
        mult = np.where(norms > c, c / norms, 1.0)
    mult[~np.isfinite(norms)] = NAN
    assert num_clipped == int(np.count_nonzero(norms > c))
    if outs is not None:
        assert all(s is o for s, o in zip(summed, outs))
    for k, (g, r) in enumerate(zip(grads, rows)):
        assert summed[k].dtype == g.dtype and summed[k].shape == g.shape[1:]
        with np.errstate(all="ignore"):
            want = (mult @ r).reshape(g.shape[1:])
            scale = (np.abs(mult) @ np.abs(r)).reshape(g.shape[1:])
        _sums_close(summed[k], want, scale, g.dtype, f"summed[{k}]")


def _optax_unit_axes(shape):
    """optax.unitwise_norm's axes: the whole array when at most one axis is longer than 1."""
    if sum(n != 1 for n in shape) <= 1:
        return tuple(range(len(shape)))
    return {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}[len(shape)]


@given(data=st.data())
def test_fuzz_adaptive_grad_clip_(data):
    draw = data.draw
    clean = draw(st.booleans(), label="clean")
    gspecs = draw(st.lists(entry_spec("np", clean), min_size=1, max_size=4), label="grads")
    pspecs = []
    for spec in gspecs:                      # a parameter of the grad's shape, or not
        p = draw(entry_spec("np", clean))
        if p["kind"] in ("array", "masked") and spec.get("shape") is not None and draw(
                st.integers(0, 9)):
            _reshaped(draw, p, tuple(spec["shape"]))
        pspecs.append(p)
    case = build(gspecs + pspecs)
    n = len(gspecs)
    grads, params = case.entries[:n], case.entries[n:]
    clipping = draw(st.sampled_from([0.0, 1e-3, 0.01, 0.5, 1.0, 10.0, INF]))
    eps = draw(st.sampled_from([1e-3, 0.0, 1.0]))
    nt = draw(THREADS)
    present = [k for k, g in enumerate(grads) if g is not None]
    params_ok = all(params[k] is not None and readable_ok(params[k])
                    and params[k].shape == grads[k].shape for k in present)
    must = list_state(case, True, range(n)) if threads_ok(nt) and params_ok else False
    if must:
        for k in present:
            for j in range(n, 2 * n):
                if (case.entries[j] is not None and math.prod(grads[k].shape)
                        and math.prod(case.entries[j].shape) and overlapping(case, k, j)):
                    must = False
    if any(s["kind"] == "alias" for s in gspecs + pspecs) and must is False:
        must = None                      # an alias may or may not break a rule above
    g64 = [None if g is None else f64(g) for g in grads]
    p64 = [None if p is None else f64(p) for p in params]
    res, before = call_checked(case, lambda: clipcore.adaptive_grad_clip_(
        grads, params, clipping, eps, n_threads=nt), must, in_place=True,
        what="adaptive_grad_clip_")
    if res is None:
        return
    assert res[0] is grads
    for k in present:
        g, w = g64[k], p64[k]
        if g.size == 0:
            continue
        axes = _optax_unit_axes(g.shape)
        with np.errstate(all="ignore"):
            gn = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
            max_norm = clipping * np.maximum(np.sqrt(np.sum(w * w, axis=axes, keepdims=True)),
                                             eps)
            factor = np.where(gn < max_norm, 1.0, max_norm / np.maximum(gn, 1e-6))
            # the grads are multiplied in their own dtype, by the factor in it
            want = g * factor.astype(dtype_of(grads[k])).astype(np.float64)
        _sums_close(f64(grads[k]), want, np.abs(want), dtype_of(grads[k]), f"grads[{k}]")
