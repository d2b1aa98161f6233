"""``python -m clipcore bench``: clipcore against what people use now, on this machine.

Every case (:mod:`clipcore.bench.cases`) clips real parameter lists (see
:mod:`clipcore.workloads`) with every implementation
(:mod:`clipcore.bench.impls`): clipcore (a list, a ``Plan``), NumPy always,
PyTorch, TensorFlow and JAX (optax) when they are installed, and the
bandwidth ceiling: the bandwidth probe (:mod:`clipcore.bench._probe`) over as
many bytes as the case's data. Each family runs in a long-lived worker
process of its own (:mod:`clipcore.bench.worker`) with the same thread count
(``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``torch.set_num_threads``,
TensorFlow's intra/inter-op threads, JAX's CPU affinity), so no family's
thread pool spins while another is measured. The runner
(:mod:`clipcore.bench.runner`) measures in rounds: in each round every
implementation makes a few timed calls of the same case in turn, so the
speed-ups and ``% ceiling``, computed within each round, do not move with
the machine's bandwidth between rounds. :mod:`clipcore.bench.report` prints
the table and writes the files.

Every timed call works on fresh data: the inputs are restored from a backup
copy before each call, outside the timed region, for every implementation
alike, so clipping really happens on every repeat. After each round the
output of its last call is checked (the clipped norm, the clipped values),
so a fast wrong answer shows as an error, not as a win.

Results JSON (``results.json``), schema ``clipcore-bench/3``::

    {"schema": "clipcore-bench/3", "created": ISO time, "argv": [...],
     "quick": bool, "repeat": int, "warmup": int (calls before a row's first round),
     "rounds": [timed calls per row in each round], "threads": int,
     "machine": {"cpu", "logical_cpus", "available_cpus", "threads",
                 "simd", "openmp", "platform", "python", "numpy", "clipcore",
                 "load_average": [before the run, after it] (1-minute, or null),
                 "other_load": CPUs' worth of time other processes used during
                               the run (Linux; null elsewhere)},
     "families": {family: {"status": "ok" | "not installed" | "error",
                           "version": str | null, "threads": int | null,
                           "seconds": wall time of its process (absent if not run),
                           "message": why it failed (only with "error")}},
     "cases": [{"key", "label", "workload", "op", "tensors", "values", "bytes",
                "traffic_bytes", "params": {...},
                "ceiling": {"status", "kind": "read" | "rw" | "read+rw", "call",
                            "best_s", "gbps", "times_s", "rounds_s", "per_round_s",
                            "min_s", "max_s", "message"},
                "results": {impl: {"family", "call", "status", "median_s", "min_s",
                                   "max_s", "times_s", "rounds_s", "per_round_s",
                                   "gbps", "pct_ceiling": ratio | null, "message"}},
                "speedup": {peer: {clipcore impl: ratio of peer time / its time}}}]}

``times_s`` holds every timed call (the ceiling: each probe's median over a
round's calls), ``rounds_s`` the same per round, ``per_round_s`` what each
round counts as (the median of its calls; the ceiling's fastest probe). A ratio is ``{"median", "min",
"max", "rounds": [the ratio of each round's per_round_s]}``.

A default run (no ``--threads``) on a machine with more than one thread runs
everything twice, at one thread and at all threads: the JSON above is the
all-threads run, with the 1-thread run, of the same schema, under
``"one_thread"``. ``"contend"`` is true when a busy process loaded one core
meanwhile (``--contend``).

``status`` is "ok", "not installed", "no equivalent" (the peer has no such
op) or "error" (with ``message``); only "ok" results carry times.
"""
from clipcore.bench.cases import CASES, DATA, OPS, Case, Data, select_cases, verify
from clipcore.bench.impls import (FAMILIES, HIDE_ENV, IMPL_FAMILY, IMPLS, installed, make_call,
                                  measure, numpy_clip_by_global_norm_)
from clipcore.bench.report import check_out_dir, default_out_dir, format_table, main
from clipcore.bench.runner import SCHEMA, assemble, rounds_of, run

__all__ = ["CASES", "DATA", "OPS", "Case", "Data", "select_cases", "verify", "FAMILIES",
           "HIDE_ENV", "IMPL_FAMILY", "IMPLS", "installed", "make_call", "measure",
           "numpy_clip_by_global_norm_", "check_out_dir", "default_out_dir", "format_table",
           "main", "SCHEMA", "assemble", "rounds_of", "run"]
