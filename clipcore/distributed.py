"""Global-norm clipping over gradients sharded across processes.

Each rank holds a shard of the gradients (ZeRO/FSDP style). The global norm
is the norm over all shards: each rank computes its local part with the fused
kernels, the parts are combined by one all-reduce of one float64 (the sum of
the local ``sum |x|^p``, or the max for the inf-norm), and every rank applies
the same scale.

A rank with a NaN or inf, or whose arguments failed their checks, sends +inf
instead. Every rank then sees an infinite result and makes a second
all-reduce (MAX of two numbers: the largest local norm and a status code) that
tells every rank the same thing: raise, NaN, inf, or -- for p other than 1
and inf, whose plain sum of p-th powers may overflow or underflow where the
core's scaled sum does not -- a third all-reduce of the sum scaled by the
largest local norm. The common case costs one all-reduce of one number.

``group`` is an ``mpi4py`` intracommunicator or a ``torch.distributed``
process group (``None``: torch's default group, once initialized). This module
imports neither library: an object of theirs exists only once its module is
loaded, so it looks for their classes in ``sys.modules``.

Every rank must make the same calls, in the same order, with the same
``clip_norm`` and ``norm_type``, as for any collective operation.
"""
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

import clipcore
from clipcore._lists import as_tuple

__all__ = ["clip_by_global_norm_", "global_norm"]

# Status codes of the second all-reduce (MAX): the worst rank's wins.
_NAN = 1.0
_FAILED = 2.0
_TINY = sys.float_info.min


class _MPIGroup:
    def __init__(self, mpi, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.in_place = mpi.IN_PLACE
        self.ops = {"sum": mpi.SUM, "max": mpi.MAX}

    def allreduce(self, vec, op):
        self.comm.Allreduce(self.in_place, vec, op=self.ops[op])


class _TorchGroup:
    def __init__(self, dist, group):
        self.dist = dist
        self.group = group
        self.rank = group.rank()
        self.from_numpy = sys.modules["torch"].from_numpy
        self.ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def allreduce(self, vec, op):
        self.dist.all_reduce(self.from_numpy(vec), op=self.ops[op], group=self.group)


def _as_group(group):
    """Wrap an mpi4py communicator or a torch ProcessGroup.

    Neither library is imported: an object of theirs can only exist once its
    module is in sys.modules.
    """
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(group, mpi.Comm):
        if isinstance(group, mpi.Intracomm) and group != mpi.COMM_NULL:
            return _MPIGroup(mpi, group)
        what = "MPI.COMM_NULL" if group == mpi.COMM_NULL else f"an mpi4py {type(group).__name__}"
        raise TypeError(f"group must be an mpi4py intracommunicator (such as MPI.COMM_WORLD), "
                        f"got {what}")
    dist = sys.modules.get("torch.distributed")
    if group is None:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            raise ValueError("group is None, which means torch.distributed's default process "
                             "group, but it is not initialized: pass an mpi4py communicator or "
                             "a torch.distributed ProcessGroup")
        return _TorchGroup(dist, dist.group.WORLD)
    if dist is not None and dist.is_available() and isinstance(group, dist.ProcessGroup):
        return _TorchGroup(dist, group)
    raise TypeError(f"group must be an mpi4py communicator, a torch.distributed ProcessGroup "
                    f"or None, got {type(group).__module__}.{type(group).__qualname__}")


def _relabel(exc, offset):
    """The core names every entry t_list[i]; entries from `offset` on are replicated[i - offset]."""
    def name(match):
        i = int(match.group(1))
        return f"t_list[{i}]" if i < offset else f"replicated[{i - offset}]"
    return type(exc)(re.sub(r"\bt_list\[(\d+)\]", name, str(exc)))


def _pow(x, p):
    if p == 2.0:
        return x * x
    try:
        return x ** p
    except OverflowError:
        return math.inf


def _local_norm(t_list, replicated, p, rank, n_threads):
    """This rank's part; replicated buffers count on rank 0 only (elsewhere only if not finite)."""
    if replicated is None:
        return clipcore.global_norm(t_list, norm_type=p, n_threads=n_threads)
    clipcore.global_norm((), norm_type=p)      # the core's check of norm_type, first
    p, n = float(p), len(t_list)
    try:
        if rank == 0 or p == math.inf:     # the max counts a replicated element once anyway
            return clipcore.global_norm(t_list + replicated, norm_type=p, n_threads=n_threads)
        local = clipcore.global_norm(t_list, norm_type=p, n_threads=n_threads)
        n = 0
        rep = clipcore.global_norm(replicated, norm_type=math.inf, n_threads=n_threads)
    except (TypeError, ValueError) as exc:
        raise _relabel(exc, n) from None
    if not math.isfinite(rep) and not math.isnan(local):
        local = rep      # a non-finite replicated copy on any rank reaches every rank
    return local


def _reduce(group, local, p, caller):
    """The global norm from every rank's local norm; see the module docstring."""
    if p == math.inf:
        v = local if math.isfinite(local) else math.inf
    else:
        v = _pow(local, p)
        if math.isnan(v) or (p != 1.0 and 0.0 < local and v < _TINY):
            v = math.inf
    one = np.array([v])
    group.allreduce(one, "max" if p == math.inf else "sum")
    total = float(one[0])
    if total < math.inf:
        if p == 1.0 or p == math.inf:
            return total
        return math.sqrt(total) if p == 2.0 else total ** (1.0 / p)
    return _settle(group, local, p, False, caller)


def _settle(group, local, p, failed, caller):
    """Every rank saw +inf: agree on why, with a second all-reduce (MAX)."""
    if failed:
        vec = np.array([0.0, _FAILED])
    else:
        vec = np.array([math.inf, _NAN] if math.isnan(local) else [local, 0.0])
    group.allreduce(vec, "max")
    m, code = float(vec[0]), float(vec[1])
    if code >= _FAILED:
        if failed:
            return None
        raise RuntimeError(f"clipcore.distributed.{caller}: another rank of the group "
                           f"rejected its arguments (see the error there); nothing was "
                           f"modified on any rank")
    if code >= _NAN:
        return math.nan
    if m == math.inf or p == 1.0:
        return math.inf          # an inf, or the sum of |x| overflowed as in the core
    one = np.array([(local / m) ** p])
    group.allreduce(one, "sum")
    s = float(one[0])
    return m * (math.sqrt(s) if p == 2.0 else s ** (1.0 / p))


def _join_failed(group, norm_type):
    """This rank failed its checks: join the all-reduces the others make, then raise."""
    try:
        op = "max" if float(norm_type) == math.inf else "sum"
    except (TypeError, ValueError):
        op = "sum"          # SUM or MAX, +inf reaches every rank
    group.allreduce(np.array([math.inf]), op)
    _settle(group, math.nan, None, True, None)


def global_norm(t_list: Sequence[Any], group: Any, *, norm_type: float = 2.0,
                replicated: Sequence[Any] | None = None, n_threads: int | None = None) -> float:
    """The norm of all elements of every rank's buffers, as one vector.

    A collective call: every rank of ``group`` calls it with its own shard
    and the same ``norm_type``, and every rank gets the same result.

    Parameters
    ----------
    t_list : list or tuple of arrays
        This rank's buffers, as for :func:`clipcore.global_norm` (None
        entries are skipped; a rank may hold none).
    group : mpi4py.MPI.Intracomm, torch.distributed.ProcessGroup or None
        The ranks sharing the gradients. None means torch's default process
        group, which must be initialized. A torch group must accept CPU
        tensors (gloo, mpi).
    norm_type : float, default 2.0
        p of the p-norm: 2, 1, ``inf`` or any p > 0.
    replicated : list or tuple of arrays, optional
        Buffers every rank holds a full copy of (biases, norms, anything not
        sharded). They count once in the norm: rank 0's copy is counted; on
        the other ranks a non-finite copy still makes the norm non-finite.
    n_threads : int or None
        Threads for this rank's local part; None uses what OpenMP may use.

    Returns
    -------
    float
        The global norm, the same float on every rank: NaN if any rank holds
        a NaN, else inf if any holds an inf.

    Raises
    ------
    TypeError
        If ``group`` is not a communicator or process group (raised before
        any communication), or an entry is not a float buffer.
    ValueError
        If ``group`` is None and torch's default group is not initialized,
        or ``norm_type`` is invalid.
    RuntimeError
        On every other rank, when one rank's arguments failed these checks:
        the checks run before the all-reduce and their outcome travels with
        it, so no rank is left waiting.

    Examples
    --------
    >>> import numpy as np
    >>> from mpi4py import MPI
    >>> from clipcore import distributed
    >>> shard = [np.array([3.0, 4.0], np.float32)]
    >>> distributed.global_norm(shard, MPI.COMM_SELF)
    5.0
    """
    g = _as_group(group)
    try:
        if replicated is not None:
            t_list = list(as_tuple(t_list, "t_list"))
            replicated = list(as_tuple(replicated, "replicated"))
        local = _local_norm(t_list, replicated, norm_type, g.rank, n_threads)
    except Exception:
        _join_failed(g, norm_type)
        raise
    return _reduce(g, local, float(norm_type), "global_norm")


def clip_by_global_norm_(t_list: Sequence[Any], clip_norm: float, group: Any, *,
                         norm_type: float = 2.0, replicated: Sequence[Any] | None = None,
                         error_if_nonfinite: bool = False, n_threads: int | None = None) -> float:
    """Rescale every rank's buffers in place by ``clip_norm / max(norm, clip_norm)``.

    The norm is :func:`global_norm` over all ranks; then every rank applies
    the same scale to its buffers with :func:`clipcore.clip_by_global_norm_`,
    so each rank's buffers end as they would if one process clipped all
    shards together. A collective call: every rank passes its own shard and
    the same ``clip_norm`` and ``norm_type``.

    Parameters
    ----------
    t_list : list or tuple of arrays
        This rank's writable float buffers (NumPy arrays, PyTorch CPU
        tensors, ...), as for :func:`clipcore.clip_by_global_norm_`.
    clip_norm : float
        The norm to clip to, >= 0.
    group : mpi4py.MPI.Intracomm, torch.distributed.ProcessGroup or None
        The ranks sharing the gradients; None means torch's default group.
    norm_type : float, default 2.0
        p of the p-norm: 2, 1, ``inf`` or any p > 0.
    replicated : list or tuple of arrays, optional
        Buffers every rank holds a full copy of: counted once in the norm
        (see :func:`global_norm`) and scaled on every rank.
    error_if_nonfinite : bool, default False
        If the global norm is NaN or inf: every rank raises ValueError and
        nothing is modified. If False, TensorFlow's rule: every element on
        every rank becomes NaN.
    n_threads : int or None
        Threads for this rank's kernels; None uses what OpenMP may use.

    Returns
    -------
    float
        The global norm before clipping, the same on every rank. When it is
        <= clip_norm nothing is written.

    Raises
    ------
    TypeError, ValueError
        As :func:`clipcore.clip_by_global_norm_` and :func:`global_norm`;
        every argument is checked before the all-reduce.
    RuntimeError
        On every other rank, when one rank's arguments failed the checks;
        nothing is modified on any rank.

    Examples
    --------
    >>> import numpy as np
    >>> from mpi4py import MPI
    >>> from clipcore import distributed
    >>> shard = [np.array([3.0, 4.0], np.float32)]
    >>> distributed.clip_by_global_norm_(shard, 1.0, MPI.COMM_SELF)
    5.0
    >>> shard[0]
    array([0.6, 0.8], dtype=float32)
    """
    g = _as_group(group)
    try:
        everything = t_list
        if replicated is not None:
            t_list = list(as_tuple(t_list, "t_list"))
            replicated = list(as_tuple(replicated, "replicated"))
            everything = t_list + replicated
        try:
            plan = clipcore.Plan(everything, n_threads=n_threads)
            # Checks clip_norm and norm_type now; a zero norm writes nothing.
            plan.clip_by_global_norm_(clip_norm, use_norm=0.0, norm_type=norm_type)
        except (TypeError, ValueError) as exc:
            if replicated is None:
                raise
            raise _relabel(exc, len(t_list)) from None
        p = float(norm_type)
        if replicated is None or g.rank == 0 or p == math.inf:
            local = plan.global_norm(norm_type=p)
        else:
            local = _local_norm(t_list, replicated, p, g.rank, n_threads)
    except Exception:
        _join_failed(g, norm_type)
        raise
    norm = _reduce(g, local, p, "clip_by_global_norm_")
    # The same norm on every rank, so the same outcome: a scale, NaN, or a ValueError.
    return plan.clip_by_global_norm_(clip_norm, use_norm=norm, norm_type=p,
                                     error_if_nonfinite=error_if_nonfinite)
