"""Thread scaling on a list that stays in cache: issue 2's target is >= 1.7x for 2 threads vs 1."""
import pytest

from clipcore import bench, clip_by_global_norm_

# 8 MB: 32 tensors of 65,536 float32 values; with its backup copy it fits in L3.
SPEC = tuple((f"t{i}", (65536,)) for i in range(32))


@pytest.fixture(scope="module")
def data():
    return bench.Data(SPEC, seed=0)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_threads_8mb_in_cache(benchmark, suite, data, n_threads):
    c = data.params["clip"]["clip_norm"]
    benchmark.extra_info["n_threads"] = n_threads
    suite.run(benchmark, "threads-8MB",
              lambda: clip_by_global_norm_(data.arrays, c, n_threads=n_threads), data, rounds=50)
    data.restore()
    clip_by_global_norm_(data.arrays, c, n_threads=n_threads)
    bench.verify("clip", data, None)
