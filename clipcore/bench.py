"""``python -m clipcore bench``: clipcore against what people use now, on this machine.

Every case clips real parameter lists (see :mod:`clipcore.workloads`) with
clipcore and with its peers: NumPy always, PyTorch and TensorFlow when they
are installed. Each implementation family runs in a subprocess of its own
with the same thread count (``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``,
``torch.set_num_threads``, TensorFlow's intra/inter-op threads), so no
family's thread pool spins while another is measured. The ceiling is
measured in clipcore's process with :func:`clipcore.kernels.bandwidth_probe`
over as many bytes as the case's data, before and after clipcore's own
calls on that data; the fastest probe counts (a ceiling is what the machine
can do at best: noise only ever slows a probe down).

Every timed call works on fresh data: the inputs are restored from a backup
copy before each call, outside the timed region, for every implementation
alike, so clipping really happens on every repeat. After the last repeat the
output is checked (the clipped norm, the clipped values), so a fast wrong
answer shows as an error, not as a win.

Results JSON (``results.json``), schema ``clipcore-bench/2``::

    {"schema": "clipcore-bench/2", "created": ISO time, "argv": [...],
     "quick": bool, "repeat": int, "warmup": int, "threads": int,
     "machine": {"cpu", "logical_cpus", "available_cpus", "threads",
                 "simd", "openmp", "platform", "python", "numpy", "clipcore",
                 "load_average": [before the run, after it] (1-minute, or null),
                 "other_load": CPUs' worth of time other processes used during
                               the run (Linux; null elsewhere)},
     "families": {family: {"status": "ok" | "not installed" | "error",
                           "version": str | null, "threads": int | null,
                           "seconds": wall time of its process (absent if not run)}},
     "ceilings": {workload: {"values", "bytes", "read_s": [...], "rw_s": [...],
                             "rw_alone_s": [...]}},
                 (the probe's passes: a read pass and the read-write pass after
                 it; a read-write pass on its own; 2 x repeat of each with the
                 run's thread count, and as many with one thread if that differs)
     "cases": [{"key", "label", "workload", "op", "tensors", "values", "bytes",
                "traffic_bytes", "params": {...},
                "ceiling": {"kind", "best_s", "gbps"} | null,
                "results": {impl: {"family", "call", "status", "median_s",
                                   "times_s", "gbps", "pct_ceiling",
                                   "message"}},
                "speedup": {peer: {clipcore impl: peer time / its time}}}]}

A default run (no ``--threads``) on a machine with more than one thread runs
everything twice, at one thread and at all threads: the JSON above is the
all-threads run, with the 1-thread run, of the same schema, under
``"one_thread"``. ``"contend"`` is true when a busy process loaded one core
meanwhile (``--contend``).

``status`` is "ok", "not installed", "not in this clipcore" (an op clipcore
does not have yet), "no equivalent" (the peer has no such op) or "error"
(with ``message``); only "ok" results carry times.
"""
import gc
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

import clipcore
from clipcore import kernels, workloads

SCHEMA = "clipcore-bench/2"
FAMILIES = ("clipcore", "numpy", "torch", "tensorflow", "jax")
PEERS = FAMILIES[1:]
# Set this to a comma-separated list of module names (torch, tensorflow,
# matplotlib) to make the runner treat them as not installed: what a fresh
# install with only NumPy sees.
HIDE_ENV = "CLIPCORE_BENCH_HIDE"
_MARK = "@@clipcore-bench "
# The elementwise ops work on one tensor of 16M values (issue 3's size).
ELEMENTWISE = (("x", (1 << 24,)),)


@dataclass(frozen=True)
class Case:
    """One row group of the table: an operation on a workload's data."""
    key: str          # id in the JSON and for --workload
    label: str        # row label in the table
    workload: str     # key of DATA
    op: str           # key of OPS


# op -> (ceiling kind, passes over the data the op needs at the least)
OPS = {
    "clip": ("read+rw", 3),          # norm: read; scale: read + write
    "noclip": ("read", 1),           # norm only: nothing to write
    "clip_by_value": ("rw", 2),      # in place
    "relu": ("rw", 2),               # in place
    "clip_by_norm": ("read+rw", 3),  # norm, then write a new tensor
}

DATA = {name: workloads.WORKLOADS[name] for name in ("mlp", "2000x512", "resnet50", "gpt2")}
DATA["elementwise"] = ELEMENTWISE

CASES = (
    Case("2000x512", "2000x512", "2000x512", "clip"),
    Case("mlp", "MNIST MLP", "mlp", "clip"),
    Case("resnet50", "ResNet-50", "resnet50", "clip"),
    Case("gpt2", "GPT-2 small", "gpt2", "clip"),
    Case("gpt2-noclip", "GPT-2, no clip needed", "gpt2", "noclip"),
    # The elementwise ops on 16M values.
    Case("clip_by_value", "clip_by_value 16M", "elementwise", "clip_by_value"),
    Case("relu", "relu 16M", "elementwise", "relu"),
    Case("clip_by_norm", "clip_by_norm 16M", "elementwise", "clip_by_norm"),
)

# What each implementation calls, per op (no entry: the family has no such op).
CALLS = {
    "clipcore": {"clip": "clip_by_global_norm_(list)", "noclip": "clip_by_global_norm_(list)",
                 "clip_by_value": "clip_by_value_(x, lo, hi)", "relu": "relu_(x)",
                 "clip_by_norm": "clip_by_norm(x, c)"},
    "clipcore Plan": {"clip": "Plan.clip_by_global_norm_", "noclip": "Plan.clip_by_global_norm_"},
    "numpy": {"clip": "np.dot per array + in-place multiply",
              "noclip": "np.dot per array (+ multiply if needed)",
              "clip_by_value": "np.clip(x, lo, hi, out=x)", "relu": "np.maximum(x, 0, out=x)",
              "clip_by_norm": "x * (c / max(norm, c))"},
    "torch": {"clip": "torch.nn.utils.clip_grad_norm_", "noclip": "torch.nn.utils.clip_grad_norm_",
              "clip_by_value": "torch.clamp_(x, lo, hi)", "relu": "torch.relu_(x)"},
    "tensorflow": {"clip": "tf.clip_by_global_norm (eager)",
                   "noclip": "tf.clip_by_global_norm (eager)",
                   "clip_by_value": "tf.clip_by_value", "relu": "tf.nn.relu",
                   "clip_by_norm": "tf.clip_by_norm"},
    "jax": {"clip": "optax.clip_by_global_norm (jax.jit)",
            "noclip": "optax.clip_by_global_norm (jax.jit)"},
}
FAMILY_IMPLS = {"clipcore": ("clipcore", "clipcore Plan"), "numpy": ("numpy",),
                "torch": ("torch",), "tensorflow": ("tensorflow",), "jax": ("jax",)}
IMPL_FAMILY = {impl: fam for fam, impls in FAMILY_IMPLS.items() for impl in impls}
MODULE = {"numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "jax": "optax"}


def impl_names(family, op):
    """The implementations a family runs for an op, with or without a result."""
    return [impl for impl in FAMILY_IMPLS[family] if op in CALLS[impl]]


def hidden():
    """Module names the runner treats as not installed (from CLIPCORE_BENCH_HIDE)."""
    return {m.strip() for m in os.environ.get(HIDE_ENV, "").split(",") if m.strip()}


def installed(module):
    """True when module can be imported and is not hidden."""
    return module not in hidden() and importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------
# Data, implementations, timing: these run in the worker processes (and in
# benchmarks/ through pytest-benchmark).

class Data:
    """A workload's working arrays, their backup and its parameters.

    The working arrays are views of one buffer, ``work``, and the backup
    arrays views of another, ``flat``. ``restore()`` copies the backup into
    the working arrays; the ceiling probe runs over ``work`` after a restore,
    so it finds the memory in the state every timed call finds it in (just
    written: dirty in the cache).
    """

    def __init__(self, workload, seed=0, n_threads=None):
        spec = DATA[workload] if isinstance(workload, str) else workload
        shp = workloads.shapes([shape for _, shape in spec])
        self.names = [name for name, _ in spec]
        self.flat = np.empty(workloads.n_values(shp), np.float32)
        self.work = np.empty_like(self.flat)
        self.backup, self.arrays, pos = [], [], 0
        for shape in shp:
            n = int(np.prod(shape, dtype=np.int64))
            self.backup.append(self.flat[pos:pos + n].reshape(shape))
            self.arrays.append(self.work[pos:pos + n].reshape(shape))
            pos += n
        workloads.fill_gradients(self.backup, seed)
        self.restore()
        self.norm = clipcore.global_norm(self.backup, n_threads=n_threads)
        n = max(self.flat.size, 1)
        half = 0.6745 * self.norm / math.sqrt(n)   # ~ median |x| for normal values
        self.params = {"clip": {"clip_norm": self.norm / 2},
                       "noclip": {"clip_norm": self.norm * 2},
                       "clip_by_value": {"lo": -half, "hi": half},
                       "relu": {},
                       "clip_by_norm": {"clip_norm": self.norm / 2}}

    def restore(self):
        for a, b in zip(self.arrays, self.backup):
            np.copyto(a, b)


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


def _in_place(f, *args, **kwargs):
    """A call that runs f(*args, **kwargs) for its effect on the data and returns None."""
    def call():
        f(*args, **kwargs)
    return call


def _calls_clipcore(op, data, threads):
    # clipcore's default thread policy (n_threads=None): the worker's
    # OMP_NUM_THREADS is the thread count, small lists run on one thread.
    p = data.params[op]
    if op in ("clip", "noclip"):
        plan = clipcore.Plan(data.arrays)
        return {"clipcore": _in_place(clipcore.clip_by_global_norm_, data.arrays,
                                      p["clip_norm"]),
                "clipcore Plan": _in_place(plan.clip_by_global_norm_, p["clip_norm"])}
    x = data.arrays[0]
    if op == "clip_by_value":
        return {"clipcore": _in_place(clipcore.clip_by_value_, x, p["lo"], p["hi"])}
    if op == "relu":
        return {"clipcore": _in_place(clipcore.relu_, x)}
    return {"clipcore": lambda: [clipcore.clip_by_norm(x, p["clip_norm"])]}


def _calls_numpy(op, data, threads):
    p, x = data.params[op], data.arrays[0]
    if op in ("clip", "noclip"):
        return {"numpy": _in_place(numpy_clip_by_global_norm_, data.arrays, p["clip_norm"])}
    if op == "clip_by_value":
        return {"numpy": _in_place(np.clip, x, np.float32(p["lo"]), np.float32(p["hi"]), out=x)}
    if op == "relu":
        return {"numpy": _in_place(np.maximum, x, np.float32(0), out=x)}
    v, c = x.reshape(-1), p["clip_norm"]
    return {"numpy": lambda: [x * np.float32(c / max(math.sqrt(float(np.dot(v, v))), c))]}


def _calls_torch(op, data, threads):
    import torch
    p = data.params[op]
    if op in ("clip", "noclip"):
        params = []
        for a in data.arrays:
            param = torch.nn.Parameter(torch.empty(a.shape))   # never touched
            param.grad = torch.from_numpy(a)                   # the same memory as a
            params.append(param)
        return {"torch": _in_place(torch.nn.utils.clip_grad_norm_, params, p["clip_norm"])}
    x = torch.from_numpy(data.arrays[0])
    if op == "clip_by_value":
        return {"torch": _in_place(torch.clamp_, x, p["lo"], p["hi"])}
    if op == "relu":
        return {"torch": _in_place(torch.relu_, x)}
    return {}


def _calls_tensorflow(op, data, threads):
    import tensorflow as tf
    p = data.params[op]
    # TensorFlow clips out of place: its inputs are copies that never change
    # (the restore before each call still runs, as for everyone).
    tensors = [tf.constant(a) for a in data.arrays]
    if op in ("clip", "noclip"):
        return {"tensorflow": lambda: tf.clip_by_global_norm(tensors, p["clip_norm"])[0]}
    x = tensors[0]
    if op == "clip_by_value":
        return {"tensorflow": lambda: [tf.clip_by_value(x, p["lo"], p["hi"])]}
    if op == "relu":
        return {"tensorflow": lambda: [tf.nn.relu(x)]}
    return {"tensorflow": lambda: [tf.clip_by_norm(x, p["clip_norm"])]}


def _calls_jax(op, data, threads):
    import jax
    import optax
    # What a JAX user on a CPU has: jitted optax, which returns new arrays
    # (the inputs are copies that never change, as TensorFlow's).
    grads = [jax.device_put(a) for a in data.arrays]
    tx = optax.clip_by_global_norm(data.params[op]["clip_norm"])
    state = tx.init(grads)
    step = jax.jit(lambda g: tx.update(g, state)[0])
    jax.block_until_ready(step(grads))       # compiled outside the timed calls
    return {"jax": lambda: jax.block_until_ready(step(grads))}


CALL_FACTORIES = {"clipcore": _calls_clipcore, "numpy": _calls_numpy,
                  "torch": _calls_torch, "tensorflow": _calls_tensorflow, "jax": _calls_jax}


def calls(family, op, data, threads):
    """Zero-argument callables for a family's implementations of op on data.

    A call returns None when it worked in place on ``data.arrays``, else the
    list of output tensors.
    """
    return CALL_FACTORIES[family](op, data, threads)


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


def verify(op, data, out):
    """Raise AssertionError if out (None: data.arrays) is not op applied once to the backup.

    Global-norm ops are checked by the norm of the output (all of it) and the
    values of a sample of the first tensor; elementwise ops on a sample of
    the values (every 61st), so checking stays cheap next to the op itself.
    """
    outs = data.arrays if out is None else [np.asarray(t) for t in out]
    p = data.params[op]
    got = outs[0].reshape(-1)[::61].astype(np.float64)
    x = data.backup[0].reshape(-1)[::61].astype(np.float64)
    if op in ("clip", "noclip"):
        want_norm = p["clip_norm"] if op == "clip" else data.norm
        norm = clipcore.global_norm(outs)
        assert math.isclose(norm, want_norm, rel_tol=1e-3), \
            f"global norm after the call is {norm:.6g}, expected {want_norm:.6g}"
        want = x * min(1.0, p["clip_norm"] / data.norm)
    elif op == "clip_by_value":
        want = np.clip(x, np.float32(p["lo"]), np.float32(p["hi"]))
    elif op == "relu":
        want = np.maximum(x, 0)
    else:
        want = x * (p["clip_norm"] / max(data.norm, p["clip_norm"]))
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=0), \
        f"{op}: the output differs from the input {'clipped' if op != 'relu' else 'rectified'}"


def probe_ceiling(data, threads, repeat, warmup=1):
    """The bandwidth ceiling over data.work: lists of seconds of the probe's passes.

    Returns (read, rw, rw_alone): a read pass and the read-write pass that
    follows it (what a clip does: norm, then scale), and a read-write pass on
    its own (what an in-place elementwise op does). Each probe runs after
    ``data.restore()``, as every timed call does: a pass straight after the
    restore also pays for writing the restored data back from the cache, which
    a pass after the read pass has already done. The probes run with the
    run's thread count and with one thread (on a few MB, waking a second
    thread costs more than it saves), their read pass alternately with a
    plain sum and with the norm's own loop (each is the faster somewhere):
    the lists hold them all.
    """
    read, rw, rw_alone = [], [], []
    tuned = kernels.get_tuning()
    try:
        for i in range(warmup + repeat):
            # The plain loops (no software prefetch, passes in order), then the
            # variant the kernels run with here: the faster is the ceiling.
            kernels.set_tuning(**(PLAIN_LOOPS if i % 2 else tuned))
            for nt in sorted({threads, 1}):
                data.restore()
                r, w = kernels.bandwidth_probe(data.work, nt, square=bool(i % 4 > 1))
                data.restore()
                w_alone = kernels.bandwidth_probe(data.work, nt, read=False)[1]
                if i >= warmup:
                    read.append(r)
                    rw.append(w)
                    rw_alone.append(w_alone)
    finally:
        kernels.set_tuning(**tuned)
    return read, rw, rw_alone


PLAIN_LOOPS = {"prefetch": False, "scale_backward": False}


def _configure_threads(family, threads):
    """Set the family's thread count; returns (version, threads it reports)."""
    if family == "jax":      # XLA's CPU pools follow no variable: keep it on `threads` cores
        cpus = sorted(os.sched_getaffinity(0))[:threads] if hasattr(os, "sched_getaffinity") else []
        if cpus:
            os.sched_setaffinity(0, cpus)
        import jax
        return jax.__version__, len(cpus) or threads
    if family == "torch":
        import torch
        torch.set_num_threads(threads)
        return torch.__version__, torch.get_num_threads()
    if family == "tensorflow":
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        return tf.__version__, tf.config.threading.get_intra_op_parallelism_threads()
    if family == "numpy":
        return np.__version__, threads     # OPENBLAS_NUM_THREADS is set for the worker
    return clipcore.__version__, threads


def _emit(**event):
    sys.stdout.write(_MARK + json.dumps(event) + "\n")
    sys.stdout.flush()


def _worker():
    """Entry point of a worker process: a JSON spec on stdin, events on stdout."""
    spec = json.load(sys.stdin)
    family, threads = spec["family"], spec["threads"]
    version, reported = _configure_threads(family, threads)
    _emit(event="ready", family=family, version=version, threads=reported)
    by_workload = {}
    for case in spec["cases"]:
        by_workload.setdefault(case["workload"], []).append(case)
    for workload, cases in by_workload.items():
        _emit(event="data", workload=workload)
        data = Data(workload, spec["seed"], threads)
        if family == "clipcore":
            _emit(event="params", workload=workload, params=data.params, norm=data.norm)
            probes = probe_ceiling(data, threads, spec["repeat"], spec["warmup"])
        for case in cases:
            op = case["op"]
            try:
                found = calls(family, op, data, threads)
            except Exception as exc:   # a peer that fails to set up
                found, setup_error = {}, f"{type(exc).__name__}: {exc}"
            else:
                setup_error = None
            for impl in impl_names(family, op):
                if impl not in found:
                    status = "error" if setup_error else "not in this clipcore"
                    _emit(event="result", case=case["key"], impl=impl, status=status,
                          message=setup_error)
                    continue
                out = None
                try:
                    times, out = measure(found[impl], data.restore, spec["repeat"], spec["warmup"])
                    verify(op, data, out)
                except Exception as exc:
                    _emit(event="result", case=case["key"], impl=impl, status="error",
                          message=f"{type(exc).__name__}: {exc}")
                else:
                    _emit(event="result", case=case["key"], impl=impl, status="ok", times_s=times)
                del out     # TensorFlow's outputs of GPT-2 hold 500 MB
        if family == "clipcore":
            read, rw, rw_alone = (a + b for a, b in
                                  zip(probes, probe_ceiling(data, threads, spec["repeat"], 0)))
            _emit(event="ceiling", workload=workload, values=int(data.flat.size),
                  read_s=read, rw_s=rw, rw_alone_s=rw_alone)
        del data, found


# ---------------------------------------------------------------------------
# The runner: starts one worker per family, collects and reports.

def select_cases(names=None):
    """Cases for --workload names (workloads or case keys); all cases for None.

    Raises ValueError naming the unknown name.
    """
    if not names:
        return list(CASES)
    choices = sorted(set(DATA) | {c.key for c in CASES})
    for name in names:
        if name not in choices:
            raise ValueError(f"unknown workload {name!r} (choose from {', '.join(choices)})")
    return [c for c in CASES if c.key in names or c.workload in names]


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo, macOS sysctl, else platform's guess)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], text=True,
                                  capture_output=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(threads):
    """The facts the table and the JSON name: CPU, cores, threads, SIMD path."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "available_cpus": available,
            "threads": threads, "simd": kernels.simd_path(), "openmp": kernels.openmp_enabled(),
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "clipcore": clipcore.__version__}


class Progress:
    """A progress bar on a terminal; one line per finished step elsewhere."""

    def __init__(self, total, stream=None, width=28):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label = ""

    def show(self, label):
        self.label = label
        if self.tty:
            filled = self.width * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {label[:40]:<40}")
            self.stream.flush()

    def step(self, label):
        self.done += 1
        if self.tty:
            self.show(label)
        else:
            self.stream.write(f"[{self.done}/{self.total}] {label}\n")
            self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\r" + " " * (self.width + 90) + "\r")
            self.stream.flush()


def _package_root():
    """The folder holding the clipcore package this process runs."""
    return os.path.dirname(os.path.dirname(os.path.abspath(clipcore.__file__)))


def _worker_env(threads):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    return env


def _steps(family, cases):
    n = sum(len(impl_names(family, c.op)) for c in cases)
    if family == "clipcore":
        n += len({c.workload for c in cases})    # one ceiling per workload
    return n


def run_family(family, cases, *, threads, repeat, warmup, seed, progress):
    """Run one family's worker over cases; returns its events (dicts).

    A worker that dies is reported as an "error" event with the end of its
    stderr; the run goes on with the next family.
    """
    spec = {"family": family, "threads": threads, "repeat": repeat, "warmup": warmup,
            "seed": seed, "cases": [{"key": c.key, "workload": c.workload, "op": c.op}
                                    for c in cases]}
    labels = {c.key: c.label for c in cases}
    events, start = [], time.perf_counter()
    progress.show(f"starting {family}")
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from clipcore.bench import _worker; _worker()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
            env=_worker_env(threads), cwd=_package_root())   # imports this very clipcore
        try:
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
            for line in proc.stdout:
                if not line.startswith(_MARK):
                    continue
                event = json.loads(line[len(_MARK):])
                event["at_s"] = time.perf_counter() - start
                events.append(event)
                kind = event["event"]
                if kind == "data":
                    progress.show(f"{family}: preparing {event['workload']}")
                elif kind == "ceiling":
                    progress.step(f"ceiling: {event['workload']}")
                elif kind == "result":
                    label = f"{event['impl']}: {labels[event['case']]}"
                    if event["status"] == "ok":
                        label += f" {_fmt_time(_median(event['times_s']))}"
                    progress.step(label)
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if rc != 0:
            err.seek(0)
            tail = err.read().strip().splitlines()[-3:]
            events.append({"event": "crash", "message":
                           f"{family} worker exited with code {rc}: " + " | ".join(tail)})
    events.append({"event": "end", "at_s": time.perf_counter() - start})
    return events


def _median(xs):
    return float(np.median(xs))


def run(cases, *, threads, repeat, warmup=1, seed=0, progress=None, argv=None, quick=False):
    """Measure every case with every family available; returns the results dict."""
    load_before = _load_average()
    busy_before, own_before, wall_before = _cpu_busy_s(), _own_cpu_s(), time.perf_counter()
    families = {}
    runnable = []
    for family in FAMILIES:
        if family == "clipcore" or installed(MODULE[family]):
            runnable.append(family)
        else:
            families[family] = {"status": "not installed", "version": None, "threads": None}
    total = sum(_steps(f, cases) for f in runnable)
    progress = progress or Progress(total)
    progress.total = total
    events = {}
    try:
        for family in runnable:
            events[family] = run_family(family, cases, threads=threads, repeat=repeat,
                                        warmup=warmup, seed=seed, progress=progress)
    finally:
        progress.close()
    for family in runnable:
        ready = [e for e in events[family] if e["event"] == "ready"]
        crash = [e["message"] for e in events[family] if e["event"] == "crash"]
        families[family] = {"status": "ok" if ready and not crash else "error",
                            "version": ready[0]["version"] if ready else None,
                            "threads": ready[0]["threads"] if ready else None,
                            "seconds": events[family][-1]["at_s"]}
        if crash:
            families[family]["message"] = crash[0]
    results = assemble(cases, events, families, threads=threads, repeat=repeat, warmup=warmup,
                       argv=argv, quick=quick)
    results["machine"]["load_average"] = [load_before, _load_average()]
    busy = _cpu_busy_s()
    results["machine"]["other_load"] = None if busy is None else round(max(
        0.0, (busy - busy_before) - (_own_cpu_s() - own_before))
        / (time.perf_counter() - wall_before), 2)
    return results


def _cpu_busy_s():
    """CPU seconds all processes have used since boot (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq = ticks
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s():
    """CPU seconds used by this process and its finished workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load_average():
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def assemble(cases, events, families, *, threads, repeat, warmup, argv=None, quick=False):
    """Build the results dict (schema clipcore-bench/2) from the workers' events."""
    ceilings, params = {}, {}
    for e in events.get("clipcore", []):
        if e["event"] == "ceiling":
            ceilings[e["workload"]] = {"values": e["values"], "bytes": 4 * e["values"],
                                       "read_s": e["read_s"], "rw_s": e["rw_s"],
                                       "rw_alone_s": e["rw_alone_s"]}
        elif e["event"] == "params":
            params[e["workload"]] = e["params"]
    found = {}
    for family, evs in events.items():
        for e in evs:
            if e["event"] == "result":
                found[(e["case"], e["impl"])] = e
    out_cases = []
    for case in cases:
        spec = DATA[case.workload]
        values = workloads.n_values([shape for _, shape in spec])
        kind, passes = OPS[case.op]
        traffic = passes * 4 * values
        ceiling = None
        if case.workload in ceilings:
            c = ceilings[case.workload]
            per_probe = {"read": c["read_s"], "rw": c["rw_alone_s"],
                         "read+rw": [r + w for r, w in zip(c["read_s"], c["rw_s"])]}[kind]
            best = min(per_probe)
            ceiling = {"kind": kind, "best_s": best, "gbps": traffic / best / 1e9}
        results = {}
        for impl, family in IMPL_FAMILY.items():
            if case.op not in CALLS[impl]:
                if family != "clipcore":
                    results[impl] = {"family": family, "call": None, "status": "no equivalent"}
                continue
            r = {"family": family, "call": CALLS[impl][case.op]}
            e = found.get((case.key, impl))
            fam = families.get(family, {})
            if e is not None:
                r["status"] = e["status"]
                if e.get("message"):
                    r["message"] = e["message"]
                if e["status"] == "ok":
                    med = _median(e["times_s"])
                    r.update(median_s=med, times_s=e["times_s"], gbps=traffic / med / 1e9,
                             pct_ceiling=100 * ceiling["best_s"] / med if ceiling else None)
            elif fam.get("status") == "not installed":
                r["status"] = "not installed"
            else:
                r["status"] = "error"
                r["message"] = fam.get("message", "no result from the worker")
            results[impl] = r
        speedup = {}
        for peer in PEERS:
            if results.get(peer, {}).get("status") != "ok":
                continue
            speedup[peer] = {impl: results[peer]["median_s"] / results[impl]["median_s"]
                             for impl in FAMILY_IMPLS["clipcore"]
                             if results.get(impl, {}).get("status") == "ok"}
        out_cases.append({"key": case.key, "label": case.label, "workload": case.workload,
                          "op": case.op, "tensors": len(spec), "values": values,
                          "bytes": 4 * values, "traffic_bytes": traffic,
                          "params": params.get(case.workload, {}).get(case.op, {}),
                          "ceiling": ceiling, "results": results, "speedup": speedup})
    return {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": list(argv or []), "quick": quick, "repeat": repeat, "warmup": warmup,
            "threads": threads, "machine": machine_info(threads), "families": families,
            "ceilings": ceilings, "cases": out_cases}


# ---------------------------------------------------------------------------
# Reporting

def _fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms" if s < 0.1 else f"{s * 1e3:.0f} ms"
    return f"{s:.2f} s"


def _fmt_ratio(x):
    if x < 0.1:
        return f"{x:.3f}x"
    return f"{x:.2f}x" if x < 10 else (f"{x:.1f}x" if x < 100 else f"{x:.0f}x")


def _fmt_bytes(n):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def format_table(results):
    """The results as a plain-text table (what the command prints)."""
    m = results["machine"]
    lines = [f"clipcore {m['clipcore']} bench on {m['cpu']}: {m['logical_cpus']} logical CPUs "
             f"({m['available_cpus']} available), {results['threads']} thread"
             f"{'s' if results['threads'] > 1 else ''} for everyone"
             f"{CONTEND_NOTE if results.get('contend') else ''}, "
             f"OpenMP {'on' if m['openmp'] else 'off'}, SIMD {m['simd']}",
             f"median of {results['repeat']} timed calls per row, each on data restored from "
             f"a backup (warm-up {results['warmup']}); numpy {m['numpy']}, python {m['python']}"]
    for fam in PEERS[1:]:
        f = results["families"].get(fam, {})
        if f.get("status") == "ok":
            lines[-1] += f", {fam} {f['version']}"
    other = m.get("other_load")
    load = (m.get("load_average") or [None])[0]
    if other is not None and other >= 0.2:
        lines.append(f"warning: other processes kept {other:.2f} CPUs busy during the run (of "
                     f"{m['available_cpus']}): they compete for the cores; timings may be off, "
                     f"threaded ones most")
    elif other is None and load is not None and load >= 1.0:
        lines.append(f"warning: the machine was busy before the run (load average {load:.2f} "
                     f"on {m['available_cpus']} CPUs): timings may be off")
    head = (f"  {'implementation':<15}{'call':<38}{'median':>10}{'GB/s':>8}{'% ceiling':>11}"
            "  speed-up of clipcore")
    ceiling_names = {"read": "one read pass", "rw": "one read-write pass",
                     "read+rw": "a read pass + a read-write pass"}
    for case in results["cases"]:
        lines += ["", f"{case['label']}: {case['tensors']} tensors, {case['values']:,} values "
                      f"({_fmt_bytes(case['bytes'])})", head]
        c = case["ceiling"]
        if c:
            lines.append(f"  {'ceiling':<15}{ceiling_names[c['kind']]:<38}"
                         f"{_fmt_time(c['best_s']):>10}{c['gbps']:>8.1f}{'100%':>11}")
        for impl, r in case["results"].items():
            if r["status"] != "ok":
                lines.append(f"  {impl:<15}{r['status']}"
                             + (f": {r['message'][:70]}" if r.get("message") else ""))
                continue
            pct = f"{r['pct_ceiling']:.0f}%" if r.get("pct_ceiling") is not None else ""
            row = (f"  {impl:<15}{r['call'][:37]:<38}{_fmt_time(r['median_s']):>10}"
                   f"{r['gbps']:>8.1f}{pct:>11}")
            ups = case["speedup"].get(impl)
            if ups:
                row += "  " + ", ".join(
                    _fmt_ratio(x) if name == "clipcore" else f"{name.split()[-1]} {_fmt_ratio(x)}"
                    for name, x in ups.items())
            lines.append(row)
    lines += ["", "GB/s: the bytes the operation must move at least (clipping: read for the "
                  "norm, read + write to scale) / median time.",
              "ceiling: the fastest bandwidth probe over as many bytes (2 x repeat with the "
              "run's threads, as many with one), each on freshly restored data, run before "
              "and after clipcore's calls.",
              "% ceiling: the ceiling's time / the row's time. speed-up: the row's time / "
              "clipcore's time (Plan: / the Plan's time).",
              "Each family ran in its own process, all with the same thread count."]
    return "\n".join(lines)


def write_chart(results, path):
    """Write a PNG: effective GB/s per case and implementation, the ceiling drawn.

    Needs matplotlib (raises ImportError without it).
    """
    if "matplotlib" in hidden():
        raise ImportError("matplotlib is hidden by " + HIDE_ENV)
    from matplotlib.figure import Figure

    impls = list(IMPL_FAMILY)
    colors = dict(zip(impls, ("#1f77b4", "#17becf", "#ff7f0e", "#d62728", "#2ca02c",
                              "#9467bd")))
    cases = results["cases"]
    fig = Figure(figsize=(10, 1.0 + 0.9 * len(cases)))
    ax = fig.add_subplot()
    bar_h = 0.8 / len(impls)
    for i, case in enumerate(cases):
        y0 = len(cases) - 1 - i
        for j, impl in enumerate(impls):
            r = case["results"].get(impl)
            if not r or r["status"] != "ok":
                continue
            y = y0 + 0.4 - (j + 0.5) * bar_h
            ax.barh(y, r["gbps"], height=bar_h, color=colors[impl],
                    label=impl if i == 0 or not ax.get_legend_handles_labels()[1].count(impl)
                    else None)
            ax.text(r["gbps"], y, " " + _fmt_time(r["median_s"]), va="center", fontsize=7)
        if case["ceiling"]:
            ax.vlines(case["ceiling"]["gbps"], y0 - 0.45, y0 + 0.45, colors="black",
                      linewidth=2, label="bandwidth ceiling" if i == 0 else None)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
    ax.set_yticks(range(len(cases)), [c["label"] for c in reversed(cases)])
    ax.set_xlabel("effective GB/s (bytes the operation must move / median time); "
                  "bar labels: median time")
    m = results["machine"]
    ax.set_title(f"clipcore {m['clipcore']} on {m['cpu']}, {results['threads']} threads, "
                 f"{m['simd'].split(' (')[0]}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_out_dir(path):
    """Create path if needed and make sure files can be written there; raises OSError."""
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
        pass


def default_out_dir():
    """The folder a run writes to without --out: bench-results-<date>-<time>."""
    return time.strftime("bench-results-%Y%m%d-%H%M%S")


CONTEND_NOTE = " while a busy process loads one core (--contend)"


class _Contention:
    """A busy process on one core while the bench runs (``--contend``): what a
    data-loader worker or another trainer does to a training step."""

    CODE = ("import os, time\n"
            "cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []\n"
            "if len(cpus) > 1: os.sched_setaffinity(0, cpus[-1:])\n"
            "end = time.monotonic() + 6 * 3600\n"
            "while time.monotonic() < end: pass\n")

    def __init__(self, on):
        self.on, self.proc = on, None

    def __enter__(self):
        if self.on:
            self.proc = subprocess.Popen([sys.executable, "-c", self.CODE])
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def main(*, cases, threads, repeat, warmup, out, quick, argv, stdout=None, one_thread=True,
         contend=False):
    """Run the bench, print the table, write results.json and chart.png; returns an exit code.

    With one_thread (and threads > 1) everything runs twice, at 1 thread and at
    ``threads``, each against its own ceiling; the JSON is the ``threads`` run's,
    with the 1-thread run under "one_thread". With contend, a busy process
    keeps one core loaded meanwhile.
    """
    stdout = stdout or sys.stdout
    counts = [1, threads] if one_thread and threads > 1 else [threads]
    with _Contention(contend):
        runs = [run(cases, threads=t, repeat=repeat, warmup=warmup, argv=argv, quick=quick)
                for t in counts]
    for r in runs:
        r["contend"] = contend
    results = runs[-1]
    if len(runs) > 1:
        results["one_thread"] = runs[0]
    table = "\n\n".join(format_table(r) for r in runs)
    print(table, file=stdout)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(table + "\n")
    print(f"\nresults: {os.path.join(out, 'results.json')}", file=stdout)
    if installed("matplotlib"):
        write_chart(results, os.path.join(out, "chart.png"))
        print(f"chart:   {os.path.join(out, 'chart.png')}", file=stdout)
    else:
        print("chart:   not written: matplotlib is not installed "
              "(pip install matplotlib, or clipcore[bench])", file=stdout)
    errors = [(case["label"], impl) for r_ in runs for case in r_["cases"]
              for impl, r in case["results"].items() if r["status"] == "error"]
    if errors:
        print(f"\n{len(errors)} measurement(s) failed: "
              + "; ".join(f"{impl} on {label}" for label, impl in errors), file=stdout)
        return 1
    return 0
