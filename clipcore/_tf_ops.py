"""clipcore's TensorFlow ops (tf_ops.cc), built against the installed TensorFlow.

Graph mode runs global_norm and clip_by_global_norm as ops of their own: N
tensors in, N out, no concatenation and no Python in the step. The ops are
C++ against TensorFlow's headers, which only exist where TensorFlow is
installed, so the first graph that needs them compiles tf_ops.cc with the
C++ compiler (``$CXX``, else Python's) into clipcore's cache directory
(``$XDG_CACHE_HOME/clipcore``, or ``~/.cache/clipcore``), keyed by the source,
TensorFlow's version and the flags; later processes load that file. Their
kernels are clipcore's own: the kernels module's C-level API, whose
addresses are handed to the library once it is loaded.

``CLIPCORE_TF_OPS=0`` turns them off. When they cannot be had (no compiler,
a failed build), graph mode keeps the ``tf.numpy_function`` form, with a
warning once: slower, same results.
"""
import ctypes
import hashlib
import os
import shlex
import subprocess
import sysconfig
import tempfile
import threading
import warnings

import tensorflow as tf

from clipcore import _tuning, kernels

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_ops.cc")
ENV = "CLIPCORE_TF_OPS"

# The C-level API functions the ops call, in clipcore_tf_bind's order, with
# the signatures tf_ops.cc was written for (their capsules' names).
BINDINGS = {
    "layout_norm": "double (__pyx_t_8clipcore_7kernels_Layout const *, double, int)",
    "scale_into": "void (__pyx_t_8clipcore_7kernels_Pair const *, Py_ssize_t const *, "
                  "Py_ssize_t, float, double, int)",
}

_lock = threading.Lock()
_ops = None          # the loaded op module; False once it cannot be had


def compiler():
    return shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")


def flags():
    # -ffp-contract=off: the factor's a * b + c rounds as NumPy's does (no FMA)
    return (["-O2", "-shared", "-fPIC", "-ffp-contract=off", "-Wno-deprecated-declarations"]
            + tf.sysconfig.get_compile_flags() + tf.sysconfig.get_link_flags())


def library_path():
    """Where this source, built for this TensorFlow with these flags, is cached."""
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read())
    key.update(repr((tf.__version__, compiler(), flags())).encode())
    cache = os.path.dirname(_tuning.cache_path())
    return os.path.join(cache, f"tf_ops-{key.hexdigest()[:16]}.so")


def build(path):
    """Compile tf_ops.cc into path (atomically: another process may be building it too)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        done = subprocess.run(compiler() + [SOURCE, "-o", tmp] + flags(),
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip()[-500:] or f"exit {done.returncode}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
    ("PyCapsule_GetName", ctypes.pythonapi))
_get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


def addresses():
    """The kernels' addresses, in BINDINGS' order; RuntimeError if a signature moved."""
    out = []
    for name, signature in BINDINGS.items():
        capsule = kernels.__pyx_capi__[name]
        got = _get_name(capsule)
        if got.decode() != signature:
            raise RuntimeError(f"kernels.{name} is {got.decode()}, tf_ops.cc expects {signature}")
        out.append(ctypes.c_void_p(_get_pointer(capsule, got)))
    return out


def _load():
    """Build (once per machine), load and bind the library; register the gradients."""
    bindings = addresses()                  # before TF registers ops that could not run
    path = library_path()
    if not os.path.exists(path):
        build(path)
    module = tf.load_op_library(path)
    ctypes.CDLL(path).clipcore_tf_bind(*bindings)
    tf.RegisterGradient("ClipcoreGlobalNorm")(_global_norm_grad)
    tf.no_gradient("ClipcoreClipByGlobalNorm")
    return module


def load():
    """The op module (clipcore_global_norm, clipcore_clip_by_global_norm), or None."""
    global _ops
    if _ops is None:
        with _lock:
            if _ops is None:
                if os.environ.get(ENV, "1") == "0":
                    _ops = False
                else:
                    try:
                        _ops = _load()
                    except Exception as exc:      # any failure: the slower form stays
                        _ops = False
                        warnings.warn(f"clipcore: its TensorFlow ops are not available "
                                      f"({type(exc).__name__}: {exc}); graph mode uses "
                                      f"tf.numpy_function (slower, same results). {ENV}=0 "
                                      f"silences this.", RuntimeWarning, stacklevel=3)
    return _ops or None


def _global_norm_grad(op, dn):
    from clipcore._tf import _global_norm_grad as grad
    n = op.get_attr("N")
    return grad(op.inputs[:n], op.outputs[0], dn) + [None]
