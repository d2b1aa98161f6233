"""What calling the kernels through `from clipcore cimport kernels` costs over the kernel itself.

    pytest benchmarks/test_bench_cimport.py --benchmark-only
    python benchmarks/test_bench_cimport.py            # per-call table

A tiny Cython extension (built into a temporary directory) times, in a nogil
loop, (a) the C inner loops (cc_reduce.h, cc_scale.h) called directly: the kernel
itself, (b) kernels.norm_f32 / scale_f32 through the .pxd: the C-level API,
(c) kernels.layout_norm on a prebuilt Layout. The difference (b) - (a) is the
API's overhead per call (function pointer, layout set-up, chunk loop).
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

import numpy as np
import pytest

import clipcore


TIMER_PYX = r'''
# cython: language_level=3, boundscheck=False, wraparound=False
from libc.math cimport sqrt
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from clipcore cimport kernels

cdef extern from "cc_reduce.h" nogil:
    int CC_SUMSQ
    double cc_reduce_one_f32(const float *x, Py_ssize_t n, Py_ssize_t stride, int kind,
                             double p, double scale)

cdef extern from "cc_scale.h" nogil:
    void cc_scale_f32(float *x, Py_ssize_t n, Py_ssize_t stride, double s)

cdef double now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9

def per_call_ns(float[::1] x, long reps, str which):
    """Nanoseconds per call, over reps calls in a nogil loop."""
    cdef float *ptr = &x[0]
    cdef Py_ssize_t n = x.shape[0], start = 0
    cdef double t0, t1, sink = 0.0
    cdef long r
    cdef int w = ["direct_norm", "pxd_norm_f32", "pxd_layout_norm",
                  "direct_scale", "pxd_scale_f32"].index(which)
    cdef kernels.Segment seg
    cdef kernels.Layout lay
    seg.data = <char *>ptr
    seg.n = n
    seg.stride = 1
    seg.kind = kernels.SEG_F32
    lay.segs = &seg
    lay.starts = &start
    lay.n_segs = 1
    lay.n_total = n
    with nogil:
        t0 = now()
        for r in range(reps):
            if w == 0:
                sink += sqrt(cc_reduce_one_f32(ptr, n, 1, CC_SUMSQ, 2.0, 1.0))
            elif w == 1:
                sink += kernels.norm_f32(&ptr, &n, 1, 2.0, 1)
            elif w == 2:
                sink += kernels.layout_norm(&lay, 2.0, 1)
            elif w == 3:
                cc_scale_f32(ptr, n, 1, 1.0)
            else:
                kernels.scale_f32(&ptr, &n, 1, 1.0, 1)
        t1 = now()
    if sink < 0:
        raise AssertionError
    return (t1 - t0) / reps * 1e9
'''

SETUP_PY = r'''
import os
import sys
import clipcore
from Cython.Build import cythonize
from setuptools import Extension, setup
# The flags clipcore's own build uses, so that the inner loop compiles alike;
# the inner loop's header is private, in the source tree's src/clipcore.
flags = [] if sys.platform == "win32" else ["-O3"]
private = os.path.join(os.path.dirname(os.path.dirname(clipcore.__file__)), "src", "clipcore")
setup(name="clipcore_timer",
      ext_modules=cythonize([Extension("clipcore_timer", ["clipcore_timer.pyx"],
                                       include_dirs=[private],
                                       extra_compile_args=flags)]),
      script_args=["build_ext", "--inplace", "--build-temp", "build"])
'''

SIZES = [16, 1024, 16384]
WHICH = ["direct_norm", "pxd_norm_f32", "pxd_layout_norm", "direct_scale", "pxd_scale_f32"]


def build_timer(work):
    work = Path(work)
    (work / "clipcore_timer.pyx").write_text(TIMER_PYX)
    (work / "setup.py").write_text(SETUP_PY)
    root = str(Path(clipcore.__file__).parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "setup.py"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
    so = next(p for p in work.iterdir() if p.name.startswith("clipcore_timer.")
              and p.suffix in (".so", ".pyd"))
    spec = importlib.util.spec_from_file_location("clipcore_timer", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def timer(tmp_path_factory):
    return build_timer(tmp_path_factory.mktemp("timer"))


def reps_for(n):
    return max(2000, 4_000_000 // n)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("which", WHICH)
def test_cimport_call(benchmark, timer, which, n):
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    reps = reps_for(n)
    benchmark.group = f"cimport n={n}"
    benchmark.extra_info.update(which=which, n=n, reps_per_round=reps)
    ns = benchmark.pedantic(timer.per_call_ns, args=(x, reps, which), rounds=7, iterations=1)
    benchmark.extra_info["ns_per_call_last_round"] = ns


def table(timer, repeat=7):
    rows = []
    for n in SIZES:
        x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        t = {w: sorted(timer.per_call_ns(x, reps_for(n), w) for _ in range(repeat))[repeat // 2]
             for w in WHICH}
        py = min(timeit.repeat(lambda: clipcore.global_norm([x], n_threads=1),
                               number=2000, repeat=5)) / 2000 * 1e9
        plan = clipcore.Plan([x], n_threads=1)
        py_plan = min(timeit.repeat(plan.global_norm, number=2000, repeat=5)) / 2000 * 1e9
        rows.append((n, t, py, py_plan))
    return rows


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        timer = build_timer(work)
        print("ns per call (median); overhead = through the pxd minus the inner loop itself")
        print(f"{'n':>6} {'loop norm':>10} {'norm_f32':>9} {'layout_norm':>12} {'overhead':>9}"
              f" {'loop scale':>11} {'scale_f32':>10} {'overhead':>9}"
              f" {'py global_norm':>15} {'py Plan':>8}")
        for n, t, py, py_plan in table(timer):
            print(f"{n:6d} {t['direct_norm']:10.1f} {t['pxd_norm_f32']:9.1f}"
                  f" {t['pxd_layout_norm']:12.1f}"
                  f" {t['pxd_norm_f32'] - t['direct_norm']:9.1f} {t['direct_scale']:11.1f}"
                  f" {t['pxd_scale_f32']:10.1f} {t['pxd_scale_f32'] - t['direct_scale']:9.1f}"
                  f" {py:15.1f} {py_plan:8.1f}")


if __name__ == "__main__":
    main()
