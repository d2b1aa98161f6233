"""The implementations the bench times: one entry per family, each with its calls per op.

A family is what runs in one worker process, with its own thread settings:
clipcore (the list call, the Plan and the bandwidth ceiling), NumPy, PyTorch,
TensorFlow and JAX. Each implementation maps an op to what it calls (shown in
the table) and to a maker ``make(data, params)`` of the zero-argument call
that is timed; an op it lacks has no entry ("no equivalent"). Adding a peer
is one ``Family`` entry. A call returns None when it worked in place on
``data.arrays``, else the list of output tensors; the ceiling's call times
itself and returns the seconds of its probes.
"""
import gc
import importlib.util
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

import clipcore
from clipcore import kernels
from clipcore.bench._probe import bandwidth_probe
from clipcore.bench.cases import OPS

# Set this to a comma-separated list of module names (torch, tensorflow,
# optax, matplotlib) to make the bench treat them as not installed: what a
# fresh install with only NumPy sees.
HIDE_ENV = "CLIPCORE_BENCH_HIDE"


def hidden():
    """Module names the bench treats as not installed (from CLIPCORE_BENCH_HIDE)."""
    return {m.strip() for m in os.environ.get(HIDE_ENV, "").split(",") if m.strip()}


def installed(module):
    """True when module can be imported and is not hidden."""
    return module not in hidden() and importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class Impl:
    """One row of a case: what it calls per op, and how to make that call."""
    name: str
    ops: dict                  # op -> (what it calls, make(data, params) -> call)
    self_timed: bool = False   # the call returns its own seconds (the ceiling's probes)


@dataclass(frozen=True)
class Family:
    """The implementations one worker process runs, and how it sets its threads."""
    name: str
    module: str                # what must be installed (None: always there)
    configure: Callable        # (threads) -> (version, threads it reports), in the worker
    impls: tuple


def _in_place(f, *args, **kwargs):
    """A call that runs f(*args, **kwargs) for its effect on the data and returns None."""
    def call():
        f(*args, **kwargs)
    return call


# --- the ceiling: the bandwidth probe over as many bytes -----------------------------

PLAIN_LOOPS = {"prefetch": False, "scale_backward": False}
CEILINGS = {"read": "one read pass", "rw": "one read-write pass",
            "read+rw": "a read pass + a read-write pass",
            "read+read+rw": "two read passes + a read-write pass"}


def probe_ceiling(data, kind):
    """One run of each of the ceiling's probes over data.probe_buffer: their seconds, one per variant.

    kind: "read" (a read pass), "rw" (a read-write pass on its own: what an
    in-place elementwise op moves), "read+rw" (a read pass and the
    read-write pass that follows it: what a clip does) or "read+read+rw"
    (AGC, which reads its parameters too: the read pass counted twice). Each probe runs after
    ``data.restore()``, as every timed call does: a pass straight after the
    restore also pays for writing the restored data back from the cache,
    which a pass after the read pass has already done. The variants: the
    plain loops (no software prefetch, passes in order) and those the kernels
    run with here; the run's thread count and one thread (on a few MB, waking
    a second thread costs more than it saves); for a read pass, a plain sum
    and the norm's own loop. Each is the faster somewhere: the ceiling is the
    fastest.
    """
    times, parts = [], kind.split("+")
    tuned = kernels.get_tuning()
    counts = sorted({data.threads or kernels.max_threads(), 1})
    try:
        for loops in (PLAIN_LOOPS, tuned):
            kernels.set_tuning(**loops)
            for nt in counts:
                for square in (False,) if kind == "rw" else (False, True):
                    data.restore()
                    r, w = bandwidth_probe(data.probe_buffer, nt, read=kind != "rw",
                                           square=square)
                    times.append(parts.count("read") * (r or 0.0) + (w if "rw" in parts else 0.0))
    finally:
        kernels.set_tuning(**tuned)
    return times


def _ceiling(kind):
    return lambda d, p: lambda: probe_ceiling(d, kind)


CEILING = Impl("ceiling", {op: (CEILINGS[o.ceiling], _ceiling(o.ceiling))
                           for op, o in OPS.items()}, self_timed=True)


# --- clipcore ------------------------------------------------------------------------
# clipcore's default thread policy (n_threads=None): the worker's
# OMP_NUM_THREADS is the thread count, small lists run on one thread.

def _clipcore_threads(threads):
    return clipcore.__version__, threads


def _clip_list(d, p):
    return _in_place(clipcore.clip_by_global_norm_, d.arrays, p["clip_norm"])


def _clip_plan(d, p):
    return _in_place(clipcore.Plan(d.typed()).clip_by_global_norm_, p["clip_norm"])


def _clipcore_agc(d, p):
    # What clipcore.torch.adaptive_clip_grad_ runs, on the NumPy arrays (timm's units).
    from clipcore._per_example import adaptive_clip
    return _in_place(adaptive_clip, d.arrays, d.weights, p["clipping"], p["eps"], "torch",
                     2.0, 0)


CLIPCORE = Impl("clipcore", {
    "clip": ("clip_by_global_norm_(list)", _clip_list),
    "noclip": ("clip_by_global_norm_(list)", _clip_list),
    "clip_bf16": ("clip_by_global_norm_(list), ml_dtypes",
                  lambda d, p: _in_place(clipcore.clip_by_global_norm_, d.typed(),
                                         p["clip_norm"])),
    "agc": ("adaptive_clip_grad_'s kernel", _clipcore_agc),
    "per_example": ("per_example_global_norm_clip",
                    lambda d, p: lambda: clipcore.per_example_global_norm_clip(
                        d.arrays, p["l2_norm_clip"])[0]),
    "clip_by_value": ("clip_by_value_(x, lo, hi)",
                      lambda d, p: _in_place(clipcore.clip_by_value_, d.x, p["lo"], p["hi"])),
    "relu": ("relu_(x)", lambda d, p: _in_place(clipcore.relu_, d.x)),
    "clip_by_norm": ("clip_by_norm(x, c)",
                     lambda d, p: lambda: [clipcore.clip_by_norm(d.x, p["clip_norm"])]),
})
PLAN = Impl("clipcore Plan", {"clip": ("Plan.clip_by_global_norm_", _clip_plan),
                              "noclip": ("Plan.clip_by_global_norm_", _clip_plan),
                              "clip_bf16": ("Plan.clip_by_global_norm_", _clip_plan)})


# --- NumPy ---------------------------------------------------------------------------

def numpy_clip_by_global_norm_(arrays, clip_norm):
    """The NumPy baseline: per-array ``np.dot`` for the norm, in-place multiply."""
    sq = 0.0
    for a in arrays:
        v = a.reshape(-1)
        sq += float(np.dot(v, v))
    norm = math.sqrt(sq)
    if norm > clip_norm:
        scale = np.float32(clip_norm / norm)
        for a in arrays:
            np.multiply(a, scale, out=a)
    return norm


def _numpy_clip_by_norm(d, p):
    x, v, c = d.x, d.x.reshape(-1), p["clip_norm"]
    return lambda: [x * np.float32(c / max(math.sqrt(float(np.dot(v, v))), c))]


def numpy_adaptive_clip(grads, weights, clipping, eps):
    """timm's adaptive_clip_grad formula in NumPy, per array."""
    for g, w in zip(grads, weights):
        axes = tuple(range(1, g.ndim)) if g.ndim > 1 else None
        g_norm = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
        max_norm = clipping * np.maximum(np.sqrt(np.sum(w * w, axis=axes, keepdims=True)), eps)
        np.multiply(g, np.where(g_norm < max_norm, np.float32(1),
                                max_norm / np.maximum(g_norm, 1e-6)).astype(np.float32), out=g)


def numpy_per_example_clip(grads, l2_norm_clip):
    """optax's per_example_global_norm_clip in NumPy: row norms, multipliers, tensordot."""
    rows = [g.reshape(len(g), -1) for g in grads]
    norms = np.sqrt(sum(np.einsum("ij,ij->i", r, r) for r in rows))
    mult = np.where(norms > l2_norm_clip, l2_norm_clip / np.where(norms > 0, norms, 1), 1)
    return [np.tensordot(mult.astype(g.dtype), g, axes=1) for g in grads]


def _numpy_threads(threads):
    return np.__version__, threads     # OPENBLAS_NUM_THREADS is set for the worker


def _numpy_clip(d, p):
    return _in_place(numpy_clip_by_global_norm_, d.arrays, p["clip_norm"])


NUMPY = Impl("numpy", {
    "clip": ("np.dot per array + in-place multiply", _numpy_clip),
    "noclip": ("np.dot per array (+ multiply if needed)", _numpy_clip),
    "clip_by_value": ("np.clip(x, lo, hi, out=x)", lambda d, p: _in_place(
        np.clip, d.x, np.float32(p["lo"]), np.float32(p["hi"]), out=d.x)),
    "relu": ("np.maximum(x, 0, out=x)",
             lambda d, p: _in_place(np.maximum, d.x, np.float32(0), out=d.x)),
    "clip_by_norm": ("x * (c / max(norm, c))", _numpy_clip_by_norm),
    "agc": ("timm's formula, NumPy ops per array", lambda d, p: _in_place(
        numpy_adaptive_clip, d.arrays, d.weights, p["clipping"], p["eps"])),
    "per_example": ("row norms + tensordot per array", lambda d, p: lambda:
                    numpy_per_example_clip(d.arrays, p["l2_norm_clip"])),
})


# --- PyTorch -------------------------------------------------------------------------

def _torch_threads(threads):
    import torch
    torch.set_num_threads(threads)
    return torch.__version__, torch.get_num_threads()


def _torch_params(d, weights=None):
    """Parameters whose .grad is d.arrays' memory (bfloat16 for a bfloat16 workload)."""
    import torch
    params = []
    for k, a in enumerate(d.arrays):
        grad = torch.from_numpy(a)                          # the same memory as a
        if d.dtype == "bfloat16":
            grad = grad.view(torch.bfloat16)
        data = torch.empty(a.shape, dtype=grad.dtype) if weights is None else \
            torch.from_numpy(weights[k])                    # never written
        param = torch.nn.Parameter(data)
        param.grad = grad
        params.append(param)
    return params


def _torch_clip(d, p):
    import torch
    return _in_place(torch.nn.utils.clip_grad_norm_, _torch_params(d), p["clip_norm"])


def torch_per_example_clip(grads, l2_norm_clip):
    """Opacus's clip_and_accumulate steps with optax's multiplier: a norm per
    array per example, their norm, the multipliers, an einsum per array."""
    import torch
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads], dim=1).norm(2, dim=1)
    mult = torch.where(norms > l2_norm_clip, l2_norm_clip / norms, torch.ones_like(norms))
    return [torch.einsum("i,i...", mult, g) for g in grads]


def _torch_clamp(d, p):
    import torch
    return _in_place(torch.clamp_, torch.from_numpy(d.x), p["lo"], p["hi"])


def _torch_relu(d, p):
    import torch
    return _in_place(torch.relu_, torch.from_numpy(d.x))


def _torch_agc(d, p):
    # timm's loop in torch ops: clipcore.torch's own for the tensors it does not read
    from clipcore.torch import _adaptive_clip_grad_torch
    return _in_place(_adaptive_clip_grad_torch, _torch_params(d, d.weights), p["clipping"],
                     p["eps"], 2.0)


def _torch_per_example(d, p):
    import torch
    grads = [torch.from_numpy(a) for a in d.arrays]
    return lambda: torch_per_example_clip(grads, p["l2_norm_clip"])


TORCH = Impl("torch", {
    "clip": ("torch.nn.utils.clip_grad_norm_", _torch_clip),
    "noclip": ("torch.nn.utils.clip_grad_norm_", _torch_clip),
    "clip_bf16": ("torch.nn.utils.clip_grad_norm_", _torch_clip),
    "agc": ("timm's adaptive_clip_grad (torch ops)", _torch_agc),
    "per_example": ("Opacus's steps (norms, stack, einsum)", _torch_per_example),
    "clip_by_value": ("torch.clamp_(x, lo, hi)", _torch_clamp),
    "relu": ("torch.relu_(x)", _torch_relu),
})


# --- TensorFlow ----------------------------------------------------------------------
# TensorFlow works out of place: its inputs are copies that never change (the
# restore before each call still runs, as for everyone).

def _tf_threads(threads):
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    return tf.__version__, tf.config.threading.get_intra_op_parallelism_threads()


def _tf(fn):
    """A maker of a TensorFlow call: fn(tf, tensors, params) on constant copies of the data."""
    def make(d, p):
        import tensorflow as tf
        tensors = [tf.constant(a) for a in d.arrays]
        return lambda: fn(tf, tensors, p)
    return make


_tf_clip = _tf(lambda tf, ts, p: tf.clip_by_global_norm(ts, p["clip_norm"])[0])
TENSORFLOW = Impl("tensorflow", {
    "clip": ("tf.clip_by_global_norm (eager)", _tf_clip),
    "noclip": ("tf.clip_by_global_norm (eager)", _tf_clip),
    "clip_by_value": ("tf.clip_by_value",
                      _tf(lambda tf, ts, p: [tf.clip_by_value(ts[0], p["lo"], p["hi"])])),
    "relu": ("tf.nn.relu", _tf(lambda tf, ts, p: [tf.nn.relu(ts[0])])),
    "clip_by_norm": ("tf.clip_by_norm",
                     _tf(lambda tf, ts, p: [tf.clip_by_norm(ts[0], p["clip_norm"])])),
})


# --- JAX -----------------------------------------------------------------------------

def _jax_threads(threads):
    # XLA's CPU pools follow no variable: keep the process on `threads` cores.
    cpus = sorted(os.sched_getaffinity(0))[:threads] if hasattr(os, "sched_getaffinity") else []
    if cpus:
        os.sched_setaffinity(0, cpus)
    import jax
    return jax.__version__, len(cpus) or threads


def _jax_clip(d, p):
    import jax
    import optax
    # What a JAX user on a CPU has: jitted optax, which returns new arrays
    # (the inputs are copies that never change, as TensorFlow's).
    grads = [jax.device_put(a) for a in d.arrays]
    tx = optax.clip_by_global_norm(p["clip_norm"])
    state = tx.init(grads)
    step = jax.jit(lambda g: tx.update(g, state)[0])
    jax.block_until_ready(step(grads))       # compiled outside the timed calls
    return lambda: jax.block_until_ready(step(grads))


def _jax_per_example(d, p):
    import jax
    import optax
    grads = [jax.device_put(a) for a in d.arrays]
    step = jax.jit(lambda g: optax.per_example_global_norm_clip(g, p["l2_norm_clip"])[0])
    jax.block_until_ready(step(grads))
    return lambda: jax.block_until_ready(step(grads))


JAX = Impl("jax", {"clip": ("optax.clip_by_global_norm (jax.jit)", _jax_clip),
                   "noclip": ("optax.clip_by_global_norm (jax.jit)", _jax_clip),
                   "per_example": ("optax.per_example_global_norm_clip (jit)",
                                   _jax_per_example)})


FAMILIES = (
    Family("clipcore", None, _clipcore_threads, (CEILING, CLIPCORE, PLAN)),
    Family("numpy", "numpy", _numpy_threads, (NUMPY,)),
    Family("torch", "torch", _torch_threads, (TORCH,)),
    Family("tensorflow", "tensorflow", _tf_threads, (TENSORFLOW,)),
    Family("jax", "optax", _jax_threads, (JAX,)),
)
FAMILY = {f.name: f for f in FAMILIES}
IMPLS = {impl.name: impl for f in FAMILIES for impl in f.impls}
IMPL_FAMILY = {impl.name: f.name for f in FAMILIES for impl in f.impls}
PEERS = tuple(f.name for f in FAMILIES[1:])     # what the speed-ups compare clipcore with
OURS = tuple(impl.name for impl in FAMILY["clipcore"].impls if not impl.self_timed)


def make_call(impl, op, data):
    """impl's zero-argument call for op on data; None when impl has no such op."""
    entry = IMPLS[impl].ops.get(op)
    return None if entry is None else entry[1](data, data.params[op])


def measure(call, restore, repeat, warmup=1):
    """Time call() repeat times, each on restored data; returns (seconds, last output).

    ``restore`` runs before every call, warm-up calls included, outside the
    timed region; the garbage collector is off while timing.
    """
    for _ in range(warmup):
        restore()
        call()
    times, out = [], None
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            restore()
            out = None
            t0 = time.perf_counter()
            out = call()
            times.append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, out
