"""The global-norm workloads on one thread: clipcore against NumPy and the plain loops.

Issue 13's 1-thread targets, read from each ``<case>-1-thread`` group: the
clip (list and Plan) >= 0.95 of the ceiling rows' Min (a read pass + a
read-write pass over the same bytes, with the plain loops and with the
variant clipcore runs with here; the faster counts) and >= 0.97x NumPy at
one thread (a tie: NumPy runs at the plain loops' speed).
"""
import pytest

import clipcore
from clipcore import bench, kernels
from clipcore.bench._probe import bandwidth_probe

threadpoolctl = pytest.importorskip("threadpoolctl")

CASES = [c for c in bench.CASES if c.op in ("clip", "noclip")]
IMPLS = ("ceiling plain", "ceiling tuned", "clipcore", "clipcore Plan", "numpy")
PARAMS = [(case, impl) for case in CASES for impl in IMPLS
          if case.op == "clip" or not impl.startswith("ceiling")]


@pytest.fixture
def tuning():
    saved = kernels.get_tuning()
    yield
    kernels.set_tuning(**saved)


@pytest.mark.parametrize("case, impl", PARAMS,
                         ids=[f"{c.key}-{i.replace(' ', '-')}" for c, i in PARAMS])
def test_one_thread(benchmark, suite, tuning, case, impl):
    data = suite.data(case.workload)
    group = f"{case.key}-1-thread"
    if impl.startswith("ceiling"):
        if impl == "ceiling plain":
            kernels.set_tuning(prefetch=False, scale_backward=False)
        benchmark.extra_info["what"] = f"bandwidth_probe, 1 thread, {impl.split()[1]} loops"
        return suite.run(benchmark, group, lambda: bandwidth_probe(data.work, 1), data)
    c = data.params[case.op]["clip_norm"]
    if impl == "numpy":
        with threadpoolctl.threadpool_limits(1):
            suite.run(benchmark, group,
                      lambda: bench.numpy_clip_by_global_norm_(data.arrays, c), data)
        return
    if impl == "clipcore":
        call = lambda: clipcore.clip_by_global_norm_(data.arrays, c, n_threads=1)  # noqa: E731
    else:
        call = lambda: plan.clip_by_global_norm_(c)  # noqa: E731
        plan = clipcore.Plan(data.arrays, n_threads=1)
    suite.run(benchmark, group, call, data)
    data.restore()
    call()
    bench.verify(case.op, data, None)
