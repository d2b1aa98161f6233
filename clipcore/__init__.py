"""clipcore: tensor and gradient clipping computed by fused Cython/OpenMP kernels."""
import os

from clipcore._lists import Plan, clip_by_global_norm_, global_norm
from clipcore._config import show_config

__version__ = "0.1.0"

__all__ = ["Plan", "clip_by_global_norm_", "get_include", "global_norm", "show_config"]


def get_include():
    """Directory holding ``kernels.pxd`` and ``cc_loops.h``, for Cython extensions.

    Another extension cimports the kernels with ``from clipcore cimport kernels``
    and adds this directory to its C include path.
    """
    return os.path.dirname(os.path.abspath(__file__))
