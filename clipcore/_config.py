"""What this build of clipcore does on this machine."""
import sys

import numpy as np

from clipcore import _tuning, kernels


def config():
    """Build and run-time facts as a dict (version, OpenMP, threads, SIMD path)."""
    from clipcore import __version__
    return {
        "version": __version__,
        "openmp": kernels.openmp_enabled(),
        "threads": kernels.max_threads(),
        "simd": kernels.simd_path(),
        "kernels": kernels.get_tuning(),
        "kernels_source": _tuning.source,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def show_config(file=None):
    """Print clipcore's version, OpenMP on/off, thread count and SIMD path.

    Examples
    --------
    >>> import clipcore
    >>> clipcore.show_config()  # doctest: +ELLIPSIS
    clipcore ...
    """
    c = config()
    print(f"clipcore {c['version']}\n"
          f"  openmp:  {'on' if c['openmp'] else 'off'}\n"
          f"  threads: {c['threads']} (n_threads=None uses this many)\n"
          f"  simd:    {c['simd']}\n"
          f"  kernels: {', '.join(f'{k}={int(v)}' for k, v in c['kernels'].items())}\n"
          f"           from {c['kernels_source']} (force with CLIPCORE_KERNELS)\n"
          f"  numpy:   {c['numpy']}, python {c['python']}", file=file)
