"""The core's benchmark workloads: real models' parameter shapes, and gradients for them.

Four parameter lists of float32 tensors, as issue 2's speed targets define them:

========== ======= =========== ==========================================
name       tensors values      what
========== ======= =========== ==========================================
mlp        6       235,146     the lesson's MLP 784-256-128-10
2000x512   2000    1,024,000   many small tensors (per-call overhead)
resnet50   161     25,557,032  torchvision's ResNet-50 (conv, BN, fc)
gpt2       148     124,439,808 GPT-2 small (Hugging Face's tensor layout)
========== ======= =========== ==========================================

Each workload is a tuple of ``(parameter name, shape)`` pairs in the model's
own order. :func:`make_gradients` fills such a list with deterministic float32
values.
"""
import numpy as np

__all__ = ["WORKLOADS", "shapes", "n_values", "make_gradients", "fill_gradients"]


def _mlp():
    return (("fc1.kernel", (784, 256)), ("fc1.bias", (256,)),
            ("fc2.kernel", (256, 128)), ("fc2.bias", (128,)),
            ("fc3.kernel", (128, 10)), ("fc3.bias", (10,)))


def _resnet50():
    # torchvision.models.resnet50: conv weights (out, in, kh, kw), BatchNorm
    # weight and bias (running statistics are buffers, not parameters), fc.
    params = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,))]
    inplanes = 64
    for layer, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), 1):
        for b in range(blocks):
            p = f"layer{layer}.{b}."
            convs = ((inplanes, planes, 1), (planes, planes, 3), (planes, 4 * planes, 1))
            for k, (c_in, c_out, size) in enumerate(convs, 1):
                params += [(f"{p}conv{k}.weight", (c_out, c_in, size, size)),
                           (f"{p}bn{k}.weight", (c_out,)), (f"{p}bn{k}.bias", (c_out,))]
            if b == 0:   # the first block of each stage projects the shortcut
                params += [(f"{p}downsample.0.weight", (4 * planes, inplanes, 1, 1)),
                           (f"{p}downsample.1.weight", (4 * planes,)),
                           (f"{p}downsample.1.bias", (4 * planes,))]
            inplanes = 4 * planes
    params += [("fc.weight", (1000, 2048)), ("fc.bias", (1000,))]
    return tuple(params)


def _gpt2():
    # GPT-2 small (124M): vocabulary 50257, context 1024, width 768, 12 blocks.
    # Conv1D weights are stored (in, out), as in Hugging Face's GPT2Model.
    d, params = 768, [("wte.weight", (50257, 768)), ("wpe.weight", (1024, 768))]
    for b in range(12):
        p = f"h.{b}."
        params += [(p + "ln_1.weight", (d,)), (p + "ln_1.bias", (d,)),
                   (p + "attn.c_attn.weight", (d, 3 * d)), (p + "attn.c_attn.bias", (3 * d,)),
                   (p + "attn.c_proj.weight", (d, d)), (p + "attn.c_proj.bias", (d,)),
                   (p + "ln_2.weight", (d,)), (p + "ln_2.bias", (d,)),
                   (p + "mlp.c_fc.weight", (d, 4 * d)), (p + "mlp.c_fc.bias", (4 * d,)),
                   (p + "mlp.c_proj.weight", (4 * d, d)), (p + "mlp.c_proj.bias", (d,))]
    params += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return tuple(params)


WORKLOADS = {
    "mlp": _mlp(),
    "2000x512": tuple((f"t{i}", (512,)) for i in range(2000)),
    "resnet50": _resnet50(),
    "gpt2": _gpt2(),
}

# Values are drawn once into a block of this many and read from it at a
# random offset per tensor: filling 124M values then costs a copy, not 124M
# draws from the generator.
_BLOCK = 1 << 20


def shapes(workload):
    """The list of tensor shapes of a workload.

    Parameters
    ----------
    workload : str or sequence of tuple
        A name in :data:`WORKLOADS`, or a sequence of shapes (returned as a list).

    Returns
    -------
    list of tuple of int

    Raises
    ------
    ValueError
        If a name is not one of :data:`WORKLOADS`.

    Examples
    --------
    >>> from clipcore.workloads import shapes
    >>> shapes("mlp")
    [(784, 256), (256,), (256, 128), (128,), (128, 10), (10,)]
    """
    if isinstance(workload, str):
        if workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
        return [shape for _, shape in WORKLOADS[workload]]
    return [tuple(int(n) for n in shape) for shape in workload]


def n_values(workload):
    """Number of values over all tensors of a workload (a name or a list of shapes).

    Examples
    --------
    >>> from clipcore.workloads import n_values
    >>> n_values("gpt2")
    124439808
    """
    return sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes(workload))


def fill_gradients(arrays, seed=0):
    """Fill float32 arrays in place with deterministic gradient-like values.

    Each array gets normally distributed values times a scale of its own
    between 1e-3 and 1e-1, so tensors differ in magnitude as real gradients do.
    Values repeat with a period of 2**20 within a tensor: they are meant for
    timing and correctness checks, not for statistics.

    Parameters
    ----------
    arrays : sequence of ndarray
        C-contiguous, writable float32 arrays.
    seed : int
        Seed of the generator; the same seed and shapes give the same values.

    Raises
    ------
    TypeError
        If an entry is not a float32 ndarray.
    ValueError
        If an entry is not C-contiguous or not writable (nothing is written then).

    Examples
    --------
    >>> import numpy as np
    >>> from clipcore.workloads import fill_gradients
    >>> a, b = np.empty(3, np.float32), np.empty((2, 2), np.float32)
    >>> fill_gradients([a, b], seed=1)
    >>> bool(np.all(np.isfinite(a))), b.dtype
    (True, dtype('float32'))
    """
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray) or a.dtype != np.float32:
            raise TypeError(f"arrays[{i}]: expected a float32 ndarray, got "
                            f"{getattr(a, 'dtype', type(a).__name__)}")
        if not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(f"arrays[{i}]: expected a C-contiguous writable array")
    rng = np.random.default_rng(seed)
    block = rng.standard_normal(_BLOCK, dtype=np.float32)
    for a in arrays:
        offset = int(rng.integers(_BLOCK))
        scale = np.float32(10.0 ** rng.uniform(-3.0, -1.0))
        flat, pos = a.reshape(-1), 0
        while pos < flat.size:
            take = min(flat.size - pos, _BLOCK - offset)
            np.multiply(block[offset:offset + take], scale, out=flat[pos:pos + take])
            pos += take
            offset = 0


def make_gradients(workload, seed=0):
    """New float32 gradients for a workload: one array per tensor, in model order.

    Parameters
    ----------
    workload : str or sequence of tuple
        A name in :data:`WORKLOADS` ("mlp", "2000x512", "resnet50", "gpt2")
        or a sequence of shapes.
    seed : int
        Seed: the same seed gives bitwise the same gradients.

    Returns
    -------
    list of ndarray
        C-contiguous float32 arrays, each its own allocation.

    Examples
    --------
    >>> from clipcore.workloads import make_gradients
    >>> grads = make_gradients("mlp")
    >>> len(grads), sum(g.size for g in grads), grads[0].dtype
    (6, 235146, dtype('float32'))
    """
    arrays = [np.empty(shape, np.float32) for shape in shapes(workload)]
    fill_gradients(arrays, seed)
    return arrays
