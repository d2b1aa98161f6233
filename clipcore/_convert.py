"""The one way clipcore gets memory from an object: NumPy, DLPack/PyTorch, buffers.

Every function that reads or writes a caller's values goes through
:func:`buffer_view`, so the rules live here: what is refused for writing
(read-only memory, tensors autograd tracks, the negative and conjugate bits,
masked arrays), what may be copied for reading, and which objects' memory can
move under a kept view (:func:`fingerprint`).
"""
import numpy as np


def framework(obj):
    """'tf' or 'torch' for their tensors (by type module name), else None."""
    mod = type(obj).__module__ or ""
    if mod.startswith("tensorflow"):
        return "tf"
    if mod.startswith("torch"):
        return "torch"
    return None


def _refuse_masked(obj, name):
    if isinstance(obj, np.ma.MaskedArray):
        raise TypeError(f"{name}: masked arrays are not supported (the mask would be "
                        f"ignored); pass arr.filled(...) or the unmasked values")


def _torch_view(t, name, writable):
    if t.device.type != "cpu":
        raise TypeError(f"{name}: expected a CPU tensor, got one on {t.device}")
    if writable:
        if t.requires_grad:
            raise ValueError(f"{name}: the tensor requires grad; modifying it in place "
                             f"behind autograd's back would give wrong gradients (clip "
                             f"its .grad, or a tensor that does not require grad)")
        if t.is_neg() or t.is_conj():
            raise TypeError(f"{name}: the tensor has its negative or conjugate bit set, "
                            f"so its memory does not hold its values; call "
                            f"t.resolve_neg() / t.resolve_conj() first")
    else:
        t = t.detach()
        if t.is_neg() or t.is_conj():      # reading: a resolved copy is harmless
            t = t.resolve_neg().resolve_conj()
    try:
        return np.from_dlpack(t)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        raise TypeError(f"{name}: cannot view this {t.dtype} tensor as an array "
                        f"without a copy ({exc})") from None


def buffer_view(obj, name, *, writable):
    """An ndarray over obj's memory (never a copy when writable).

    NumPy arrays come as they are (subclasses as base-class views, so no
    subclass code runs while clipcore writes); PyTorch tensors and other
    ``__dlpack__`` objects through DLPack; buffer-protocol objects through a
    memoryview. For reading, anything NumPy can convert is accepted (a copy
    is harmless there). The caller checks the dtype, then whether the memory
    is writable (``arr.flags.writeable``). TypeError/ValueError name the argument.
    """
    if isinstance(obj, np.ndarray):
        _refuse_masked(obj, name)
        return obj if type(obj) is np.ndarray else obj.view(np.ndarray)
    if framework(obj) == "torch" and hasattr(obj, "requires_grad"):
        return _torch_view(obj, name, writable)
    if hasattr(obj, "__dlpack__"):
        try:
            arr = np.from_dlpack(obj)
        except (BufferError, RuntimeError, TypeError, ValueError) as exc:
            raise TypeError(f"{name}: cannot view this {type(obj).__name__} as a CPU "
                            f"array without a copy ({exc})") from None
    else:
        try:
            arr = np.asarray(memoryview(obj))
        except TypeError:          # not a buffer
            arr = None
    if arr is None and writable:
        try:
            arr = np.asarray(obj, copy=False)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: a {type(obj).__name__} cannot be modified in place "
                            f"(it exposes no writable memory)") from None
    if arr is None:
        try:
            arr = np.asarray(obj)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: expected a floating-point array or buffer, got "
                            f"{type(obj).__name__} ({exc})") from None
    _refuse_masked(arr, name)
    return arr if type(arr) is np.ndarray else arr.view(np.ndarray)


def fingerprint(obj):
    """What must stay the same for a kept view of obj's memory to stay valid.

    None for objects whose memory cannot move while a view holds it (NumPy
    arrays are checked by the kernels' own guard; buffer exports lock the
    memory). For a PyTorch tensor, its address, shape and strides: resize_,
    set_ and ``.data =`` change them and free the memory a view points to.
    """
    if framework(obj) == "torch" and hasattr(obj, "data_ptr"):
        return (obj.data_ptr(), obj.shape, obj.stride(), obj.requires_grad)
    return None
