"""Build clipcore's Cython extensions, with OpenMP when the compiler has it.

Environment switches (read at build time):
  CLIPCORE_REQUIRE_OPENMP=1  fail the build instead of building serial
  CLIPCORE_DISABLE_OPENMP=1  build serial on purpose
  CLIPCORE_NATIVE=1          tune for this machine (-march=native); not portable
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

NATIVE_DIR = os.path.join("src", "clipcore")
# Installed with the package so other Cython code can cimport the kernels.
PUBLIC_NATIVE_FILES = ["kernels.pxd", "cc_loops.h"]
MODULES = ["kernels", "_lists", "_elementwise", "_global", "_torch", "_weighted"]

# The one place for Cython directives.
CYTHON_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": False,
    "embedsignature": True,
}

OPENMP_PROBE = textwrap.dedent(r"""
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\n", n);
        return n < 1;
    }
""")


def openmp_flags(compiler):
    """Compile and link flags for OpenMP with this compiler."""
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":  # Apple clang: libomp from Homebrew or conda
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def compiler_can_run_openmp(compiler, cflags, ldflags):
    """Compile, link and run a tiny OpenMP program."""
    tmp = tempfile.mkdtemp(prefix="clipcore-openmp-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
        exe = os.path.join(tmp, "probe")
        compiler.link_executable(objs, "probe", output_dir=tmp, extra_postargs=ldflags)
        out = subprocess.run([exe], capture_output=True, text=True, timeout=60)
        return out.returncode == 0 and int(out.stdout.strip() or 0) >= 1
    except Exception:  # any failure means: no usable OpenMP
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    def build_extensions(self):
        unix = self.compiler.compiler_type != "msvc"
        cflags = ["-O3"] if unix else ["/O2"]
        ldflags = []
        if os.environ.get("CLIPCORE_NATIVE") == "1":
            cflags += ["-march=native", "-DCLIPCORE_NATIVE"]
        omp_c, omp_l = openmp_flags(self.compiler)
        if os.environ.get("CLIPCORE_DISABLE_OPENMP") == "1":
            warnings.warn("clipcore: CLIPCORE_DISABLE_OPENMP=1, building without OpenMP")
        elif compiler_can_run_openmp(self.compiler, omp_c, omp_l):
            cflags += omp_c
            ldflags += omp_l
        elif os.environ.get("CLIPCORE_REQUIRE_OPENMP") == "1":
            raise RuntimeError("clipcore: the compiler cannot build and run an OpenMP "
                               "program, and CLIPCORE_REQUIRE_OPENMP=1 is set")
        else:
            warnings.warn("clipcore: the compiler cannot build and run an OpenMP program; "
                          "building a serial extension (correct, but single-threaded)")
        for ext in self.extensions:
            ext.extra_compile_args = cflags + ext.extra_compile_args
            ext.extra_link_args = ldflags + ext.extra_link_args
        super().build_extensions()

    def copy_extensions_to_source(self):
        # build_ext --inplace, a development tree: make `from clipcore cimport kernels` work.
        super().copy_extensions_to_source()
        for name in PUBLIC_NATIVE_FILES:
            shutil.copyfile(os.path.join(NATIVE_DIR, name), os.path.join("clipcore", name))


class BuildPy(build_py):
    """Install the public .pxd and header beside the package's Python files."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "clipcore")
        self.mkpath(dest)
        for name in PUBLIC_NATIVE_FILES:
            self.copy_file(os.path.join(NATIVE_DIR, name), os.path.join(dest, name))


extensions = [
    Extension(f"clipcore.{name}", [os.path.join(NATIVE_DIR, f"{name}.pyx")],
              include_dirs=[NATIVE_DIR, np.get_include()],
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")])
    for name in MODULES
]

# An in-place build leaves copies of these in clipcore/ (see BuildExt), where
# Cython finds them before src/: refresh them first, so it never reads a stale one.
for name in PUBLIC_NATIVE_FILES:
    if os.path.exists(os.path.join("clipcore", name)):
        shutil.copyfile(os.path.join(NATIVE_DIR, name), os.path.join("clipcore", name))

setup(
    ext_modules=cythonize(extensions, include_path=["src"],
                          compiler_directives=CYTHON_DIRECTIVES),
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
