"""Views of foreign buffers (PyTorch tensors, buffer-protocol objects) as ndarrays."""
import numpy as np


def buffer_view(obj, *, writable):
    """Return an ndarray over obj's memory.

    Objects with ``__dlpack__`` (PyTorch, JAX, CuPy, ...) are viewed through
    DLPack and buffer-protocol objects through a memoryview: neither copies.
    Otherwise, for writing, NumPy is asked for a view with ``copy=False``,
    which raises rather than copy; for reading, any array-like is accepted (a
    copy is harmless there).
    """
    if hasattr(obj, "__dlpack__"):
        try:
            return np.from_dlpack(obj)
        except (BufferError, RuntimeError, TypeError, ValueError) as exc:
            raise TypeError(f"cannot view this {type(obj).__name__} as a CPU array "
                            f"without a copy ({exc})") from None
    try:
        return np.asarray(memoryview(obj))
    except TypeError:
        pass          # not a buffer
    if writable:
        try:
            return np.asarray(obj, copy=False)
        except ValueError:
            raise TypeError(f"a {type(obj).__name__} cannot be modified in place "
                            f"(it exposes no writable memory)") from None
    try:
        return np.asarray(obj)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"expected a floating-point array or buffer, got "
                        f"{type(obj).__name__} ({exc})") from None
