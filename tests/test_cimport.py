"""The C-level API: another Cython extension does `from clipcore cimport kernels`.

The extension below is built with cythonize + setuptools in a temporary
directory, against clipcore.get_include(), once against the clipcore being
tested and once against a wheel built from this source tree (what `pip
install` would put in site-packages), then imported and checked against NumPy.
"""
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import clipcore

USER_PYX = r'''
# cython: language_level=3, boundscheck=False, wraparound=False
from libc.stdlib cimport malloc, calloc, free
from clipcore cimport kernels


cdef class Pointers:
    """Pointers and lengths of a list of 1-d float32 arrays (kept alive)."""
    cdef float **ptrs
    cdef Py_ssize_t *lengths
    cdef Py_ssize_t count
    cdef list keep

    def __cinit__(self, list arrays):
        cdef float[::1] mv
        cdef Py_ssize_t i
        self.count = len(arrays)
        self.keep = arrays
        self.ptrs = <float **>malloc((self.count + 1) * sizeof(float *))
        self.lengths = <Py_ssize_t *>malloc((self.count + 1) * sizeof(Py_ssize_t))
        for i in range(self.count):
            mv = arrays[i]
            self.lengths[i] = mv.shape[0]
            self.ptrs[i] = &mv[0] if mv.shape[0] else NULL

    def __dealloc__(self):
        free(self.ptrs)
        free(self.lengths)


def norm(list arrays, double norm_type, int n_threads=0):
    cdef Pointers p = Pointers(arrays)
    cdef double out
    with nogil:
        out = kernels.norm_f32(p.ptrs, p.lengths, p.count, norm_type, n_threads)
    return out


def scale(list arrays, float s, int n_threads=0):
    cdef Pointers p = Pointers(arrays)
    with nogil:
        kernels.scale_f32(p.ptrs, p.lengths, p.count, s, n_threads)


def clip_value(list arrays, float lo, float hi, int n_threads=0):
    cdef Pointers p = Pointers(arrays)
    cdef int status
    with nogil:
        status = kernels.clip_value_f32(p.ptrs, p.lengths, p.count, lo, hi, n_threads)
    return status


def strided_norm(float[:] x, double norm_type):
    """One strided float32 run through the Segment/Layout structs."""
    cdef kernels.Segment seg
    cdef kernels.Layout lay
    cdef Py_ssize_t start = 0
    seg.data = <char *>&x[0]
    seg.n = x.shape[0]
    seg.stride = x.strides[0] // sizeof(float)
    seg.kind = kernels.SEG_F32
    lay.segs = &seg
    lay.starts = &start
    lay.n_segs = 1
    lay.n_total = seg.n
    return kernels.layout_norm(&lay, norm_type, 1)


def kinds():
    """Enums of the .pxd, compiled into this extension (no C header needed)."""
    return kernels.SEG_F32, kernels.SEG_F64


cdef void count_item(const void *ctx, Py_ssize_t i) noexcept nogil:
    (<int *>ctx)[i] += 1


def run_counts(Py_ssize_t n_items, int n_threads):
    """How many times kernels.run_items ran each item."""
    cdef int *counts = <int *>calloc(n_items + 1, sizeof(int))
    if counts == NULL:
        raise MemoryError()
    with nogil:
        kernels.run_items(n_items, count_item, counts, n_threads)
    try:
        return [counts[i] for i in range(n_items)]
    finally:
        free(counts)
'''

SETUP_PY = r'''
import clipcore
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    name="clipcore_user",
    ext_modules=cythonize([Extension("clipcore_user", ["clipcore_user.pyx"],
                                     include_dirs=[clipcore.get_include()])]),
    script_args=["build_ext", "--inplace", "--build-temp", "build"],
)
'''

CHECK_PY = r'''
import math, sys
import numpy as np
import clipcore, clipcore_user as u

assert clipcore.__file__.startswith(sys.argv[1]), (clipcore.__file__, sys.argv[1])
rng = np.random.default_rng(0)
arrays = [rng.standard_normal(n).astype(np.float32) for n in (200_000, 0, 17, 5000)]
ref = np.concatenate(arrays).astype(np.float64)
for p in (2.0, 1.0, math.inf, 3.0):
    want = clipcore.global_norm(arrays, norm_type=p)
    for nt in (1, 2):
        assert u.norm(arrays, p, nt) == want, (p, nt)
assert abs(u.norm(arrays, 2.0) - np.sqrt((ref * ref).sum())) < 1e-9 * np.sqrt((ref * ref).sum())
u.scale(arrays, 0.5)
assert np.array_equal(np.concatenate(arrays), (ref * 0.5).astype(np.float32))
assert u.clip_value(arrays, -0.25, 0.25) == 0
assert np.array_equal(np.concatenate(arrays), np.clip(ref * 0.5, -0.25, 0.25).astype(np.float32))
x = np.arange(10, dtype=np.float32)[::-3]
assert u.strided_norm(x, 2.0) == math.sqrt(float((x.astype(np.float64) ** 2).sum()))
assert u.kinds() == (0, 1)
for n_items in (0, 1, 2, 1000):
    for nt in (1, 2, 3):
        assert u.run_counts(n_items, nt) == [1] * n_items, (n_items, nt)
print("ok", clipcore.__file__)
'''


def build_and_check(tmp, pythonpath):
    """Build the user extension against the clipcore found on pythonpath, then run checks."""
    work = tmp / "user"
    work.mkdir()
    (work / "clipcore_user.pyx").write_text(USER_PYX)
    (work / "setup.py").write_text(SETUP_PY)
    (work / "check.py").write_text(CHECK_PY)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath))
    build = subprocess.run([sys.executable, "setup.py"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    env["PYTHONPATH"] = os.pathsep.join(pythonpath + [str(work)])
    run = subprocess.run([sys.executable, "check.py", pythonpath[0]], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.startswith("ok")
    return work


def test_the_public_pxd_is_in_the_package_and_needs_no_header():
    inc = Path(clipcore.get_include())
    assert inc == Path(clipcore.__file__).parent
    pxd = (inc / "kernels.pxd").read_text()
    assert "clip_value_f32" in pxd and "cdef extern" not in pxd
    assert not list(inc.glob("*.h"))       # the C headers stay private, in src/


@pytest.mark.requires_cython
def test_cimport_against_this_clipcore(tmp_path):
    root = str(Path(clipcore.__file__).parent.parent)
    build_and_check(tmp_path, [root])


@pytest.mark.requires_cython
def test_cimport_from_clipcore_in_the_same_process(tmp_path):
    # The extension and the tests share one clipcore.kernels module.
    root = str(Path(clipcore.__file__).parent.parent)
    work = build_and_check(tmp_path, [root])
    so = next(work.glob("clipcore_user*.so"), None) or next(work.glob("clipcore_user*.pyd"))
    spec = importlib.util.spec_from_file_location("clipcore_user", so)
    u = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(u)
    a = [np.array([3.0, -4.0, np.nan], np.float32)]
    assert math.isnan(u.norm(a, 2.0))
    a = [np.array([3.0, -4.0, 12.0], np.float32)]
    assert u.norm(a, 2.0) == 13.0 and u.norm(a, math.inf) == 12.0
    assert u.clip_value(a, 1.0, -1.0) == 0 and a[0].tolist() == [-1.0] * 3   # torch's order
    a = [np.array([3.0, -4.0], np.float32)]
    assert u.clip_value(a, math.nan, 1.0) == 0 and np.isnan(a[0]).all()


def _source_root():
    root = Path(clipcore.__file__).parent.parent
    return root if (root / "setup.py").is_file() and (root / "src").is_dir() else None


@pytest.mark.requires_cython
@pytest.mark.skipif(_source_root() is None,
                    reason="clipcore is installed, not a source tree: the test above "
                           "already ran against the installed package")
def test_cimport_against_a_built_wheel(tmp_path):
    """The wheel carries kernels.pxd (no header); a user extension builds against it."""
    root = _source_root()
    src = tmp_path / "src_tree"
    ignore = shutil.ignore_patterns("*.so", "*.pyd", "*.c", "build", "dist", "*.egg-info",
                                    "__pycache__", ".git", "tests", "benchmarks", "examples")
    shutil.copytree(root, src, ignore=ignore)
    out = tmp_path / "wheel"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(out), str(src)],
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next(out.glob("clipcore-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "clipcore/kernels.pxd" in names, sorted(names)
        assert not [n for n in names if n.endswith(".h")], sorted(names)
        zf.extractall(site)
    build_and_check(tmp_path, [str(site)])
