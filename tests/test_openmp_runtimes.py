"""OpenMP runtimes in one process with PyTorch, and who controls clipcore's threads.

A source build links the system's ``libgomp.so.1``; torch's wheel brings its
own ``torch/lib/libgomp.so.1``. Both have the soname ``libgomp.so.1``, so the
dynamic loader keeps whichever comes first and the process has one GNU OpenMP
runtime. A wheel repaired by auditwheel vendors libgomp under a new name
(``clipcore.libs/libgomp-<hash>.so...``, as scikit-learn's wheels do), so beside
torch the process has two: clipcore's kernels run on one thread pool, torch's
ops on the other. What still holds either way, and is checked here:

- ``threadpoolctl.threadpool_limits(n)`` limits every runtime it finds, so
  inside the block clipcore's kernels use at most n threads, torch loaded or not;
- ``clipcore.torch`` takes its thread count from ``torch.get_num_threads()``,
  not from its own runtime, so ``torch.set_num_threads`` governs it;
- there are as many libgomp copies as this build of clipcore implies: one
  (shared with torch), or two when clipcore's wheel vendors its own.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
threadpoolctl = pytest.importorskip("threadpoolctl")

import clipcore  # noqa: E402
import clipcore.torch  # noqa: E402,F401
from clipcore import kernels  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.openmp_enabled(),
                                reason="a serial build has no OpenMP runtime")

BIG = 4_000_000          # elements: far above every threshold for going parallel


def vendored_libgomp():
    """The libgomp this clipcore's wheel brought (auditwheel's clipcore.libs/), or None."""
    libs = os.path.join(os.path.dirname(os.path.dirname(clipcore.__file__)), "clipcore.libs")
    if not os.path.isdir(libs):
        return None
    found = [name for name in os.listdir(libs) if name.startswith("libgomp")]
    return os.path.join(libs, found[0]) if found else None


def gomp_runtimes():
    return [i for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "openmp" and i["prefix"] == "libgomp"]


def run_both():
    """One parallel op of each library, so that both runtimes have started their pools."""
    grads = [np.ones(BIG // 2, np.float32), np.ones(BIG // 2, np.float32)]
    clipcore.global_norm(grads, n_threads=2)
    t = torch.ones(BIG)
    (t * 2).sum()


def test_libgomp_copies_as_documented():
    run_both()
    gomps = gomp_runtimes()
    vendored = vendored_libgomp()
    paths = sorted(os.path.realpath(i["filepath"]) for i in gomps)
    if vendored is None:          # a source build: one runtime, shared with torch
        assert len(gomps) == 1, paths
    else:                         # the repaired wheel: its own copy beside torch's
        assert len(gomps) == 2, paths
        assert os.path.realpath(vendored) in paths


def test_threadpool_limits_limit_clipcore_with_torch_loaded():
    run_both()
    with threadpoolctl.threadpool_limits(1):
        assert kernels.max_threads() == 1
        assert kernels.threads_for(BIG) == 1
        # clipcore.torch's count is torch's, which the same block limits.
        assert torch.get_num_threads() == 1
        assert kernels.threads_for(BIG, -torch.get_num_threads()) == 1
        params = [torch.nn.Parameter(torch.ones(BIG // 2)) for _ in range(2)]
        for p in params:
            p.grad = torch.full_like(p, 3.0)
        norm = clipcore.torch.clip_grad_norm_(params, 1.0)
        assert float(norm) == pytest.approx(3.0 * BIG ** 0.5)
    with threadpoolctl.threadpool_limits(2):
        assert kernels.max_threads() == 2


def test_torch_set_num_threads_governs_clipcore_torch():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert kernels.threads_for(BIG, -torch.get_num_threads()) == 1
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_reaches_both_runtimes():
    code = ("import torch, clipcore, clipcore.torch; from clipcore import kernels; "
            "print(kernels.max_threads(), torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "1"]
