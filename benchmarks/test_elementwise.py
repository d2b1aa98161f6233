"""Issue 3's elementwise ops on 16M float32 values: the peers now; clipcore once it has them."""
import pytest

from clipcore import bench, kernels

CASES = [c for c in bench.CASES if c.workload == "elementwise"]
PARAMS = [(case, impl) for case in CASES
          for impl in ("ceiling", "clipcore", "numpy", "torch", "tensorflow")]


@pytest.mark.parametrize("case, impl", PARAMS, ids=[f"{c.key}-{i}" for c, i in PARAMS])
def test_elementwise(benchmark, suite, case, impl):
    data = suite.data(case.workload)
    if impl == "ceiling":
        benchmark.extra_info["what"] = "bandwidth_probe: one read pass + one read-write pass"
        suite.run(benchmark, case.key,
                  lambda: kernels.bandwidth_probe(data.flat, suite.threads), data)
        return
    found = suite.calls(bench.IMPL_FAMILY[impl], case.op, data)
    if impl not in found:
        pytest.skip(f"{impl} has no {case.op}" + (" yet (issue 3)" if impl == "clipcore" else ""))
    suite.run(benchmark, case.key, found[impl], data)
    data.restore()
    bench.verify(case.op, data, found[impl]())
