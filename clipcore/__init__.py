"""clipcore: tensor and gradient clipping computed by fused Cython/OpenMP kernels."""
import os


def _load_kernels_with_short_openmp_spin():
    """Import the kernels with GNU OpenMP's idle spinning cut short.

    libgomp's idle threads spin for 300,000 rounds (its default) after each
    parallel region. On a machine with few cores they then starve other
    thread pools -- OpenBLAS under NumPy's matrix products -- and a NumPy
    training loop that clips every step runs much slower.
    libgomp reads GOMP_SPINCOUNT once, when it is loaded (here, by the
    kernels); a user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY is left alone,
    and the variable is not left in the environment of child processes.
    """
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        import clipcore.kernels  # noqa: F401
        return
    os.environ["GOMP_SPINCOUNT"] = "10000"
    try:
        import clipcore.kernels  # noqa: F401
    finally:
        del os.environ["GOMP_SPINCOUNT"]


_load_kernels_with_short_openmp_spin()

from clipcore import _tuning  # noqa: E402

from clipcore._lists import Plan, clip_by_global_norm_  # noqa: E402
from clipcore._config import show_config  # noqa: E402
# TensorFlow's names and semantics (also inside tf.function and under
# tf.GradientTape: clipcore._tf). global_norm is the core's, plus TF's name
# argument and TF tensors / IndexedSlices.
from clipcore._ops import (clip_by_average_norm, clip_by_global_norm,  # noqa: E402
                           clip_by_norm, clip_by_norm_, clip_by_value, clip_by_value_,
                           global_norm, maximum, minimum, norm, relu, relu_)
from clipcore._per_example import adaptive_grad_clip_, per_example_global_norm_clip  # noqa: E402

from clipcore._version import __version__  # noqa: E402

_tuning.apply()      # the loop variants for this CPU (cached calibration or table)

__all__ = ["Plan", "clip_by_global_norm_", "get_include", "global_norm", "show_config",
           "clip_by_average_norm", "clip_by_global_norm", "clip_by_norm", "clip_by_norm_",
           "clip_by_value", "clip_by_value_", "maximum", "minimum", "norm", "relu", "relu_",
           "per_example_global_norm_clip", "adaptive_grad_clip_"]


def get_include():
    """The package's directory, which holds ``kernels.pxd`` for Cython extensions.

    Another extension cimports the kernels with ``from clipcore cimport kernels``;
    Cython finds the .pxd beside the installed package (no C header is needed).
    """
    return os.path.dirname(os.path.abspath(__file__))
