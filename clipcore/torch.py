"""PyTorch's gradient-clipping functions, computed by clipcore's kernels on CPU.

Drop-in replacements for ``torch.nn.utils.clip_grad_norm_``,
``clip_grad_value_``, ``get_total_norm`` and ``clip_grads_with_norm_``, with
their signatures and PyTorch 2.x semantics. When every gradient is a CPU
float32, float64, float16 or bfloat16 tensor (mixed dtypes too), clipcore
reads and scales it in place (no copies, 16-bit values read at their own
width) in one fused multi-threaded pass; anything else (CUDA or other devices, other
dtypes, sparse tensors, gradients that require grad, tensor subclasses,
norm types torch allows but clipcore does not: 0, negative) goes to torch's
own function. So the result is never different from torch's in kind, only
sometimes not faster.

16-bit gradients: torch takes each tensor's norm in its dtype (float32
arithmetic, rounded to float16/bfloat16), then the norm of those rounded
norms, rounded again; clipcore accumulates every element's square in float64
and rounds the total once to the dtype. So the returned norm is the exact
norm rounded to the dtype, and may differ from torch's by a unit in its last
place (bfloat16 has 8 significant bits); then the clip coefficient, computed
from it exactly as torch computes it in that dtype, may differ likewise, and
each gradient element (widened to float32, times the coefficient, rounded
once to its dtype, as torch's ``mul_`` does) agrees with torch's to the
dtype's rounding; for the same total norm it is bitwise torch's. A float16
norm above 65504 is inf, as torch's.

The one intended difference: norms are accumulated in float64 and range-safe,
so float32 gradients whose squares overflow float32 (values beyond ~1.8e19 with
the 2-norm), and float64 gradients whose squares or powers overflow float64
(1e154 with the 2-norm, 2e200 with p=3.5), give the right finite norm where
torch gives inf (and then clip them, and raise nothing with
``error_if_nonfinite=True``); so does a float16 gradient whose own norm exceeds
65504 in a list of wider dtypes (torch rounds each norm to its tensor's dtype
first). The returned norm
has torch's dtype (float32 for float32 gradients) and the clipping
coefficient is computed from it exactly as torch does,
``min(max_norm / (total_norm + 1e-6), 1)``.

Each call checks every tensor (type, device, dtype, layout, contiguity) and
reads its address and size, in compiled code: the same cost for fresh
gradient tensors every step (``zero_grad(set_to_none=True)``, the
default) as for kept ones. Nothing is cached and no tensor is kept alive.

``foreach`` is accepted for compatibility; the fast path ignores it and
torch's path receives it. Threads: ``torch.get_num_threads()`` for work
large enough to share (the kernels' ``PARALLEL_MIN``), as torch's own ops.
Gradients come from torch's multi-threaded backward pass, so they sit in
every core's cache and torch's OpenMP threads (the same runtime as
clipcore's) are still awake: a second thread pays even on lists as small as
the lesson's MLP, where plain clipcore calls stay on one thread.
Differences that do not change values: the fast path does not bump
autograd's version counter of the gradients, and it scales inference-mode
tensors that torch would refuse to modify outside inference mode.

Trainers: ``clipcore.torch.patch()`` (a call, or ``with clipcore.torch.patch():``)
puts these functions in ``torch.nn.utils`` (and ``torch.nn.utils.clip_grad``),
so code that calls ``torch.nn.utils.clip_grad_norm_`` at run time, as PyTorch
Lightning's ``Trainer(gradient_clip_val=...)`` and Accelerate's
``Accelerator.clip_grad_norm_`` do, runs clipcore; ``unpatch()`` undoes it.

torch.compile: while Dynamo traces them, the four functions call the custom
ops ``torch.ops.clipcore.*`` (a Tensor[] of gradients in, the eager function
run at execution), so compiled code calling them has no graph break, with
``fullgraph=True`` too.

Importing this module imports torch; ``import clipcore`` alone does not.
"""
import functools
import math
import operator
import threading
import types
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.utils
import torch.nn.utils.clip_grad

import clipcore
from clipcore import _lists, _per_example, _torch as _compiled
from clipcore import kernels as _kernels

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm",
           "patch", "unpatch", "clip_and_accumulate_", "adaptive_clip_grad_"]

_NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
# torch's own functions, captured at import: the fallbacks call these, never the
# module attributes patch() replaces (that would call clipcore again, forever).
_torch = types.SimpleNamespace(**{name: getattr(torch.nn.utils, name) for name in _NAMES})
if any(getattr(f, "__module__", None) == __name__ for f in vars(_torch).values()):
    raise ImportError("clipcore.torch imported again while torch.nn.utils is patched: "
                      "call clipcore.torch.unpatch() before reloading it")

_Tensor = torch.Tensor
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)    # subclasses go to torch
_f32 = torch.float32
_f64 = torch.float64
_bf16 = torch.bfloat16
# The dtypes clipcore reads by segment kind (clipcore._lists.KIND_*), and back.
_DTYPE_OF_KIND = {_lists.KIND_F32: _f32, _lists.KIND_F64: _f64, _lists.KIND_F16: torch.float16,
                  _lists.KIND_BF16: _bf16}
_KIND_OF_DTYPE = {dtype: kind for kind, dtype in _DTYPE_OF_KIND.items()}
_BF16_AS_BITS = (_bf16, torch.int16)   # strided bfloat16 memory, viewed for NumPy
_strided = torch.strided
_grad_of = operator.attrgetter("grad")


def _memory(tensors, use):
    """(addresses, lengths, kinds, the total norm's kind) of plain contiguous CPU
    float32/float64/float16/bfloat16 tensors, "strided" when some are strided,
    or None for torch's own path (see clipcore._torch.tensor_memory). use:
    clipcore._lists.FOR_NORM (False), FOR_SCALE (True) or FOR_WRITE."""
    return _compiled.tensor_memory(tensors, use, _PLAIN_TYPES, _DTYPE_OF_KIND, _strided)


def _strided_views(tensors, writable):
    """NumPy views over the tensors' memory, or None when torch's path is needed
    (clipcore._lists.tensor_array's fallback mode)."""
    use = _lists.FOR_SCALE if writable else _lists.FOR_NORM
    views = []
    for t in tensors:
        view = _lists.tensor_array(t, None, use, _BF16_AS_BITS)
        if view is None:
            return None
        views.append(view)
    return views


class _ViewsNorm:
    """Plan.global_norm over views that may share memory (reading only)."""

    def __init__(self, views, n_threads):
        self.views, self.n_threads = views, n_threads

    def global_norm(self, norm_type):
        return clipcore.global_norm(self.views, norm_type=norm_type, n_threads=self.n_threads)


def _plan(tensors, writable):
    """(a Plan over the tensors' memory, the total norm's kind), or None for torch's path.

    Nothing is cached: the tensors are checked at every call, so fresh gradient
    tensors (``zero_grad(set_to_none=True)``) cost the same as kept ones. The
    Plan holds no reference to the tensors; the caller's list keeps them
    alive during the call.
    """
    memory = _memory(tensors, writable)
    if memory is None:
        return None
    try:
        if memory == "strided":
            views = _strided_views(tensors, writable)
            if views is None:
                return None
            n_threads = torch.get_num_threads()
            plan = (clipcore.Plan(views, n_threads=n_threads) if writable
                    else _ViewsNorm(views, n_threads))
            return plan, _lists.norm_kind(views)
        addresses, lengths, kinds, norm_kind = memory
        plan = _lists.plan_over_memory(addresses, lengths, kinds, writable=writable,
                                       n_threads=_threads())
        return plan, norm_kind
    except ValueError:     # memory shared, or a view overlapping itself: torch scales
        return None        # it once per tensor (per element view)


_is_compiling = torch.compiler.is_compiling


def _threads(n_threads=None):
    """n_threads for the kernels; None: torch's count, which late teams back off
    as they do the default (clipcore._lists.as_threads)."""
    return _lists.as_threads(n_threads, -torch.get_num_threads())


def _compiled_grads(parameters):
    """The gradients for a clipcore op, in code Dynamo traces: kept to what it
    handles (no map/attrgetter, no generator checks)."""
    return [p.grad for p in _as_list(parameters) if p.grad is not None]


def _fast_norm_type(tensors, norm_type):
    """True when clipcore computes this norm: p > 0, and for the max norm no empty
    tensor (torch raises there: a maximum over nothing has no identity)."""
    if norm_type == math.inf:
        return not any(isinstance(t, _Tensor) and t.numel() == 0 for t in tensors)
    return norm_type > 0


def _as_list(tensors):
    return [tensors] if isinstance(tensors, _Tensor) else list(tensors)


def _total_norm_tensor(value, kind):
    """The 0-d tensor torch returns, of its dtype (float64 if any input is float64,
    the inputs' 16-bit type if they all have it, else float32): value rounded to it
    (beyond its range: inf, as torch would give)."""
    return torch.full((), _compiled.torch_total_norm(value, kind), dtype=_DTYPE_OF_KIND[kind])


def _check_finite(total_norm, norm_type, error_if_nonfinite):
    if error_if_nonfinite and not math.isfinite(total_norm.item()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            f"non-finite, so it cannot be clipped. To disable this error and scale the "
            f"gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")


def _coefficient(max_norm, total_norm):
    """torch's ``clamp(max_norm / (total_norm + 1e-6), max=1.0)`` as a Python float.

    For float32, float64, float16 and bfloat16 totals clipcore computes it as
    torch does (see clipcore._torch.torch_coef), cheaper than three tensor
    operations; other dtypes use torch's.
    """
    kind = _KIND_OF_DTYPE.get(total_norm.dtype)
    if kind is not None:
        return _compiled.torch_clip_coef(total_norm.item(), kind, max_norm)
    return torch.clamp(max_norm / (total_norm.detach() + 1e-6), max=1.0).item()


def _torch_multiplies(grads, c):
    """Multiply the gradients by c where the kernel leaves that to torch: a negative
    or float32-subnormal coefficient (clipcore._torch.torch_factor)."""
    if c < 1.0 and _compiled.torch_kernel_factor(c) == 1.0:
        for g in grads:
            g.mul_(c)


def _scale(plan, grads, max_norm, total_norm):
    """Multiply the plan's buffers by torch's clip coefficient, computed as torch does."""
    c = _coefficient(max_norm, total_norm)
    factor = _compiled.torch_kernel_factor(c)
    if factor != 1.0:
        _lists.scale_(plan, factor)
    _torch_multiplies(grads, c)


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """The norm of a tensor or iterable of tensors, viewed as one vector.

    Same arguments, result and errors as ``torch.nn.utils.get_total_norm``.

    Parameters
    ----------
    tensors : Tensor or iterable of Tensor
        The tensors themselves (not their ``.grad``).
    norm_type : float, default 2.0
        p of the p-norm; ``inf`` for the max norm.
    error_if_nonfinite : bool, default False
        Raise RuntimeError when the norm is NaN or inf.
    foreach : bool or None
        Passed to torch when torch's path is taken.

    Returns
    -------
    Tensor
        A 0-d tensor of torch's dtype: float64 if any input is float64, the
        inputs' float16 or bfloat16 if all have that one, else float32; for
        no tensors, ``torch.tensor(0.0)``.

    Examples
    --------
    >>> import torch, clipcore.torch
    >>> clipcore.torch.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
    tensor(5.)
    """
    if _is_compiling():     # torch.compile: one opaque op (see _ops_)
        return torch.ops.clipcore.get_total_norm(_as_list(tensors), float(norm_type),
                                                 bool(error_if_nonfinite), foreach)
    tensors = _as_list(tensors)
    norm_type = float(norm_type)
    fast = _plan(tensors, False) if _fast_norm_type(tensors, norm_type) else None
    if fast is None:
        return _torch.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    if not tensors:
        return torch.tensor(0.0)
    plan, kind = fast
    total = _total_norm_tensor(plan.global_norm(norm_type=norm_type), kind)
    _check_finite(total, norm_type, error_if_nonfinite)
    return total


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None):
    """Scale gradients in place by ``min(max_norm / (total_norm + 1e-6), 1)``.

    Same arguments and semantics as ``torch.nn.utils.clip_grads_with_norm_``.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        Parameters whose ``.grad`` is scaled; those without one are skipped.
    max_norm : float
        Max norm of the gradients.
    total_norm : Tensor
        The total norm to use, e.g. from :func:`get_total_norm`.
    foreach : bool or None
        Passed to torch when torch's path is taken.

    Examples
    --------
    >>> import torch, clipcore.torch
    >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
    >>> clipcore.torch.clip_grads_with_norm_([p], 1.0, torch.tensor(5.0))
    >>> p.grad
    tensor([0.6000, 0.8000])
    """
    if _is_compiling():
        return torch.ops.clipcore.clip_grads_with_norm_(_compiled_grads(parameters),
                                                        float(max_norm), total_norm, foreach)
    parameters = _as_list(parameters)
    grads = [g for g in map(_grad_of, parameters) if g is not None]
    max_norm = float(max_norm)
    if (not isinstance(total_norm, _Tensor) or total_norm.ndim != 0 or not total_norm.is_cpu
            or not total_norm.is_floating_point()):
        fast = None
    else:
        fast = _plan(grads, True)
    if fast is None:    # also: gradients sharing memory, which torch scales once per entry
        return _torch.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    if grads:
        _scale(fast[0], grads, max_norm, total_norm)
    return None


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None):
    """Clip the gradient norm of parameters in place; return the norm before clipping.

    Same arguments, result, warnings and errors as
    ``torch.nn.utils.clip_grad_norm_``: the norm is taken over all gradients as
    one vector and every gradient is multiplied by
    ``min(max_norm / (total_norm + 1e-6), 1)``.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        Parameters (a generator is fine); those whose ``.grad`` is None are skipped.
    max_norm : float
        Max norm of the gradients.
    norm_type : float, default 2.0
        p of the p-norm; ``inf`` for the max norm.
    error_if_nonfinite : bool, default False
        Raise RuntimeError (and modify nothing) when the norm is NaN or inf.
        Otherwise, as in torch, a NaN norm makes every gradient NaN and an
        inf norm multiplies them by 0. The norm is range-safe: gradients of
        1e154 (float64, p=2) have a finite norm here, where torch's overflows
        to inf, so they are clipped and nothing is raised.
    foreach : bool or None
        Passed to torch when torch's path is taken.

    Returns
    -------
    Tensor
        The total norm before clipping, a 0-d tensor of torch's dtype
        (float64 if any gradient is float64, the gradients' float16 or
        bfloat16 if all have that one, else float32).

    Raises
    ------
    RuntimeError
        With ``error_if_nonfinite=True`` when the norm is not finite.

    Examples
    --------
    >>> import torch, clipcore.torch
    >>> model = torch.nn.Linear(2, 1)
    >>> model.weight.grad = torch.tensor([[3.0, 4.0]]); model.bias.grad = torch.tensor([0.0])
    >>> clipcore.torch.clip_grad_norm_(model.parameters(), 1.0)
    tensor(5.)
    >>> model.weight.grad
    tensor([[0.6000, 0.8000]])
    """
    if _is_compiling():
        return torch.ops.clipcore.clip_grad_norm_(_compiled_grads(parameters), float(max_norm),
                                                  float(norm_type), bool(error_if_nonfinite),
                                                  foreach)
    if isinstance(parameters, _Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=2)
    grads = [g for g in map(_grad_of, parameters) if g is not None]
    norm_type = float(norm_type)
    fast = _plan(grads, True) if _fast_norm_type(grads, norm_type) else None
    if fast is None:    # also: gradients sharing memory, which torch scales once per entry
        return _torch.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite,
                                      foreach)
    if not grads:
        return torch.tensor(0.0)
    plan, kind = fast
    max_norm = float(max_norm)
    # The norm and the scaling in one kernel call (nothing is written when
    # error_if_nonfinite is to raise).
    norm = _compiled.clip_like_torch_(plan, max_norm, norm_type, kind, bool(error_if_nonfinite))
    total = _total_norm_tensor(norm, kind)
    _check_finite(total, norm_type, error_if_nonfinite)
    _torch_multiplies(grads, _compiled.torch_clip_coef(norm, kind, max_norm))
    return total


def clip_grad_value_(parameters, clip_value, foreach=None):
    """Clamp every gradient in place into ``[-clip_value, clip_value]``.

    Same arguments and semantics as ``torch.nn.utils.clip_grad_value_``
    (``clamp(min=-clip_value)`` then ``clamp(max=clip_value)``: a NaN stays
    NaN, a NaN ``clip_value`` makes every gradient NaN, a negative one sets
    every element to ``clip_value``). Contiguous float32 gradients are clamped
    in one pass by clipcore's kernel; others go to torch.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        Parameters whose ``.grad`` is clamped; those without one are skipped.
    clip_value : float
        The bound.
    foreach : bool or None
        Passed to torch when torch's path is taken.

    Examples
    --------
    >>> import torch, clipcore.torch
    >>> p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([-3.0, 0.5, 2.0])
    >>> clipcore.torch.clip_grad_value_([p], 1.0)
    >>> p.grad
    tensor([-1.0000,  0.5000,  1.0000])
    """
    if _is_compiling():
        return torch.ops.clipcore.clip_grad_value_(_compiled_grads(parameters),
                                                   float(clip_value), foreach)
    parameters = _as_list(parameters)
    clip_value = float(clip_value)
    grads = [g for g in map(_grad_of, parameters) if g is not None]
    # The clamp, unlike a scaling, is not symmetric in sign: any write, for
    # which a tensor with the negative bit (memory holding -value) goes to torch.
    memory = _memory(grads, _lists.FOR_WRITE)
    if not isinstance(memory, tuple) or any(k != _lists.KIND_F32 for k in memory[2]):
        return _torch.clip_grad_value_(parameters, clip_value, foreach)
    _kernels._clip_value_f32_(memory[0], memory[1], -clip_value, clip_value, _threads())
    return None


# --- per-example clipping (Opacus) and adaptive gradient clipping (timm) -----------------

def _fast_tensor(t, use=_lists.FOR_NORM):
    """A plain float32/float64 strided tensor whose memory clipcore takes in place
    for use (clipcore._lists.FOR_*): on the CPU and, to be written, not tracked
    by autograd (clipcore._lists.tensor_refusal, 0: nothing refused)."""
    return (type(t) in _PLAIN_TYPES and t.layout is _strided
            and (t.dtype is _f32 or t.dtype is _f64) and not _lists.tensor_refusal(t, use))


def _grad_sample(p):
    """Opacus's DPOptimizer._get_flat_grad_sample: p.grad_sample as one tensor."""
    if not hasattr(p, "grad_sample"):
        raise ValueError("Per sample gradient not found. Are you using GradSampleModule?")
    gs = p.grad_sample
    if gs is None:
        raise ValueError("Per sample gradient is not initialized. Not updated in backward pass?")
    if isinstance(gs, list):
        return torch.cat(gs, dim=0)
    if not isinstance(gs, _Tensor):
        raise ValueError(f"Unexpected grad_sample type: {type(gs)}")
    return gs


def _clip_and_accumulate_torch(params, samples, max_grad_norm):
    """What Opacus does, in torch ops (devices and dtypes clipcore does not read)."""
    if len(samples[0]) == 0:
        factor = torch.zeros((0,), device=samples[0].device)
    else:
        norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples], dim=1)
        factor = (max_grad_norm / (norms.norm(2, dim=1) + 1e-6)).clamp(max=1.0)
    for p, g in zip(params, samples):
        g = g.to(p.dtype)
        grad = torch.einsum("i,i...", factor.to(g.device).to(p.dtype), g)
        if getattr(p, "summed_grad", None) is not None:
            p.summed_grad += grad
        else:
            p.summed_grad = grad


def clip_and_accumulate_(params, max_grad_norm, *, n_threads=None):
    """Clip per-sample gradients and add their sum to ``p.summed_grad``, as Opacus does.

    What ``opacus.optimizers.DPOptimizer.clip_and_accumulate`` does with the
    per-sample gradients ``p.grad_sample`` (shape ``(B, *p.shape)``, or a
    list of such tensors, concatenated) that Opacus's GradSampleModule
    leaves: each sample's norm over all parameters, the factor
    ``(max_grad_norm / (norm_i + 1e-6)).clamp(max=1)`` computed in the norms'
    dtype as torch computes it, and ``p.summed_grad += einsum("i,i...",
    factor, grad_sample)`` (``p.summed_grad`` is created when it is absent or
    None). Parameters that do not require grad are skipped, as Opacus's
    optimizer skips them. clipcore computes the norms and the weighted sum
    with float64 sums, rounded once, reading the per-sample gradients once
    where a block of examples stays in cache (twice otherwise, with the same
    bits): results agree with Opacus's to float32 rounding and are the same
    bits for any thread count. Opacus's ``_processed`` marks are neither checked nor set.
    Tensors that are not CPU float32/float64 go through torch ops instead.

    Parameters
    ----------
    params : iterable of Tensor
        Parameters carrying ``grad_sample``.
    max_grad_norm : float
        The per-sample norm bound.
    n_threads : int or None
        Threads to use; None: ``torch.get_num_threads()``.

    Raises
    ------
    ValueError
        A parameter without ``grad_sample`` (Opacus's messages), per-sample
        gradients of different batch sizes or of the wrong shape, a
        ``summed_grad`` of the wrong shape. Nothing is written then.

    Examples
    --------
    >>> import torch, clipcore.torch
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> p.grad_sample = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    >>> clipcore.torch.clip_and_accumulate_([p], 1.0)
    >>> p.summed_grad
    tensor([0.9000, 1.2000])
    """
    params = [p for p in _as_list(params) if p.requires_grad]
    if not params:
        return None
    samples = [_grad_sample(p) for p in params]
    for p, g in zip(params, samples):
        if tuple(g.shape[1:]) != tuple(p.shape):
            raise ValueError(f"grad_sample of shape {tuple(g.shape)} for a parameter of shape "
                             f"{tuple(p.shape)}: expected (batch, *p.shape)")
    summed = [getattr(p, "summed_grad", None) for p in params]
    if not (all(map(_fast_tensor, samples)) and all(map(_fast_tensor, params))
            and all(s is None or (_fast_tensor(s) and s.dtype == p.dtype)
                    for s, p in zip(summed, params))):
        return _clip_and_accumulate_torch(params, samples, float(max_grad_norm))
    nt = _threads(n_threads)
    arrays = _per_example._inputs([g.detach() for g in samples], "grad_sample")
    batch = _per_example._batch_size(arrays, "grad_sample")
    works = [_per_example._rows(a, batch) for a in arrays]
    # Where a sum exists it is added to; else a new tensor is written.
    outs = [torch.empty(p.shape, dtype=p.dtype) if s is None else s
            for p, s in zip(params, summed)]
    out_arrays = _per_example._outputs(outs, arrays, "summed_grad", "grad_sample")
    _per_example.clip_sums(works, out_arrays, [s is not None for s in summed], "opacus",
                           float(max_grad_norm), any(a.dtype == np.float64 for a in arrays),
                           batch, nt)
    for p, s, o in zip(params, summed, outs):
        if s is None:
            p.summed_grad = o
    return None


def _adaptive_clip_grad_torch(params, clip_factor, eps, norm_type):
    """timm's adaptive_clip_grad in torch ops, for tensors clipcore does not read."""
    for p in params:
        g = p.grad.detach()
        pd = p.detach()
        if pd.ndim <= 1:
            pn, gn = pd.norm(norm_type), g.norm(norm_type)
        else:
            dims = tuple(range(1, pd.ndim))
            pn = pd.norm(norm_type, dim=dims, keepdim=True)
            gn = g.norm(norm_type, dim=dims, keepdim=True)
        max_norm = pn.clamp_(min=eps).mul_(clip_factor)
        g.copy_(torch.where(gn < max_norm, g, g * (max_norm / gn.clamp(min=1e-6))))


def adaptive_clip_grad_(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0, *,
                        n_threads=None):
    """Adaptive gradient clipping in place, unit-wise, as timm's ``adaptive_clip_grad``.

    For each unit of each parameter with a ``.grad`` (PyTorch layout: output
    units on the first axis, norms over the others; a parameter of at most
    one dimension is one unit), ``max_norm = clip_factor * max(param_norm,
    eps)``, and a unit whose grad norm is not below ``max_norm`` is
    multiplied by ``max_norm / max(grad_norm, 1e-6)``. Norms are accumulated
    in float64 (1, 2 and inf on clipcore's kernels, other p in NumPy), rounded
    to the gradients' dtype, in which the factors are computed as timm does;
    gradients whose units all stay are not written. Tensors that are not CPU
    float32/float64 go through timm's formula in torch ops.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        Parameters; those whose ``.grad`` is None are skipped.
    clip_factor : float, default 0.01
        The maximum ratio of a unit's grad norm to its parameter norm.
    eps : float, default 1e-3
        Floor of the parameter norms.
    norm_type : float, default 2.0
        p of the unit norms (> 0, inf for the max).
    n_threads : int or None
        Threads to use; None: ``torch.get_num_threads()``.

    Raises
    ------
    ValueError
        Gradients that share memory with each other or with a parameter, a
        non-positive norm_type. Nothing is written then.

    Examples
    --------
    >>> import torch, clipcore.torch
    >>> lin = torch.nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = lin.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
    >>> lin.weight.grad = torch.tensor([[0.3, 0.4], [0.0, 0.001]])
    >>> clipcore.torch.adaptive_clip_grad_(lin.parameters(), 0.02)
    >>> lin.weight.grad
    tensor([[0.0600, 0.0800],
            [0.0000, 0.0010]])
    """
    params = [p for p in _as_list(parameters) if p.grad is not None]
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 (inf for the max norm), got {norm_type}")
    if not params:
        return None
    grads = [p.grad for p in params]
    if not (all(_fast_tensor(g, _lists.FOR_SCALE) for g in grads)
            and all(map(_fast_tensor, params))):
        return _adaptive_clip_grad_torch(params, clip_factor, eps, norm_type)
    nt = _threads(n_threads)
    if not _adaptive_clip_memory(grads, params, clip_factor, eps, norm_type, nt):
        _per_example.adaptive_clip(grads, [p.detach() for p in params], clip_factor, eps,
                                   "torch", norm_type, nt)
    return None


def _adaptive_clip_memory(grads, params, clip_factor, eps, norm_type, nt):
    """AGC straight from the tensors' memory when every grad and param is a
    contiguous float32 tensor of one shape (no NumPy view of each: that costs
    more than clipping a small one); False, nothing written, otherwise."""
    g, p = _memory(grads, _lists.FOR_SCALE), _memory(params, _lists.FOR_NORM)
    if (not (isinstance(g, tuple) and isinstance(p, tuple))
            or any(k != _lists.KIND_F32 for k in g[2] + p[2])
            or any(a.shape != b.shape for a, b in zip(grads, params))):
        return False
    rows = [a.shape[0] if a.dim() > 1 else 1 for a in grads]
    return _per_example.adaptive_clip_memory(g[0], p[0], rows, g[1], clip_factor, eps,
                                             norm_type, nt)


# --- torch.compile: the four functions as custom ops -------------------------------------
#
# Dynamo cannot trace the functions above (Cython calls, raw memory), so while
# it compiles they call these ops instead: opaque nodes in the graph, with the
# gradients as a Tensor[] argument. At run time each op runs the eager
# function above, on the tensors the graph hands it.

class _GradOf:
    """A stand-in parameter whose ``.grad`` is a given tensor (torch's
    functions, like clipcore's, only read ``.grad`` of the parameters)."""

    __slots__ = ("grad",)

    def __init__(self, grad):
        self.grad = grad


def _norm_like(tensors):
    """An empty 0-d tensor of the dtype and device of torch's norm of tensors."""
    if not tensors:
        return torch.empty((), dtype=torch.get_default_dtype())
    dtype = functools.reduce(torch.promote_types, [t.dtype.to_real() for t in tensors])
    return torch.empty((), dtype=dtype, device=tensors[0].device)


@torch.library.custom_op("clipcore::get_total_norm", mutates_args=())
def _get_total_norm_op(tensors: list[torch.Tensor], norm_type: float, error_if_nonfinite: bool,
                       foreach: Optional[bool]) -> torch.Tensor:
    return get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)


@_get_total_norm_op.register_fake
def _(tensors, norm_type, error_if_nonfinite, foreach):
    return _norm_like(tensors)


@torch.library.custom_op("clipcore::clip_grad_norm_", mutates_args=("grads",))
def _clip_grad_norm_op(grads: list[torch.Tensor], max_norm: float, norm_type: float,
                       error_if_nonfinite: bool, foreach: Optional[bool]) -> torch.Tensor:
    return clip_grad_norm_([_GradOf(g) for g in grads], max_norm, norm_type,
                           error_if_nonfinite, foreach)


@_clip_grad_norm_op.register_fake
def _(grads, max_norm, norm_type, error_if_nonfinite, foreach):
    return _norm_like(grads)


@torch.library.custom_op("clipcore::clip_grads_with_norm_", mutates_args=("grads",))
def _clip_grads_with_norm_op(grads: list[torch.Tensor], max_norm: float,
                             total_norm: torch.Tensor, foreach: Optional[bool]) -> None:
    clip_grads_with_norm_([_GradOf(g) for g in grads], max_norm, total_norm, foreach)


@_clip_grads_with_norm_op.register_fake
def _(grads, max_norm, total_norm, foreach):
    return None


@torch.library.custom_op("clipcore::clip_grad_value_", mutates_args=("grads",))
def _clip_grad_value_op(grads: list[torch.Tensor], clip_value: float,
                        foreach: Optional[bool]) -> None:
    clip_grad_value_([_GradOf(g) for g in grads], clip_value, foreach)


@_clip_grad_value_op.register_fake
def _(grads, clip_value, foreach):
    return None


# --- patch(): torch.nn.utils' names routed to clipcore -----------------------------------

# The attributes patch() replaces. torch.nn.utils.clip_grad's private
# _get_total_norm and _clip_grads_with_norm_ stay torch's: they are what
# torch's own clip_grad_norm_ (clipcore's fallback) calls, so patching them
# would send the fallback back into clipcore; no library calls them.
_TARGETS = tuple((module, name)
                 for module, names in ((torch.nn.utils, _NAMES),
                                       (torch.nn.utils.clip_grad,
                                        ("clip_grad_norm_", "clip_grad_value_")))
                 for name in names)
_lock = threading.Lock()
_replaced = {}      # (module, name) -> (torch's, clipcore's); empty when not patched


class _Patch:
    """What patch() returns: on leaving a ``with`` block, the state found on entry."""

    __slots__ = ("_was_patched",)

    def __init__(self, was_patched):
        self._was_patched = was_patched

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if not self._was_patched:
            unpatch()
        return False

    def __repr__(self):
        return f"<clipcore.torch.patch(), {'patched' if _replaced else 'unpatched'}>"


def patch():
    """Route torch.nn.utils' clipping functions to clipcore's, as a call or a ``with`` block.

    Replaces ``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm``
    and ``clip_grads_with_norm_`` in ``torch.nn.utils``, and
    ``clip_grad_norm_`` and ``clip_grad_value_`` in
    ``torch.nn.utils.clip_grad`` (so the deprecated ``clip_grad_norm``, which
    calls the latter, comes too), with this module's namesakes. Code that
    looks them up at call time, as PyTorch Lightning's precision plugins,
    Fabric's strategies and Accelerate's ``Accelerator.clip_grad_norm_`` and
    ``clip_grad_value_`` do, then runs clipcore; whatever clipcore does not
    accelerate still runs torch's own function, captured when this module
    was imported. A name bound before the call (``from torch.nn.utils import
    clip_grad_norm_``) keeps torch's function.

    Idempotent: patching when patched, or unpatching when not, does nothing.
    A ``with`` block restores on exit the state it found: inside an earlier
    ``patch()`` (or another ``with patch()``) it leaves torch patched.

    Returns
    -------
    context manager
        Patching happens at the call; the ``with`` block only decides when
        to undo it.

    See Also
    --------
    unpatch : Restore torch's functions.

    Examples
    --------
    >>> import torch, clipcore.torch
    >>> with clipcore.torch.patch():
    ...     torch.nn.utils.clip_grad_norm_ is clipcore.torch.clip_grad_norm_
    True
    >>> torch.nn.utils.clip_grad_norm_ is clipcore.torch.clip_grad_norm_
    False
    >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
    >>> with clipcore.torch.patch():
    ...     torch.nn.utils.clip_grad_norm_([p], 1.0)
    tensor(5.)
    >>> p.grad
    tensor([0.6000, 0.8000])
    """
    with _lock:
        was_patched = bool(_replaced)
        if not was_patched:
            ours = globals()
            for module, name in _TARGETS:
                _replaced[module, name] = (getattr(module, name), ours[name])
                setattr(module, name, ours[name])
    return _Patch(was_patched)


def unpatch():
    """Restore what :func:`patch` replaced in torch.nn.utils; nothing when not patched.

    An attribute that someone replaced after :func:`patch` is left as it is.

    Examples
    --------
    >>> import torch, clipcore.torch
    >>> _ = clipcore.torch.patch(); clipcore.torch.unpatch(); clipcore.torch.unpatch()
    >>> torch.nn.utils.clip_grad_value_ is clipcore.torch.clip_grad_value_
    False
    """
    with _lock:
        for (module, name), (previous, installed) in _replaced.items():
            if getattr(module, name) is installed:
                setattr(module, name, previous)
        _replaced.clear()
