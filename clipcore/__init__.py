"""clipcore: tensor and gradient clipping computed by fused Cython/OpenMP kernels."""
import os

from clipcore._lists import Plan, clip_by_global_norm_, global_norm
from clipcore._config import show_config
# TensorFlow-semantics ops (issue 3); this global_norm extends the core's
# (same signature, plus TF's name argument, IndexedSlices and TF tensors).
from clipcore._global import clip_by_global_norm, global_norm
from clipcore._ops import (clip_by_average_norm, clip_by_norm, clip_by_norm_, clip_by_value,
                           clip_by_value_, maximum, minimum, norm, relu, relu_)

__version__ = "0.1.0"

__all__ = ["Plan", "clip_by_global_norm_", "get_include", "global_norm", "show_config",
           "clip_by_average_norm", "clip_by_global_norm", "clip_by_norm", "clip_by_norm_",
           "clip_by_value", "clip_by_value_", "maximum", "minimum", "norm", "relu", "relu_"]


def get_include():
    """Directory holding ``kernels.pxd`` and ``cc_loops.h``, for Cython extensions.

    Another extension cimports the kernels with ``from clipcore cimport kernels``
    and adds this directory to its C include path.
    """
    return os.path.dirname(os.path.abspath(__file__))
