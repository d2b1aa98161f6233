"""Shared set-up of the pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

The suite measures the same implementations as ``python -m clipcore bench``
(it reuses clipcore.bench's data, calls and checks), grouped per workload so
pytest-benchmark's table compares them side by side. Unlike the CLI it runs
everything in one process, one implementation after the other; each peer's
thread count is set explicitly (``torch.set_num_threads``, TensorFlow's
intra/inter-op threads, clipcore's ``n_threads``;
``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` for BLAS), and a family's thread
pool may still be spinning down while the next one runs: for comparable
figures use the CLI, which runs each family in its own process and takes
every ratio within a round of interleaved calls.

Environment: ``CLIPCORE_BENCH_THREADS`` (default: what OpenMP may use),
``CLIPCORE_BENCH_ROUNDS`` (timed calls per benchmark, default 10).
"""
import os

import pytest

from clipcore import bench, kernels
from clipcore.bench._probe import bandwidth_probe

THREADS = int(os.environ.get("CLIPCORE_BENCH_THREADS") or kernels.max_threads())
ROUNDS = int(os.environ.get("CLIPCORE_BENCH_ROUNDS") or 10)



class Suite:
    """What every benchmark module uses (the ``suite`` fixture)."""

    threads = THREADS
    rounds = ROUNDS

    def __init__(self):
        self._cache = {}

    def data(self, workload):
        """The workload's bench.Data; one workload is kept at a time (GPT-2: 1 GB)."""
        if workload not in self._cache:
            self._cache.clear()
            self._cache[workload] = bench.Data(workload, seed=0, n_threads=THREADS)
        return self._cache[workload]

    call = staticmethod(lambda impl, op, data: _call(impl, op, data))
    run = staticmethod(lambda benchmark, group, call, data, rounds=ROUNDS:
                       _run(benchmark, group, call, data, rounds))

    def ceiling(self, benchmark, case, data):
        """The case's ceiling row: one read pass + one read-write pass over its bytes."""
        benchmark.extra_info["what"] = "bandwidth_probe: one read pass + one read-write pass"
        _run(benchmark, case.key, lambda: bandwidth_probe(data.work, THREADS), data,
             self.rounds)

    def run_checked(self, benchmark, case, call, data):
        """Time call in the case's group, then check that a call does the case's op."""
        _run(benchmark, case.key, call, data, self.rounds)
        data.restore()
        bench.verify(case.op, data, call())


@pytest.fixture(scope="session")
def suite():
    return Suite()


def _call(impl, op, data):
    """impl's call for op with its family's threads set; skips if not installed or no such op."""
    family = bench.IMPL_FAMILY[impl]
    if family == "torch":
        torch = pytest.importorskip("torch")
        torch.set_num_threads(THREADS)
    elif family == "tensorflow":
        tf = pytest.importorskip("tensorflow")
        try:
            tf.config.threading.set_intra_op_parallelism_threads(THREADS)
            tf.config.threading.set_inter_op_parallelism_threads(THREADS)
        except RuntimeError:    # TensorFlow already running: its threads are set
            pass
    call = bench.make_call(impl, op, data)
    if call is None:
        pytest.skip(f"{impl} has no {op}")
    return call


def _run(benchmark, group, call, data, rounds):
    """Time call on freshly restored data each round; returns the last output."""
    benchmark.group = group
    benchmark.extra_info.update(threads=THREADS, values=int(data.flat.size))
    return benchmark.pedantic(call, setup=data.restore, rounds=rounds, warmup_rounds=1,
                              iterations=1)
