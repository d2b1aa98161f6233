"""The elementwise ops on 16M float32 values: clipcore against its peers, with the ceiling.

The same cases as ``python -m clipcore bench``; benchmarks/test_bench_ops.py
adds the ``out=``, allocating and one-thread forms.
"""
import pytest

from clipcore import bench

CASES = [c for c in bench.CASES if c.workload == "elementwise"]
PARAMS = [(case, impl) for case in CASES
          for impl in ("ceiling", "clipcore", "numpy", "torch", "tensorflow")]


@pytest.mark.parametrize("case, impl", PARAMS, ids=[f"{c.key}-{i}" for c, i in PARAMS])
def test_elementwise(benchmark, suite, case, impl):
    data = suite.data(case.workload)
    if impl == "ceiling":
        return suite.ceiling(benchmark, case, data)
    suite.run_checked(benchmark, case, suite.call(impl, case.op, data), data)
