"""Compiled parts of clipcore.torch: the tensor check and torch's clip coefficient.

torch is never imported here: clipcore.torch passes its types and dtypes in.
"""
from libc.float cimport FLT_MIN
from libc.math cimport isfinite

from clipcore._lists cimport Plan, promote_kind, tensor_refusal, TENSOR_OK
from clipcore.kernels cimport SEG_F32, SEG_F64, SEG_F16, SEG_BF16

cdef extern from "cc_half.h" nogil:
    float cc_f16_to_f32(unsigned short h)
    unsigned short cc_f32_to_f16(float f)
    float cc_bf16_to_f32(unsigned short h)
    unsigned short cc_f32_to_bf16(float f)


def tensor_memory(list tensors, int use, tuple plain_types, dict dtype_of_kind,
                  strided_layout):
    """Where a list of PyTorch tensors' values lie, for clipcore.torch's fast path.

    use: what the memory is taken for (clipcore._lists.FOR_*: a norm, a norm
    and a scaling, any write); each tensor is taken by clipcore._lists'
    rules for it (tensor_refusal), and where those refuse, torch takes the
    call. Returns (addresses, lengths, kinds, norm_kind) when every tensor's
    type is one of plain_types and it is a contiguous tensor of layout
    strided_layout, of a dtype in dtype_of_kind (torch's dtype of each
    segment kind clipcore reads: float32, float64, float16, bfloat16); kinds[i]
    is tensor i's segment kind (clipcore._lists.KIND_*), norm_kind that of
    torch's total norm (promote_kind). "strided" when they are that except
    that some are not contiguous; None otherwise (torch's own path). Here
    rather than in Python because it runs for every tensor at every call.
    torch is not imported: its types and dtypes come in as arguments.
    """
    cdef list addresses = [], lengths = [], kinds = []
    cdef object t, dtype
    cdef object f32 = dtype_of_kind[SEG_F32], f64 = dtype_of_kind[SEG_F64]
    cdef object f16 = dtype_of_kind[SEG_F16], bf16 = dtype_of_kind[SEG_BF16]
    cdef int kind, norm_kind = -1
    cdef bint strided = False
    try:
        for t in tensors:
            if type(t) not in plain_types:
                return None
            dtype = t.dtype
            if dtype is f32:
                kind = SEG_F32
            elif dtype is f64:
                kind = SEG_F64
            elif dtype is bf16:
                kind = SEG_BF16
            elif dtype is f16:
                kind = SEG_F16
            else:
                return None
            if t.layout is not strided_layout or tensor_refusal(t, use) != TENSOR_OK:
                return None
            if strided:           # the tensors after a strided one are checked all the same
                continue
            if not t.is_contiguous():
                strided = True
                continue
            addresses.append(t.data_ptr())
            lengths.append(t.numel())
            kinds.append(kind)
            norm_kind = promote_kind(norm_kind, kind)
    except RuntimeError:    # no storage (functorch's wrappers and the like)
        return None
    if strided:
        return "strided"
    return addresses, lengths, kinds, SEG_F32 if norm_kind < 0 else norm_kind


# torch's clip coefficient, computed here so that the kernel applies it in
# the same parallel region as the norm. `kind` is the total norm's dtype as a
# segment kind: float64 if any gradient is float64; the 16-bit type if all
# gradients have it; else float32 (torch's type promotion of the stacked norms).

cdef inline float round_f32(float v, int kind) noexcept nogil:
    """v rounded to the 16-bit type (RNE), as float32; v itself for float32."""
    if kind == SEG_F16:
        return cc_f16_to_f32(cc_f32_to_f16(v))
    if kind == SEG_BF16:
        return cc_bf16_to_f32(cc_f32_to_bf16(v))
    return v


cdef double total_norm(double norm, int kind) noexcept nogil:
    """The norm as torch's total norm tensor holds it: rounded to float32 (a
    16-bit type: then from float32 to it, as torch converts a float)."""
    return norm if kind == SEG_F64 else round_f32(<float>norm, kind)


cdef double torch_coef(double norm, int kind, double max_norm) noexcept nogil:
    """torch's clamp(max_norm / (total_norm + 1e-6), max=1.0), total_norm being
    the norm in its dtype. torch evaluates it in that dtype as
    reciprocal(total_norm + 1e-6) * max_norm, the Python numbers cast to it.
    For the 16-bit types torch computes each step in float32 and rounds the
    result to the type, with 1e-6 first rounded to the type (the add casts
    its scalar operand) but max_norm only to float32 (the multiply reads its
    scalar operand as float32). Float arithmetic here is IEEE single
    precision, each step correctly rounded."""
    cdef float t
    cdef double c
    if kind == SEG_F64:
        c = 1.0 / (norm + 1e-6) * max_norm
    else:
        t = <float>total_norm(norm, kind)
        t = round_f32(t + round_f32(<float>1e-6, kind), kind)
        t = round_f32(<float>1.0 / t, kind)
        c = round_f32(t * <float>max_norm, kind)
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


def torch_total_norm(double norm, int kind):
    """The norm rounded to the total norm's dtype (see total_norm), as a float."""
    return total_norm(norm, kind)


def torch_clip_coef(double norm, int kind, double max_norm):
    """torch's clip coefficient for this norm (see torch_coef)."""
    return torch_coef(norm, kind, max_norm)


def torch_kernel_factor(double c):
    """The factor the kernel applies for torch's coefficient c (see torch_factor)."""
    return torch_factor(c)


ctypedef struct TorchRule:
    double max_norm
    int kind
    bint error_if_nonfinite


cdef double torch_rule(double norm, const void *ctx) noexcept nogil:
    cdef const TorchRule *r = <const TorchRule *>ctx
    if r.error_if_nonfinite and not isfinite(total_norm(norm, r.kind)):
        return 1.0               # torch raises, modifying nothing
    return torch_factor(torch_coef(norm, r.kind, r.max_norm))


def clip_like_torch_(Plan plan not None, double max_norm, double norm_type, int kind,
                     bint error_if_nonfinite):
    """The plan's norm, its buffers multiplied by torch_clip_coef's factor, in one
    kernel call; clipcore.torch raises for error_if_nonfinite and multiplies when
    the factor is 1 but the coefficient is below 1. kind: the total norm's dtype."""
    cdef TorchRule rule
    rule.max_norm = max_norm
    rule.kind = kind
    rule.error_if_nonfinite = error_if_nonfinite
    return plan.live().clip_with(torch_rule, &rule, norm_type, plan.n_threads)
