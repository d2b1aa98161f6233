"""Global-norm clipping on the core workloads: clipcore (list, Plan) against its peers.

Issue 2's targets, read from the groups' side-by-side tables: 2000x512 >= 10x
NumPy (list) and >= 25x (Plan); MNIST MLP >= 2.5x NumPy; ResNet-50 and GPT-2
>= 92% of the ceiling (the ``ceiling`` row: one read pass + one read-write
pass over the same bytes; compare its Min with the others' Median) and ahead
of NumPy and torch; GPT-2 with no clipping needed >= 1.8x torch.
"""
import pytest

from clipcore import bench

IMPLS = ("clipcore", "clipcore Plan", "numpy", "torch", "tensorflow")
CASES = [c for c in bench.CASES if c.op in ("clip", "noclip")]
PARAMS = [(case, impl) for case in CASES
          for impl in (("ceiling",) if case.op == "clip" else ()) + IMPLS]


@pytest.mark.parametrize("case, impl", PARAMS,
                         ids=[f"{c.key}-{i.replace(' ', '-')}" for c, i in PARAMS])
def test_clip_by_global_norm(benchmark, suite, case, impl):
    data = suite.data(case.workload)
    if impl == "ceiling":
        return suite.ceiling(benchmark, case, data)
    # check afterwards that the timed calls clipped for real
    suite.run_checked(benchmark, case, suite.call(impl, case.op, data), data)
