"""Compiled parts of clipcore.torch: the tensor check and torch's clip coefficient.

torch is never imported here: clipcore.torch passes its types and dtypes in.
"""
from libc.float cimport FLT_MIN
from libc.math cimport isfinite

from clipcore._lists cimport Plan


def tensor_memory(list tensors, bint writable, tuple plain_types, f32, f64, strided_layout):
    """Where a list of PyTorch tensors' values lie, for clipcore.torch's fast path.

    Returns (addresses, lengths, float64 flags) when every tensor's type is
    one of plain_types and it is a contiguous CPU tensor of dtype f32 or f64
    and layout strided_layout (and does not require grad, for writing);
    "strided" when they are that except that some are not contiguous; None
    otherwise (torch's own path). Here rather than in Python because it runs
    for every tensor at every call: seven attribute reads each, and with
    2000 gradients the interpreter's share of them is a tenth of the call.
    torch is not imported: its types and dtypes come in as arguments.
    """
    cdef list addresses = [], lengths = [], is_f64 = []
    cdef object t, dtype
    cdef bint strided = False
    try:
        for t in tensors:
            if type(t) not in plain_types:
                return None
            dtype = t.dtype
            if ((dtype is not f32 and dtype is not f64) or not t.is_cpu
                    or t.layout is not strided_layout or (writable and t.requires_grad)):
                return None
            if strided:           # the tensors after a strided one are checked all the same
                continue
            if not t.is_contiguous():
                strided = True
                continue
            addresses.append(t.data_ptr())
            lengths.append(t.numel())
            is_f64.append(dtype is f64)
    except RuntimeError:    # no storage (functorch's wrappers and the like)
        return None
    return "strided" if strided else (addresses, lengths, is_f64)


# torch's clip coefficient, computed here so that the kernel applies it in
# the same parallel region as the norm.

cdef double torch_coef(double norm, bint f64, double max_norm) noexcept nogil:
    """torch's clamp(max_norm / (total_norm + 1e-6), max=1.0), total_norm being
    the norm in its dtype (float32 unless f64). torch evaluates it in that dtype
    as reciprocal(total_norm + 1e-6) * max_norm, the Python numbers cast to it;
    float arithmetic here is IEEE single precision, each step correctly rounded."""
    cdef float t
    cdef double c
    if f64:
        c = 1.0 / (norm + 1e-6) * max_norm
    else:
        t = <float>norm
        c = (<float>1.0 / (t + <float>1e-6)) * <float>max_norm
    return 1.0 if c > 1.0 else c     # NaN stays NaN, as in torch.clamp


cdef double torch_factor(double c) noexcept nogil:
    """The factor the kernel applies for torch's coefficient c (1: nothing).

    1 when c is 1 (torch multiplies by 1); also when c is negative (a negative
    max_norm: the kernel only shrinks) or a float32 subnormal (the kernel would
    apply it in float64, torch in float32): the caller lets torch multiply then.
    """
    if c != c or c == 0.0 or (FLT_MIN <= c < 1.0):
        return c
    return 1.0


def torch_clip_coef(double norm, bint f64, double max_norm):
    """torch's clip coefficient for this norm (see torch_coef)."""
    return torch_coef(norm, f64, max_norm)


def torch_kernel_factor(double c):
    """The factor the kernel applies for torch's coefficient c (see torch_factor)."""
    return torch_factor(c)


ctypedef struct TorchRule:
    double max_norm
    bint f64
    bint error_if_nonfinite


cdef double torch_rule(double norm, const void *ctx) noexcept nogil:
    cdef const TorchRule *r = <const TorchRule *>ctx
    cdef double total = norm if r.f64 else <float>norm
    if r.error_if_nonfinite and not isfinite(total):
        return 1.0               # torch raises, modifying nothing
    return torch_factor(torch_coef(norm, r.f64, r.max_norm))


def clip_like_torch_(Plan plan not None, double max_norm, double norm_type, bint f64,
                     bint error_if_nonfinite):
    """The plan's norm, its buffers multiplied by torch_clip_coef's factor, in one
    kernel call; clipcore.torch raises for error_if_nonfinite and multiplies when
    the factor is 1 but the coefficient is below 1."""
    cdef TorchRule rule
    rule.max_norm = max_norm
    rule.f64 = f64
    rule.error_if_nonfinite = error_if_nonfinite
    return plan.live().clip_with(torch_rule, &rule, norm_type, plan.n_threads)
