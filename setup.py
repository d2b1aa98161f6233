"""Build clipcore's Cython extensions, with OpenMP when the compiler has it.

Environment switches (read at build time):
  CLIPCORE_REQUIRE_OPENMP=1  fail the build instead of building serial
  CLIPCORE_DISABLE_OPENMP=1  build serial on purpose
  CLIPCORE_NATIVE=1          tune for this machine (-march=native); not portable
"""
import glob
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

# The private sources (.pyx, their .pxd, the C headers) are in src/clipcore;
# the public clipcore/kernels.pxd is in the package itself, installed with it.
NATIVE_DIR = os.path.join("src", "clipcore")
# Extension module -> its source in NATIVE_DIR.
MODULES = {name: name for name in ("kernels", "_lists", "_elementwise", "_global", "_torch",
                                   "_weighted", "_unitwise")}
MODULES["bench._probe"] = "_probe"      # the benchmarks' bandwidth probe

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


# The C headers include one another, beyond what Cython tracks: a change to
# any of them rebuilds every extension.
HEADERS = sorted(glob.glob(os.path.join(NATIVE_DIR, "cc_*.h")))

extensions = [
    Extension(f"clipcore.{name}", [os.path.join(NATIVE_DIR, f"{source}.pyx")],
              include_dirs=[NATIVE_DIR, np.get_include()], depends=HEADERS,
              define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")])
    for name, source in MODULES.items()
]

setup(
    ext_modules=cythonize(extensions, include_path=["src", "."],
                          compiler_directives=CYTHON_DIRECTIVES),
    cmdclass={"build_ext": BuildExt},
)
