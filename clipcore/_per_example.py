"""Per-example clipping (DP-SGD) and adaptive gradient clipping (AGC) over lists of arrays.

Arguments are validated and converted here, every one before anything is
written; the kernels are the weighted sum over the batch axis
(clipcore._weighted), AGC's unit-wise passes over whole lists
(clipcore._unitwise) and, for the arrays those do not take, the per-axis
engine's reductions (clipcore._ops' _reduce and _l2). clipcore.torch's clip_and_accumulate_ and
adaptive_clip_grad_ run on the helpers here.
"""
import numpy as np

from clipcore import _elementwise as _ew
from clipcore import _unitwise as _uw
from clipcore import _weighted as _w
from clipcore._lists import (as_native, as_scalar, as_threads, as_tuple, buffer_view,
                             check_apart, needs_copy, writable_arrays)
from clipcore._ops import _elementwise, _l2, _reduce

__all__ = ["per_example_global_norm_clip", "adaptive_grad_clip_"]

_F16, _F32, _F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
# A float64 sum of squares outside [2^-960, inf) may have lost the norm (as in _ops).
_SUMSQ_SAFE_MIN = 2.0 ** -960


# ------------------------------------------------------------------ arguments

def _nonneg(value, name):
    v = as_scalar(value, name)
    if not v >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return v


def _check_dtype(arr, name):
    if arr.dtype.kind != "f" or arr.dtype.itemsize > 8:
        raise TypeError(f"{name}: expected a float16, float32 or float64 array, got an "
                        f"array of {arr.dtype}")


def _inputs(seq, name):
    """Read-only float arrays of a tuple of array-likes (None refused)."""
    arrays = []
    for k, obj in enumerate(seq):
        if obj is None:
            raise TypeError(f"{name}[{k}]: expected an array, got None")
        arr = obj if type(obj) is np.ndarray else buffer_view(obj, f"{name}[{k}]",
                                                                  writable=False)
        _check_dtype(arr, f"{name}[{k}]")
        arrays.append(arr)
    return arrays


def _work(arr):
    """arr as the kernels read it: float32/float64, aligned, native byte order
    (float16 becomes a float32 copy, the others a native copy)."""
    if arr.dtype == _F16:
        return arr.astype(_F32)
    return as_native(arr)


def _batch_size(arrays, name):
    """The common leading axis length of arrays (ValueError naming the first that differs)."""
    batch = None
    for k, arr in enumerate(arrays):
        if arr.ndim == 0:
            raise ValueError(f"{name}[{k}]: expected a batch axis first, got a 0-d array")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise ValueError(f"{name}[{k}]: batch size {arr.shape[0]}, but {name}[0] has "
                             f"{batch} (every array must share the leading batch axis)")
    return batch or 0


def _outputs(out, arrays, name="out", in_name="grads"):
    """The validated out= arrays for sums over arrays' batch axes."""
    seq = as_tuple(out, name)
    if len(seq) != len(arrays):
        raise ValueError(f"{name} has {len(seq)} arrays, {in_name} has {len(arrays)}")
    for k, obj in enumerate(seq):
        if obj is None:
            raise TypeError(f"{name}[{k}]: expected an array, got None")
    outs = list(writable_arrays(seq, name))
    for k, (o, x) in enumerate(zip(outs, arrays)):
        if o.shape != x.shape[1:]:
            raise ValueError(f"{name}[{k}]: expected shape {x.shape[1:]}, got {o.shape}")
        if o.dtype != x.dtype:
            raise TypeError(f"{name}[{k}]: expected dtype {x.dtype}, got {o.dtype}")
    check_apart(outs, arrays, name, in_name)
    return outs


# ------------------------------------------------------------ per-example clip

def _rows(x, batch):
    """x as a 2-d (batch, n) view, or a C-ordered copy when no view exists."""
    n = x.size // batch if batch else int(np.prod(x.shape[1:]))
    try:
        return np.reshape(x, (batch, n), copy=False)
    except ValueError:
        return np.ascontiguousarray(x).reshape(batch, n)


def per_example_norms(works, batch, nt):
    """Float64 2-norms of each example over all arrays ((batch, n) views), range-safe.

    One read pass (clipcore._weighted.row_sumsq: the weighted sum's tiles, in
    groups claimed on the scheduler, so a late thread holds up no one); per-array
    norms again, range-safe, only for examples whose float64 sum left the range."""
    total = _w.row_sumsq(works, batch, nt)
    norms = np.sqrt(total)
    suspect = (total == np.inf) | ((total < _SUMSQ_SAFE_MIN) & (total > 0))
    if suspect.any() and any(x.dtype == _F64 for x in works):
        # Squares left float64's range: combine per-array norms (each range-safe)
        # scaled by the largest.
        per = np.stack([_l2(x, (1,), nt).reshape(batch) if x.shape[1] else np.zeros(batch)
                        for x in works], axis=1)
        with np.errstate(all="ignore"):
            m = per.max(axis=1)
            ok = suspect & (m > 0) & (m < np.inf)
            safe = np.where(ok, m, 1.0)
            redo = safe * np.sqrt(np.sum(np.square(per / safe[:, None]), axis=1))
        norms = np.where(ok, redo, norms)
    return norms


# Bytes of per-example gradients per block of the one-read path: a block of
# examples read for its norms stays in L3 for its weighted sums. Where four
# examples exceed it, the two-pass path.
_BLOCK_BYTES = 4 << 20
RULES = {"optax": _w.RULE_OPTAX, "opacus": _w.RULE_OPACUS}


def _block_rows(xs, batch):
    """Rows per block of the one-read path (a multiple of four), or 0: two passes."""
    row = sum(x.shape[1] * x.itemsize for x in xs)
    rows = _BLOCK_BYTES // max(row, 1) // 4 * 4
    return min(rows, -(-batch // 4) * 4)


def clip_sums(works, outs, add, rule, bound, has_f64, batch, nt):
    """outs[k] (+= where add[k], else =) sum_i w_i * works[k][i], w_i the clip
    rule's ("optax", "opacus": clipcore._weighted's) weight of example i's
    norm, bound its bound; has_f64: float64 arrays in the list. works as
    _rows gives them, outs as validated by _outputs. Returns the norms."""
    xs, os_, adds, back = [], [], [], []
    for x, o, a in zip(works, outs, add):
        if x.shape[1] == 0:
            continue
        try:
            o1 = np.reshape(o, (-1,), copy=False) if o.dtype == x.dtype else None
        except ValueError:
            o1 = None
        if o1 is None or needs_copy(o1):
            o1 = o.astype(x.dtype).reshape(-1) if a else np.empty(x.shape[1], x.dtype)
            back.append((o, o1))
        xs.append(x)
        os_.append(o1)
        adds.append(bool(a))
    if batch == 0:
        for o, a in zip(outs, add):
            if not a:
                o[...] = 0
        return np.zeros(0)
    norms = np.zeros(batch)             # the norms when every array is empty
    block = _block_rows(xs, batch)
    if not (block and _w.clip_sum(xs, os_, adds, RULES[rule], bound, has_f64, norms, block,
                                  nt)):
        norms = per_example_norms(xs, batch, nt)
        w32, w64 = _w.weights(norms, RULES[rule], bound, has_f64)
        _w.weighted_sum(xs, os_, adds, w32, w64, nt)
    for o, o1 in back:
        np.copyto(o, o1.reshape(o.shape), casting="unsafe")
    return norms


def per_example_global_norm_clip(grads, l2_norm_clip, *, out=None, n_threads=None):
    """Clip each example's gradient to a global L2 norm, then sum over the batch.

    optax's ``per_example_global_norm_clip`` (DP-SGD's clipping, Abadi et
    al. 2016): example i's norm is taken over all arrays,
    ``norm_i = sqrt(sum_k sum(grads[k][i] ** 2))``, its multiplier is
    ``min(l2_norm_clip / norm_i, 1)`` (1 for a zero norm), and
    ``summed[k] = sum_i multiplier_i * grads[k][i]``. Norms, multipliers and
    sums are computed in float64 (norms range-safe, as the core's are) and
    the sums rounded once to the arrays' dtype; the results are the same
    bits for any ``n_threads``.

    NaN and inf: an example whose norm is NaN or inf (a NaN or inf element)
    gets the multiplier NaN, so every element of every sum becomes NaN: one
    bad example poisons the step, loudly. (optax 0.2.8 turns a NaN multiplier
    into 1 and an inf norm's into 0, so its sums are NaN only where the bad
    example's elements are.) An inf norm counts as clipped (when
    ``l2_norm_clip`` is finite), a NaN norm does not, as in optax.

    Parameters
    ----------
    grads : list or tuple of arrays
        Per-example gradients sharing the leading batch axis B: float16,
        float32 or float64 NumPy arrays, or anything clipcore reads (PyTorch
        CPU tensors, buffer-protocol objects). float16 is read through a
        float32 copy (its sums are rounded to float16); views the kernel
        cannot read as (B, n) rows, byte-swapped or unaligned arrays through
        a copy too. Nothing is modified.
    l2_norm_clip : float
        The maximum per-example norm, >= 0 (inf: no clipping; 0: every
        example with a nonzero norm gets the multiplier 0).
    out : list or tuple of arrays, optional
        Where to write the sums: writable arrays of ``grads[k].shape[1:]``
        and ``grads[k].dtype``, sharing memory with no other ``out`` entry
        and no ``grads`` entry.
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    summed : list of arrays
        ``summed[k]`` has shape ``grads[k].shape[1:]`` and grads[k]'s dtype
        (NumPy arrays; the ``out`` objects when given). An empty batch gives zeros.
    num_clipped : int
        The number of examples whose norm exceeded ``l2_norm_clip``.

    Raises
    ------
    TypeError
        grads (or out) is not a list or tuple, an entry is not a float16/32/64
        array (integers, None), an ``out`` entry has the wrong dtype.
    ValueError
        An entry has no batch axis or another batch size, ``l2_norm_clip``
        is negative or NaN, an ``out`` entry has the wrong shape, is
        read-only, or shares memory with another entry or with grads.
        Everything is checked before anything is written.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> grads = [np.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]], np.float32)]
    >>> clipcore.per_example_global_norm_clip(grads, 1.25)
    ([array([1.75, 1.75, 1.75], dtype=float32)], 3)
    >>> clipcore.per_example_global_norm_clip(grads, np.inf)
    ([array([7., 7., 7.], dtype=float32)], 0)
    """
    nt = as_threads(n_threads)
    clip = _nonneg(l2_norm_clip, "l2_norm_clip")
    arrays = _inputs(as_tuple(grads, "grads"), "grads")
    batch = _batch_size(arrays, "grads")
    if out is None:
        outs = None
    else:
        outs = _outputs(out, arrays)
    works = [_rows(_work(x), batch) for x in arrays]
    if outs is None:
        outs = [np.empty(x.shape[1:], x.dtype) for x in arrays]
        result = outs
    else:
        result = list(as_tuple(out, "out"))
    norms = clip_sums(works, outs, [False] * len(works), "optax", clip,
                      any(x.dtype == _F64 for x in works), batch, nt)
    return result, int(np.count_nonzero(norms > clip))


# ------------------------------------------------------------------------- AGC

def _optax_axes(shape, name):
    """optax.unitwise_norm's reduction axes (JAX layout: units on the last axis)."""
    nd = len(shape)
    if sum(n != 1 for n in shape) <= 1:         # jnp.squeeze(x).ndim <= 1: the whole array
        return tuple(range(nd))
    if nd in (2, 3):
        return (0,)
    if nd == 4:
        return (0, 1, 2)
    if nd == 5:
        return (0, 1, 2, 3)
    raise ValueError(f"{name}: expected a parameter of 1 to 5 dimensions (optax's "
                     f"unitwise_norm), got shape {shape}")


def _torch_axes(shape, name):
    """timm's unitwise_norm (PyTorch layout: output units on the first axis)."""
    return tuple(range(len(shape))) if len(shape) <= 1 else tuple(range(1, len(shape)))


def _unit_norms(x, axes, norm_type, nt):
    """Float64 norm_type-norms of x (float32/float64, aligned native) over axes, keepdims."""
    if norm_type == 2.0:
        return _l2(x, axes, nt)
    if norm_type == 1.0:
        return _reduce(x, axes, _ew.REDUCE_SUMABS, nt)
    if norm_type == np.inf:
        return _reduce(x, axes, _ew.REDUCE_MAXABS, nt)
    with np.errstate(all="ignore"):
        return np.sum(np.abs(x.astype(np.float64)) ** norm_type, axis=axes,
                      keepdims=True) ** (1.0 / norm_type)


_UNIT_KINDS = {2.0: _uw.REDUCE_SUMSQ, 1.0: _uw.REDUCE_SUMABS, np.inf: _uw.REDUCE_MAXABS}


def _unit_view(g, p, axes, norm_type):
    """(g2, p2, by_cols): 2-d views of g and p for the fused AGC kernels (units
    on the rows or the columns), or None when they need the per-array path
    (float16, mixed dtypes, non-contiguous or misaligned arrays, other p-norms)."""
    if (norm_type not in _UNIT_KINDS or g.size == 0 or g.dtype != p.dtype
            or g.dtype not in (_F32, _F64) or needs_copy(g) or needs_copy(p)
            or not (g.flags.c_contiguous and p.flags.c_contiguous)):
        return None
    nd, m = g.ndim, len(axes)
    if m == nd:                                    # the whole array is one unit
        shape, by_cols = (1, g.size), False
    elif axes == tuple(range(nd - m, nd)):         # units first, reduced over the rest
        shape, by_cols = (g.size // int(np.prod(g.shape[nd - m:])), -1), False
    elif axes == tuple(range(m)):                  # units last, reduced over the rest
        shape, by_cols = (int(np.prod(g.shape[:m])), -1), True
    else:
        return None
    return g.reshape(shape), p.reshape(shape), by_cols


def _fused_adaptive_clip(grads, params, axes, views, clipping, eps, norm_type, nt):
    """AGC over the arrays _unit_view accepted (views: its answers): float32
    arrays with units on rows in one pass (each unit scaled right after its
    norms); the others in one pass for the grads' and the params' unit norms
    and one for the scaling, the factors computed for all their units at once."""
    rows = [not v[2] and g.dtype == _F32 for g, v in zip(grads, views)]
    if any(rows):
        _uw.unit_clip([v[0] for v, r in zip(views, rows) if r],
                      [v[1] for v, r in zip(views, rows) if r],
                      _UNIT_KINDS[norm_type], clipping, eps, nt)
    rest = [k for k, r in enumerate(rows) if not r]
    grads, params = [grads[k] for k in rest], [params[k] for k in rest]
    axes, views = [axes[k] for k in rest], [views[k] for k in rest]
    if not grads:
        return
    g2, p2, by_cols = [v[0] for v in views], [v[1] for v in views], tuple(v[2] for v in views)
    gn, pn = _uw.unit_reduce(g2, p2, by_cols, _UNIT_KINDS[norm_type], nt)
    counts = np.array([v.shape[1] if c else v.shape[0] for v, c in zip(g2, by_cols)])
    ends = np.cumsum(counts)
    starts = ends - counts
    if norm_type == 2.0:
        gn, pn = np.sqrt(gn, out=gn), np.sqrt(pn, out=pn)
        for k, g in enumerate(grads):
            s, e = starts[k], ends[k]
            if g.dtype == _F64 and not (_range_safe(gn[s:e]) and _range_safe(pn[s:e])):
                gn[s:e] = _unit_norms(g, axes[k], 2.0, nt).ravel()
                pn[s:e] = _unit_norms(params[k], axes[k], 2.0, nt).ravel()
    dtypes = [g.dtype for g in grads]
    factor = {t: _agc_factor(gn, pn, t.type, clipping, eps) for t in set(dtypes)}
    unit_dtype = np.repeat(np.array([t == _F64 for t in dtypes]), counts)
    if all(((factor[t] == 1) | (unit_dtype != (t == _F64))).all() for t in factor):
        return
    _uw.unit_scale(g2, [factor[t][s:e] for t, s, e in zip(dtypes, starts, ends)], by_cols, nt)


def _range_safe(l2):
    """False when a float64 sum of squares may have left float64's range (as _ops._l2)."""
    with np.errstate(all="ignore"):
        return not ((l2 == np.inf) | (l2 < np.sqrt(_SUMSQ_SAFE_MIN))).any()


def _agc_factor(gn, pn, t, clipping, eps):
    """Per unit of float64 norms gn, pn (any shape): 1 below the bound, else
    bound / grad norm; in the arrays' dtype t (clipcore._unitwise.agc_factor)."""
    f = _uw.agc_factors(np.ravel(gn), np.ravel(pn), t == np.float64, clipping, eps)
    return f.reshape(np.shape(gn))


def adaptive_clip(grads, params, clipping, eps, layout, norm_type, nt):
    """AGC in place over lists (see adaptive_grad_clip_); layout 'optax' or 'torch'."""
    clipping = as_scalar(clipping, "clipping")
    eps = as_scalar(eps, "eps")
    gseq = as_tuple(grads, "grads")
    pseq = as_tuple(params, "params")
    if len(gseq) != len(pseq):
        raise ValueError(f"grads has {len(gseq)} arrays, params has {len(pseq)}")
    garr = list(writable_arrays(gseq, "grads"))
    parr = [None if g is None else p for g, p in zip(garr, pseq)]
    for k, p in enumerate(parr):
        if garr[k] is not None and p is None:
            raise TypeError(f"params[{k}]: expected an array, got None")
    todo = [k for k, g in enumerate(garr) if g is not None]
    read = _inputs([parr[k] for k in todo], "params")
    for k, p in zip(todo, read):
        parr[k] = p
    units = _optax_axes if layout == "optax" else _torch_axes
    axes = {}
    for k in todo:
        g, p = garr[k], parr[k]
        _check_dtype(g, f"grads[{k}]")
        if g.shape != p.shape:
            raise ValueError(f"grads[{k}] has shape {g.shape}, params[{k}] has {p.shape}")
        axes[k] = units(g.shape, f"params[{k}]")
    check_apart([garr[k] for k in todo], [parr[k] for k in todo], "grads", "params")
    views = {k: _unit_view(garr[k], parr[k], axes[k], norm_type) for k in todo}
    fused = [k for k in todo if views[k] is not None]
    _fused_adaptive_clip([garr[k] for k in fused], [parr[k] for k in fused],
                         [axes[k] for k in fused], [views[k] for k in fused],
                         clipping, eps, norm_type, nt)
    for k in sorted(set(todo) - set(fused)):
        g, p = garr[k], parr[k]
        if g.size == 0:
            continue
        gw, pw = _work(g), _work(p)
        t = gw.dtype.type             # the factors in the arrays' dtype, as the frameworks
        with np.errstate(all="ignore"):
            f = _agc_factor(_unit_norms(gw, axes[k], norm_type, nt),
                            _unit_norms(pw, axes[k], norm_type, nt), t, clipping, eps)
        if not (f == 1).all():
            _elementwise(_ew.OP_MUL, [g, f.astype(g.dtype) if g.dtype != gw.dtype else f],
                         g, nt)
    return grads


def adaptive_clip_memory(grads, params, rows, lengths, clipping, eps, norm_type, nt):
    """AGC in place over contiguous float32 buffers by address, units on rows
    (clipcore._unitwise.unit_clip_memory: an adapter's buffers, checked by it
    and kept alive), as adaptive_clip runs such arrays; False, nothing
    written, where adaptive_clip must take the call (another p-norm, or a
    grad that shares memory, which it names)."""
    clipping = as_scalar(clipping, "clipping")
    eps = as_scalar(eps, "eps")
    if norm_type not in _UNIT_KINDS:
        return False
    return _uw.unit_clip_memory(grads, params, rows, lengths, _UNIT_KINDS[norm_type], clipping,
                                eps, nt)


def adaptive_grad_clip_(grads, params, clipping, eps=1e-3, *, n_threads=None):
    """Adaptive gradient clipping in place, unit-wise, as optax's ``adaptive_grad_clip``.

    For each unit (Brock et al. 2021, NFNets), with norms taken per unit of
    ``params[k]`` and ``grads[k]`` alike: ``max_norm = clipping *
    max(param_norm, eps)``; a unit whose grad norm is not below ``max_norm``
    is multiplied by ``max_norm / max(grad_norm, 1e-6)``, the others are left
    as they are. Units follow optax's ``unitwise_norm`` (JAX layout, output
    units on the last axis): an array with at most one axis longer than 1 is
    one unit; 2-d and 3-d arrays are reduced over axis 0, 4-d (HWIO
    convolution kernels) over axes 0-2, 5-d over axes 0-3. Norms are
    accumulated in float64, then rounded to the arrays' dtype, in which the
    factors are computed as optax computes them. A NaN in a unit makes that
    unit NaN; an inf grad norm makes the unit's finite elements 0.

    Parameters
    ----------
    grads : list or tuple of arrays
        Writable float16/32/64 arrays (or PyTorch CPU tensors...), modified
        in place; None entries are skipped. No two may share memory.
    params : list or tuple of arrays
        The parameters, one per grads entry with its shape; read only, and
        sharing no memory with grads.
    clipping : float
        The maximum ratio of a unit's grad norm to its parameter norm.
    eps : float, default 1e-3
        Floor of the parameter norms (zero-initialised parameters).
    n_threads : int or None
        Threads to use; None uses what OpenMP may use.

    Returns
    -------
    list or tuple
        ``grads`` itself.

    Raises
    ------
    TypeError
        Not lists, non-float arrays, a None param for a gradient.
    ValueError
        Lists of different lengths, a grads entry of another shape than its
        param, more than 5 dimensions, read-only or overlapping grads.
        Everything is checked before anything is written.

    Examples
    --------
    >>> import numpy as np, clipcore
    >>> w = np.array([[3.0, 0.0], [4.0, 1.0]], np.float32)      # 2 units: columns
    >>> g = np.array([[0.3, 0.0], [0.4, 0.001]], np.float32)
    >>> _ = clipcore.adaptive_grad_clip_([g], [w], 0.02)
    >>> g
    array([[0.06 , 0.   ],
           [0.08 , 0.001]], dtype=float32)
    """
    return adaptive_clip(grads, params, clipping, eps, "optax", 2.0,
                         as_threads(n_threads))
